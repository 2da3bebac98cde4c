"""Attention backends: PyTorch SDPA (diffusers' ``AttnProcessor2_0``) by default, xformers where it runs."""

from __future__ import annotations

import torch

SDPA_NOTE = (
    "PyTorch SDPA attention (AttnProcessor2_0, the default) stays on, and it is already memory-efficient; "
    "nothing else is needed."
)


def require_xformers(device: torch.device) -> None:
    """Raise a RuntimeError saying why xformers cannot be used on ``device`` (missing, no kernels for the
    device, or a wheel built for another torch/CUDA); return if its kernels run."""
    try:
        import xformers.ops
    except ImportError as err:
        raise RuntimeError(f"xformers is not installed (`pip install ldm-diffusers[xformers]`). {SDPA_NOTE}") from err
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"xformers has no kernels for '{device.type}' (CUDA only). {SDPA_NOTE}")
    try:  # wheels built for another torch/CUDA import fine but fail on first use
        q = torch.zeros(1, 2, 1, 64, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as err:
        raise RuntimeError(f"xformers is installed but its kernels do not run here ({err}). {SDPA_NOTE}") from err
