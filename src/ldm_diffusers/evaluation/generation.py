"""Sample quality of an ``LDMPipeline``: FID, improved precision / recall and IS against real images."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .fid import extract_features, fid_from_features
from .inception_score import EfficientNetClassifier, inception_score_from_logits
from .precision_recall import precision_recall


@torch.no_grad()
def generate_images(pipe, conditions: list[dict], batch_size: int = 16, num_inference_steps: int = 50,
                    guidance_scale: float = 1.0, seed: int = 0, show_progress: bool = True,
                    **call_kwargs) -> tuple[torch.Tensor, float]:
    """Images [N, 3, H, W] in [0, 1], one per entry of ``conditions`` (pipeline call inputs for one image,
    e.g. ``{"prompt": "..."}``; ``{}`` for unconditional), and the seconds per image. ``call_kwargs`` go to every
    pipeline call (``eta=1.0``, ...)."""
    pipe.set_progress_bar_config(disable=True)
    out, start = [], time.perf_counter()
    for i in tqdm(range(0, len(conditions), batch_size), desc="sampling", disable=not show_progress):
        chunk = conditions[i:i + batch_size]
        inputs = {}
        for key in chunk[0]:
            values = [c[key] for c in chunk]
            inputs[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        if not inputs:
            inputs = {"batch_size": len(chunk)}
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        images = pipe(**inputs, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="pt", **call_kwargs).images
        out.append(images.float().cpu())
    images = torch.cat(out)
    return images, (time.perf_counter() - start) / max(len(images), 1)


def feature_metrics(real_features, fake_features, k: int = 3) -> dict[str, float]:
    """FID, precision and recall (k-NN manifolds) of two Inception feature sets [N, 2048]."""
    return {"fid": fid_from_features(real_features, fake_features), **precision_recall(real_features, fake_features, k)}


def sample_metrics(real: torch.Tensor, fake: torch.Tensor, real_features=None, k: int = 3, is_splits: int = 10,
                   show_progress: bool = True) -> dict[str, float]:
    """FID, precision, recall (TF-Inception features) and IS (EfficientNet-Lite0) of ``fake`` against ``real``
    (both [N, 3, H, W] in [0, 1]; ``real_features`` may be given precomputed)."""
    if real_features is None:
        real_features = extract_features(real, desc="Inception features (real)", show_progress=show_progress)
    fake_features = extract_features(fake, desc="Inception features (generated)", show_progress=show_progress)
    results = feature_metrics(real_features, fake_features, k)
    classifier = EfficientNetClassifier()
    logits = torch.cat([classifier(b) for b in fake.split(64)])
    results["is_efficientnet_mean"], results["is_efficientnet_std"] = inception_score_from_logits(
        logits, min(is_splits, len(fake)))
    results["num_generated"], results["num_real"] = len(fake), len(real_features)
    return results
