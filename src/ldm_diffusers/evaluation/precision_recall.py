"""Improved precision and recall (Kynkaanniemi et al., 2019) on feature embeddings.

Each set's manifold is the union of balls around its points with radius = distance to the point's k-th
nearest neighbour in the same set. Precision: share of generated points inside the real manifold;
recall: share of real points inside the generated manifold.
"""

from __future__ import annotations

import torch


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for part in x.split(chunk):
        d = torch.cdist(part, x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int) -> float:
    inside = []
    for part in queries.split(chunk):
        inside.append((torch.cdist(part, manifold) <= radii[None]).any(dim=1))
    return torch.cat(inside).float().mean().item()


def precision_recall(real, fake, k: int = 3, chunk: int = 1024) -> dict[str, float]:
    """{"precision", "recall"} of ``fake`` [N, D] against ``real`` [M, D] (k-NN manifolds, k=3 as the paper)."""
    real = torch.as_tensor(real, dtype=torch.float64)
    fake = torch.as_tensor(fake, dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"Need more than k={k} points in each set, got {len(real)} real and {len(fake)} generated.")
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    return {
        "precision": _coverage(real, real_radii, fake, chunk),
        "recall": _coverage(fake, fake_radii, real, chunk),
    }
