"""Frechet Inception Distance (Heusel et al., 2017) on TF-Inception pool3 features.

FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2}). The trace of the matrix square root is
computed from the eigenvalues of S_r^{1/2} S_g S_r^{1/2} (symmetric, so ``eigh`` applies; it has the
same eigenvalues as S_r S_g), in float64, which avoids the complex round-off that ``scipy.linalg.sqrtm``
can produce. Reference statistics are cached to disk as ``.npz``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.emoji import default_cache_dir
from .inception import InceptionFeatureExtractor


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] (N >= 2), float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Need features [N >= 2, D], got shape {x.shape}.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}.")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> float:
    """FID of two feature sets [N, D] and [M, D]. With fewer samples than dimensions (343 validation images
    against 2048 Inception features) it is computed exactly in the Gram form: with centred features scaled
    a = (x - mu) / sqrt(N - 1) and b likewise, S_r = a^T a and S_g = b^T b, the non-zero eigenvalues of S_r S_g
    are the squared singular values of a b^T [N, M], so Tr (S_r S_g)^{1/2} is its nuclear norm: an N x M SVD
    instead of D x D eigendecompositions."""
    x, y = (np.asarray(f, dtype=np.float64) for f in (real, fake))
    if x.ndim != 2 or y.ndim != 2 or min(len(x), len(y)) < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"Need two feature sets [N >= 2, D] with the same D, got shapes {x.shape} and {y.shape}.")
    if min(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(*feature_statistics(x), *feature_statistics(y))
    a = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(axis=0)) / np.sqrt(len(y) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    mean_term = ((x.mean(axis=0) - y.mean(axis=0)) ** 2).sum()
    return float(mean_term + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)


@torch.no_grad()
@functools.lru_cache(maxsize=1)
def default_extractor():
    """The FID Inception network, loaded once per process (a report scores many sample sets)."""

    return InceptionFeatureExtractor()


def extract_features(images, extractor=None, batch_size: int = 50, desc: str = "Inception features",
                     show_progress: bool = True) -> torch.Tensor:
    """Features [N, 2048] of images given as an iterable of batches [B, 3, H, W] in [0, 1] (or one tensor)."""
    extractor = extractor or default_extractor()
    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)
    out = []
    for batch in tqdm(images, desc=desc, disable=not show_progress):
        out.append(extractor(batch).cpu())
    return torch.cat(out)


def cached_reference_features(name: str, settings: dict, compute, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Reference features, computed once by ``compute()`` and cached as ``<cache_dir>/<name>-<hash>.npz``."""

    key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir() / "fid-references") / f"{name}-{key}.npz"
    if path.is_file():
        return np.load(path)["features"]
    features = np.asarray(compute(), dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=features, settings=json.dumps(settings, default=str))
    os.replace(tmp, path)
    return features
