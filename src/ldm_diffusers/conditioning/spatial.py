"""Spatially aligned conditioning, concatenated to z_t at the latent resolution (no cross-attention).

* super-resolution: the low-resolution image itself, [-1, 1], at the latent size: the output is f
  times larger (CompVis LDM-SR with f=4 upsamples by 4);
* inpainting: the stage-1 encoding of the masked image plus the mask resized to the latent size
  (mask 1 = region to fill, as in diffusers);
* semantic synthesis: the one-hot segmentation map resized (nearest) to the latent size.

None of them has an unconditional version, so classifier-free guidance does not apply.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

from .base import Conditioning, ConditioningMode

_images = VaeImageProcessor(do_resize=False)
_masks = VaeImageProcessor(do_resize=False, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def image_tensor(image) -> torch.Tensor:
    """PIL image(s), numpy array(s) in [0, 1] or a tensor in [-1, 1] -> [B, 3, H, W] in [-1, 1]."""
    return _images.preprocess(image)


def mask_tensor(mask) -> torch.Tensor:
    """Mask image(s) -> [B, 1, H, W] in {0, 1} (1 = fill)."""
    return _masks.preprocess(mask)


class SuperResolutionMode(ConditioningMode):
    """``image`` (without ``mask_image``): the low-resolution image, concatenated at the latent size."""

    kind = "concat"
    name = "super_resolution"
    inputs = ("image",)

    def is_selected(self, values):
        return values.get("image") is not None and values.get("mask_image") is None

    def batch_size(self, values):
        return image_tensor(values["image"]).shape[0]

    def output_size(self, pipe, values):
        h, w = image_tensor(values["image"]).shape[-2:]
        return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor

    def condition(self, pipe, values, latent_size):
        return Conditioning(concat=image_tensor(values["image"]).to(pipe._execution_device))

    def training_inputs(self, batch, columns, rngs=None):
        """The training image downsampled by f (bicubic, antialiased) to the latent size, in [0, 1]."""
        if "low_res" in batch:  # kept by the latent cache
            return {"image": batch["low_res"]}
        return {"image": self.cache_inputs(batch, columns)["low_res"]}

    def cache_inputs(self, batch, columns):
        pixels = batch["pixel_values"]
        size = (pixels.shape[-2] // columns.downsampling_factor, pixels.shape[-1] // columns.downsampling_factor)
        low_res = F.interpolate(pixels.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        return {"low_res": ((low_res + 1) / 2).clamp(0, 1)}


class InpaintingMode(ConditioningMode):
    """``image`` + ``mask_image``: concat [E(image * (1 - mask)) * scale, mask at the latent size]."""

    kind = "concat"
    name = "inpainting"
    inputs = ("mask_image", "image")

    def is_selected(self, values):
        if values.get("mask_image") is not None and values.get("image") is None:
            raise ValueError("mask_image was given without image: inpainting needs both.")
        return values.get("mask_image") is not None

    def batch_size(self, values):
        return image_tensor(values["image"]).shape[0]

    def output_size(self, pipe, values):
        return tuple(image_tensor(values["image"]).shape[-2:])

    cacheable = False  # a new random mask every step needs a new E(masked image)

    def training_inputs(self, batch, columns, rngs=None):
        """The training image in [0, 1] and a random box / brush-stroke mask per example (the paper's
        inpainting masks), drawn from that example's generator."""
        from ..data.masks import random_inpainting_mask

        if "pixel_values" not in batch:
            raise ValueError("Inpainting trains on pixels (each step encodes a freshly masked image); drop --cache_latents.")
        pixels = batch["pixel_values"]
        h, w = pixels.shape[-2:]
        rngs = rngs or [None] * pixels.shape[0]
        masks = torch.stack([torch.from_numpy(random_inpainting_mask(h, w, rng)) for rng in rngs])[:, None]
        return {"image": (pixels + 1) / 2, "mask_image": masks.to(pixels.device, pixels.dtype)}

    def condition(self, pipe, values, latent_size):
        from ..models.autoencoders import latent_scaling_factor

        image = image_tensor(values["image"])
        mask = mask_tensor(values["mask_image"])
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask_image is {tuple(mask.shape[-2:])} but image is {tuple(image.shape[-2:])}; they must match.")
        if mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"Got {mask.shape[0]} masks for {image.shape[0]} images.")
        device, dtype = pipe._execution_device, pipe.vae.dtype
        masked = (image * (1 - mask)).to(device, dtype)
        encoded = pipe.vae.encode(masked)
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        latents = latents * latent_scaling_factor(pipe.vae)
        small_mask = F.interpolate(mask.to(device, latents.dtype), size=latents.shape[-2:], mode="nearest")
        small_mask = small_mask.expand(latents.shape[0], -1, -1, -1)
        return Conditioning(concat=torch.cat([latents, small_mask], dim=1))


class SegmentationMode(ConditioningMode):
    """``segmentation_map``: class ids [B, H, W] (tensor, array or PIL 'L'/'P' image) -> one-hot at the
    latent size; the number of classes is the UNet's number of concatenated channels."""

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

    def output_size(self, pipe, values):
        return tuple(self._ids(values["segmentation_map"]).shape[-2:])

    def dataset_columns(self, columns):
        return {columns.segmentation_column: "segmentation_map"}

    def condition(self, pipe, values, latent_size):
        ids = self._ids(values["segmentation_map"])
        num_classes = pipe.unet.config.in_channels - pipe.unet.config.out_channels
        if ids.min() < 0 or ids.max() >= num_classes:
            raise ValueError(f"segmentation_map holds class ids {ids.min().item()}..{ids.max().item()}; "
                             f"this model knows 0..{num_classes - 1}.")
        one_hot = F.one_hot(ids, num_classes).permute(0, 3, 1, 2).float()
        small = F.interpolate(one_hot, size=latent_size, mode="nearest")
        return Conditioning(concat=small.to(pipe._execution_device))
