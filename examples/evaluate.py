#!/usr/bin/env python
"""Sample quality of a trained LDMPipeline on a dataset's validation split.

    python examples/evaluate.py --model outputs/ldm-text --out outputs/ldm-text/sample_metrics.json

Generates one image per validation row (its caption for text models, its label for class models,
nothing for unconditional ones) and reports FID, improved precision / recall (k=3) against the real
validation images (TF-Inception features, cached per dataset), IS (EfficientNet-Lite0) and seconds per
image, and saves a grid of the first samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None):
    from diffusers.utils import make_image_grid

    from ldm_diffusers import LDMPipeline
    from ldm_diffusers.data import load_image_splits, load_pixels, tensor_to_pil
    from ldm_diffusers.evaluation import cached_reference_features, extract_features, generate_images, sample_metrics
    from ldm_diffusers.schedulers import SAMPLERS, switch_sampler

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="LDMPipeline folder or Hub id.")
    p.add_argument("--dataset_name", default="emoji")
    p.add_argument("--train_data_dir", default=None)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--caption_column", default="text")
    p.add_argument("--class_column", default="group_id")
    p.add_argument("--num_images", type=int, default=None, help="Default: the whole validation split.")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--scheduler", choices=sorted(SAMPLERS), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: <model>/sample_metrics.json).")
    a = p.parse_args(argv)

    pipe = LDMPipeline.from_pretrained(a.model)
    if a.scheduler:
        pipe.scheduler = switch_sampler(pipe.scheduler, a.scheduler)
    _, val = load_image_splits(a.dataset_name, None, a.train_data_dir, a.resolution)
    n = min(a.num_images or len(val), len(val))
    rows = val.select(range(n))
    if pipe.text_encoder is not None:
        conditions, guidance = [{"prompt": c} for c in rows[a.caption_column]], a.guidance_scale
    elif pipe.class_embedder is not None:
        conditions, guidance = [{"class_labels": int(c)} for c in rows[a.class_column]], a.guidance_scale
    else:
        conditions, guidance = [{} for _ in range(n)], 1.0
    real = load_pixels(rows, a.resolution)
    settings = {"dataset": a.dataset_name or a.train_data_dir, "resolution": a.resolution, "n": n, "fingerprint": val._fingerprint}
    real_features = cached_reference_features("validation", settings, lambda: extract_features(real).numpy())
    fake, seconds = generate_images(pipe, conditions, a.batch_size, a.steps, guidance, a.seed)
    results = sample_metrics(real, fake, torch.from_numpy(real_features))
    results.update(seconds_per_image=seconds, steps=a.steps, guidance_scale=guidance,
                   sampler=type(pipe.scheduler).__name__, model=str(a.model))
    out = Path(a.out) if a.out else Path(a.model) / "sample_metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    cols = min(8, len(fake))
    shown = fake[: cols * min(4, len(fake) // cols)]
    grid = make_image_grid(tensor_to_pil(shown * 2 - 1), rows=len(shown) // cols, cols=cols)
    grid.save(out.with_suffix(".png"))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
