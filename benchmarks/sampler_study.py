#!/usr/bin/env python
"""Seconds to an image of a given quality: FID of the built-in model against sampler and step count.

Every setting samples the same prompts (the emoji validation captions) from the same seeds with classifier-free
guidance as the model card uses it (3.0); FID is computed against the same real validation images, so the settings
are compared on paired samples. Writes ``results.json`` and ``fid_vs_seconds.png`` to ``--out_dir`` and prints the
fastest setting whose FID is within ``--tolerance`` (5%) of DDIM with 50 steps (settings within 3% of the fastest
time count as equally fast and are told apart by FID).

    python benchmarks/sampler_study.py --out_dir benchmarks/results/sampler_study
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ldm_diffusers import LDMPipeline, switch_sampler
from ldm_diffusers.data import load_image_splits, load_pixels
from ldm_diffusers.evaluation.fid import extract_features, fid_from_features
from ldm_diffusers.evaluation.generation import generate_images

SETTINGS = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("plms", 10), ("plms", 20), ("plms", 50),
            ("dpm++", 10), ("dpm++", 15), ("dpm++", 20), ("dpm++", 25)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:emoji-text-to-image")
    p.add_argument("--num_images", type=int, default=None, help="Default: the whole validation split (343).")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--tolerance", type=float, default=0.05, help="Allowed FID increase over DDIM 50 (relative).")
    p.add_argument("--out_dir", default="benchmarks/results/sampler_study")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    pipe = LDMPipeline.from_pretrained(a.model)
    base = pipe.scheduler
    _, val = load_image_splits("emoji", None, None, 64)
    rows = val.select(range(min(a.num_images or len(val), len(val))))
    conditions = [{"prompt": c} for c in rows["text"]]
    real = extract_features(load_pixels(rows, 64), show_progress=False)
    results = []
    for sampler, steps in SETTINGS:
        pipe.scheduler = switch_sampler(base, sampler)
        fake, seconds = generate_images(pipe, conditions, a.batch_size, steps, a.guidance_scale, seed=0,
                                        show_progress=False)
        fid = fid_from_features(real, extract_features(fake, show_progress=False))
        results.append({"sampler": sampler, "steps": steps, "fid": fid, "seconds_per_image": seconds})
        print(json.dumps(results[-1]), flush=True)
        (out / "results.json").write_text(json.dumps({"model": a.model, "num_images": len(conditions),
                                                      "guidance_scale": a.guidance_scale, "torch_threads":
                                                      torch.get_num_threads(), "settings": results}, indent=1))
    reference = next(r["fid"] for r in results if (r["sampler"], r["steps"]) == ("ddim", 50))
    good = [r for r in results if r["fid"] <= reference * (1 + a.tolerance)]
    # the fastest; settings within 3% of its time (timing noise on a shared CPU) are told apart by FID
    fastest = min(r["seconds_per_image"] for r in good)
    best = min((r for r in good if r["seconds_per_image"] <= 1.03 * fastest), key=lambda r: r["fid"])
    print(f"fastest within {a.tolerance:.0%} of DDIM 50 (FID {reference:.2f}): {best['sampler']} {best['steps']} steps, "
          f"FID {best['fid']:.2f}, {best['seconds_per_image']:.3f} s per image")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in results):
        points = [r for r in results if r["sampler"] == sampler]
        ax.plot([r["seconds_per_image"] for r in points], [r["fid"] for r in points], "o-", label=sampler)
        for r in points:
            ax.annotate(str(r["steps"]), (r["seconds_per_image"], r["fid"]), fontsize=7)
    ax.axhline(reference * (1 + a.tolerance), color="gray", ls=":", label=f"DDIM 50 + {a.tolerance:.0%}")
    ax.set_xlabel("seconds per image (CPU, batch %d, CFG %.1f)" % (a.batch_size, a.guidance_scale))
    ax.set_ylabel(f"FID ({len(conditions)} images)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fid_vs_seconds.png", dpi=120)


if __name__ == "__main__":
    main()
