"""Image-like call inputs (images, masks, segmentation maps): conversion to tensors and checks with messages that
name the argument and what it accepts."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

from .base import shown

_images = VaeImageProcessor(do_resize=False)
_masks = VaeImageProcessor(do_resize=False, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def image_tensor(image) -> torch.Tensor:
    """PIL image(s), numpy array(s) in [0, 1] or a tensor in [-1, 1] -> [B, 3, H, W] in [-1, 1].

    Tensors are taken as they are: diffusers' processor would guess their range from the minimum (and warns
    that [-1, 1] tensors are deprecated there), which misreads a [-1, 1] image without negative values."""
    if isinstance(image, (list, tuple)) and image and isinstance(image[0], torch.Tensor):
        image = torch.cat([t if t.ndim == 4 else t[None] for t in image])
    if isinstance(image, torch.Tensor):
        return (image if image.ndim == 4 else image[None]).float()
    return _images.preprocess(image)


def mask_tensor(mask) -> torch.Tensor:
    """Mask image(s) -> [B, 1, H, W] in {0, 1} (1 = fill)."""
    return _masks.preprocess(mask)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x [B, C, H, W] blurred by a Gaussian of ``sigma`` pixels (separable, edges replicated). Here because the
    library blurs (diffusers' VaeImageProcessor.blur, PIL's GaussianBlur) take PIL images, not batched tensors."""
    radius = max(1, int(3 * sigma))
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


# (accepted types, value range of tensors, value range of arrays, dimensions of tensors / arrays) per input kind
_ACCEPTED = {
    "image": (("a PIL image, a float numpy array [H, W, 3] / [B, H, W, 3] in [0, 1], a float tensor [3, H, W] / "
               "[B, 3, H, W] in [-1, 1], or a list of one of these"), (-1.0, 1.0), (0.0, 1.0), (3, 4)),
    "mask": (("a PIL image, a numpy array or tensor [H, W] / [B, H, W] / [B, 1, H, W] in [0, 1] (1 = fill), or a "
              "list of one of these"), (0.0, 1.0), (0.0, 1.0), (2, 3, 4)),
    "segmentation": (("a single-channel PIL image ('L', 'P' or 'I'), an integer numpy array or tensor [H, W] / "
                      "[B, H, W] of class ids, or a list of [H, W] maps"), None, None, (2, 3)),
}


def check_image_input(name: str, image, kind: str = "image") -> None:
    """Refuse an image-like input of the wrong type, dimension, size or value range (NaN and inf included),
    naming ``name`` and what it accepts. ``kind``: "image" (RGB in [-1, 1] / [0, 1]), "mask" or "segmentation"
    (integer class ids; their range is the mode's to check)."""
    accepted, tensor_range, array_range, dims = _ACCEPTED[kind]
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{name} is an empty list; pass {accepted}.")
    if len({type(item) for item in items}) > 1 or not isinstance(items[0], (PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be {accepted}; got {shown(image)}.")
    sizes = set()
    for item in items:
        if isinstance(item, PIL.Image.Image):
            if kind == "segmentation" and item.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(f"{name} is a PIL image in mode '{item.mode}'; class ids need a single-channel image "
                                 "('L', 'P' or 'I').")
            sizes.add((item.height, item.width))
            continue
        values = torch.from_numpy(item) if isinstance(item, np.ndarray) else item
        if values.ndim not in dims:
            raise ValueError(f"{name} has shape {tuple(values.shape)}; pass {accepted}.")
        floating = values.is_floating_point()
        if values.is_complex() or (kind == "image" and not floating) or (
                kind == "segmentation" and (floating or values.dtype == torch.bool)):
            wanted = {"image": "float", "mask": "real", "segmentation": "integer"}[kind]
            raise TypeError(f"{name} must be {wanted} ({accepted}), got dtype {values.dtype}.")
        height, width = values.shape[-3:-1] if kind == "image" and isinstance(item, np.ndarray) else values.shape[-2:]
        if values.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(values.shape)}); pass {accepted}.")
        sizes.add((int(height), int(width)))
        if floating and not torch.isfinite(values).all():
            raise ValueError(f"{name} contains {'NaN' if torch.isnan(values).any() else 'inf'} values; pass {accepted}.")
        value_range = tensor_range if isinstance(item, torch.Tensor) else array_range
        if value_range and values.dtype != torch.bool and (values.min() < value_range[0] or values.max() > value_range[1]):
            raise ValueError(f"{name} holds values in [{values.min().item():.4g}, {values.max().item():.4g}], outside "
                             f"[{value_range[0]:g}, {value_range[1]:g}]; pass {accepted}.")
    if len(sizes) > 1:
        raise ValueError(f"The {name} list mixes sizes {sorted(sizes)}; every entry must have the same size.")
    if min(min(size) for size in sizes) < 1:
        raise ValueError(f"{name} is empty (size {sizes.pop()}); pass {accepted}.")


def check_rgb(image) -> torch.Tensor:
    tensor = image_tensor(image)
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"image must be RGB: it gives a tensor of shape {tuple(tensor.shape)}, not [B, 3, H, W].")
    return tensor


def check_divisible(name: str, size, pipe) -> None:
    f = pipe.vae_scale_factor
    if size[0] % f or size[1] % f:
        raise ValueError(f"{name} is {size[0]}x{size[1]}, which fixes the output size; both sides must be divisible by "
                         f"the autoencoder's factor f={f} (e.g. {size[0] - size[0] % f or f}x{size[1] - size[1] % f or f}).")
