"""Spatially aligned conditioning, concatenated to z_t at the latent resolution (no cross-attention).

* super-resolution: the low-resolution image itself, [-1, 1], at the latent size: the output is f
  times larger (CompVis LDM-SR with f=4 upsamples by 4);
* inpainting: the stage-1 encoding of the masked image plus the mask resized to the latent size
  (mask 1 = region to fill, as in diffusers);
* semantic synthesis: the one-hot segmentation map, resized (nearest) to the latent size, or through a learned
  ``SpatialRescaler`` (CompVis' semantic synthesis models: bilinear halvings, then a 1x1 convolution).

None of them has an unconditional version, so classifier-free guidance does not apply.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin

from ..utils.model_cards import CardDetails, ComponentCardMixin
from .base import Conditioning, ConditioningMode, shown

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
    import PIL.Image

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


def _check_rgb(image) -> torch.Tensor:
    tensor = image_tensor(image)
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"image must be RGB: it gives a tensor of shape {tuple(tensor.shape)}, not [B, 3, H, W].")
    return tensor


def _check_divisible(name: str, size, pipe) -> None:
    f = pipe.vae_scale_factor
    if size[0] % f or size[1] % f:
        raise ValueError(f"{name} is {size[0]}x{size[1]}, which fixes the output size; both sides must be divisible by "
                         f"the autoencoder's factor f={f} (e.g. {size[0] - size[0] % f or f}x{size[1] - size[1] % f or f}).")


class SuperResolutionMode(ConditioningMode):
    """``image`` (without ``mask_image``): the low-resolution image, concatenated at the latent size."""

    kind = "concat"
    name = "super_resolution"
    inputs = ("image",)

    def is_selected(self, values):
        return values.get("image") is not None and values.get("mask_image") is None

    def batch_size(self, values):
        return image_tensor(values["image"]).shape[0]

    def check_inputs(self, pipe, values):
        """An RGB low-resolution image (or batch) of a valid type and range."""
        check_image_input("image", values["image"])
        _check_rgb(values["image"])

    def output_size(self, pipe, values):
        h, w = image_tensor(values["image"]).shape[-2:]
        return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor

    def condition(self, pipe, values, latent_size):
        return Conditioning(concat=image_tensor(values["image"]).to(pipe._execution_device))

    def training_inputs(self, batch, columns, rngs=None):
        """The training image downsampled by f (bicubic, antialiased) to the latent size, in [-1, 1]: the range
        ``condition`` gives a user's image (PIL and numpy are mapped from [0, 1], tensors taken as they are)."""
        if "low_res" in batch:  # kept by the latent cache
            return {"image": batch["low_res"]}
        return {"image": self.cache_inputs(batch, columns)["low_res"]}

    def cache_inputs(self, batch, columns):
        pixels = batch["pixel_values"]
        size = (pixels.shape[-2] // columns.downsampling_factor, pixels.shape[-1] // columns.downsampling_factor)
        low_res = F.interpolate(pixels.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        return {"low_res": low_res.clamp(-1, 1)}


class InpaintingMode(ConditioningMode):
    """``image`` + ``mask_image``: concat [E(masked image) * scale, mask at the latent size], the masked image with
    its holes black and the mask channel in {-1 (keep), 1 (fill)}, as CompVis' inpainting model was trained."""

    kind = "concat"
    name = "inpainting"
    inputs = ("mask_image", "image")

    def is_selected(self, values):
        if values.get("mask_image") is not None and values.get("image") is None:
            raise ValueError("mask_image was given without image: inpainting needs both.")
        return values.get("mask_image") is not None

    def batch_size(self, values):
        return image_tensor(values["image"]).shape[0]

    def check_inputs(self, pipe, values):
        """An RGB image whose sides are multiples of f, and a mask in [0, 1] of the same size: one, or one per image."""
        check_image_input("image", values["image"])
        check_image_input("mask_image", values["mask_image"], "mask")
        image = _check_rgb(values["image"])
        _check_divisible("image", tuple(image.shape[-2:]), pipe)
        mask = mask_tensor(values["mask_image"])
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask_image is {tuple(mask.shape[-2:])} but image is {tuple(image.shape[-2:])}; they must match.")
        if mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"Got {mask.shape[0]} masks (mask_image) for {image.shape[0]} images (image); pass one mask, "
                             "or one per image.")

    def output_size(self, pipe, values):
        return tuple(image_tensor(values["image"]).shape[-2:])

    cacheable = False  # a new random mask every step needs a new E(masked image)

    def training_inputs(self, batch, columns, rngs=None):
        """The training image in [-1, 1] (as ``condition`` reads a user's image) and a random box / brush-stroke
        mask per example (the paper's inpainting masks), drawn from that example's generator."""
        from ..data.masks import random_inpainting_mask

        if "pixel_values" not in batch:
            raise ValueError("Inpainting trains on pixels (each step encodes a freshly masked image); drop --cache_latents.")
        pixels = batch["pixel_values"]
        h, w = pixels.shape[-2:]
        rngs = rngs or [None] * pixels.shape[0]
        masks = torch.stack([torch.from_numpy(random_inpainting_mask(h, w, rng)) for rng in rngs])[:, None]
        return {"image": pixels, "mask_image": masks.to(pixels.device, pixels.dtype)}

    def condition(self, pipe, values, latent_size):
        from ..models.autoencoders import latent_scaling_factor

        image = image_tensor(values["image"])
        mask = mask_tensor(values["mask_image"])
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask_image is {tuple(mask.shape[-2:])} but image is {tuple(image.shape[-2:])}; they must match.")
        if mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"Got {mask.shape[0]} masks for {image.shape[0]} images.")
        device, dtype = pipe._execution_device, pipe.vae.dtype
        # as CompVis' scripts/inpaint.py builds it: the holes black (-1), the mask as -1 (keep) / 1 (fill)
        masked = ((image + 1) / 2 * (1 - mask) * 2 - 1).to(device, dtype)
        encoded = pipe.vae.encode(masked)
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        latents = latents * latent_scaling_factor(pipe.vae)
        small_mask = F.interpolate(mask.to(device, latents.dtype) * 2 - 1, size=latents.shape[-2:], mode="nearest")
        small_mask = small_mask.expand(latents.shape[0], -1, -1, -1)
        return Conditioning(concat=torch.cat([latents, small_mask], dim=1))


class SegmentationMode(ConditioningMode):
    """``segmentation_map``: class ids [B, H, W] (tensor, array or PIL 'L'/'P' image) -> one-hot, then either the
    pipeline's ``segmentation_encoder`` (a :class:`SpatialRescaler`; its input channels are the classes) or a nearest
    resize to the latent size (the classes are the UNet's concatenated channels)."""

    kind = "concat"
    name = "segmentation"
    inputs = ("segmentation_map",)

    @staticmethod
    def _ids(segmentation_map) -> torch.Tensor:
        if isinstance(segmentation_map, (list, tuple)):
            return torch.stack([SegmentationMode._ids(m)[0] for m in segmentation_map])
        if not isinstance(segmentation_map, torch.Tensor):
            segmentation_map = torch.from_numpy(np.array(segmentation_map))
        ids = segmentation_map.long()
        if ids.ndim == 2:
            ids = ids[None]
        if ids.ndim != 3:
            raise ValueError(f"segmentation_map must be [H, W] or [B, H, W] class ids, got shape {tuple(ids.shape)}.")
        return ids

    def batch_size(self, values):
        return self._ids(values["segmentation_map"]).shape[0]

    def check_inputs(self, pipe, values):
        """Integer class ids [H, W] / [B, H, W] in 0..(the UNet's concatenated channels - 1), sides multiples of f."""
        check_image_input("segmentation_map", values["segmentation_map"], "segmentation")
        ids = self._ids(values["segmentation_map"])
        _check_divisible("segmentation_map", tuple(ids.shape[-2:]), pipe)
        self._check_range(ids, pipe)

    @staticmethod
    def num_classes(pipe) -> int:
        encoder = getattr(pipe, "segmentation_encoder", None)
        return encoder.config.in_channels if encoder is not None else pipe.unet.config.in_channels - pipe.unet.config.out_channels

    @staticmethod
    def _check_range(ids, pipe):
        num_classes = SegmentationMode.num_classes(pipe)
        if ids.min() < 0 or ids.max() >= num_classes:
            raise ValueError(f"segmentation_map holds class ids {ids.min().item()}..{ids.max().item()}; "
                             f"this model knows 0..{num_classes - 1}.")

    def output_size(self, pipe, values):
        return tuple(self._ids(values["segmentation_map"]).shape[-2:])

    def dataset_columns(self, columns):
        return {columns.segmentation_column: "segmentation_map"}

    def condition(self, pipe, values, latent_size):
        ids = self._ids(values["segmentation_map"])
        self._check_range(ids, pipe)
        one_hot = F.one_hot(ids, self.num_classes(pipe)).permute(0, 3, 1, 2).float().to(pipe._execution_device)
        encoder = getattr(pipe, "segmentation_encoder", None)
        if encoder is None:
            return Conditioning(concat=F.interpolate(one_hot, size=latent_size, mode="nearest"))
        concat = encoder(one_hot.to(encoder.dtype))
        if tuple(concat.shape[-2:]) != tuple(latent_size):
            raise ValueError(f"The segmentation encoder turns a {ids.shape[-2]}x{ids.shape[-1]} map into "
                             f"{concat.shape[-2]}x{concat.shape[-1]}, but the latents are {latent_size[0]}x{latent_size[1]}: "
                             f"pass a map of the output image's size.")
        return Conditioning(concat=concat)


class SpatialRescaler(ComponentCardMixin, ModelMixin, ConfigMixin):
    """tau_theta of CompVis' semantic synthesis models: a one-hot map [B, in_channels, H, W] is resized ``n_stages``
    times by ``multiplier`` (bilinear, one stage at a time, as CompVis does: two halvings differ from one quartering),
    then mapped by a 1x1 convolution -> [B, out_channels, H * multiplier**n_stages, W * ...]."""

    @register_to_config
    def __init__(self, n_stages: int = 2, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 182,
                 out_channels: int = 3, bias: bool = False):
        super().__init__()
        if method not in ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area"):
            raise ValueError(f"method '{method}' is not an interpolation mode of torch.nn.functional.interpolate.")
        self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias) if out_channels is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.config.n_stages):
            x = F.interpolate(x, scale_factor=self.config.multiplier, mode=self.config.method)
        return x if self.channel_mapper is None else self.channel_mapper(x)

    def _card_details(self) -> CardDetails:
        """Description, tags, pipeline tag and table rows for this encoder's model card."""
        c = self.config
        return (f"The segmentation encoder tau_theta: one-hot maps [B, {c.in_channels}, H, W] -> "
                f"[B, {c.out_channels}, H * {c.multiplier ** c.n_stages:g}, W * {c.multiplier ** c.n_stages:g}], "
                "concatenated to z_t.", ["conditioning", "semantic-synthesis"], None,
                [("classes", c.in_channels), ("resize stages", c.n_stages)])
