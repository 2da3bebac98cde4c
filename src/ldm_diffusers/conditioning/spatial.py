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

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging

from ..data.masks import random_inpainting_mask
from ..data.scenes import scene_classes
from ..models.autoencoders import latent_scaling_factor
from ..models.unet import unet_cross_attends
from ..utils.arguments import positive_int
from ..utils.model_cards import CardDetails, ComponentCardMixin
from . import widgets
from .base import Conditioning, ConditioningMode, Encoders, add_argument_once, conditioning_encoders, is_real
from .image_inputs import check_divisible, check_image_input, check_rgb, gaussian_blur, image_tensor, mask_tensor

logger = logging.get_logger(__name__)


def concat_channels(pipe) -> int:
    """Channels the UNet takes besides z_t, or -1 where it also cross-attends (no spatial mode alone)."""
    config = pipe.unet.config
    return -1 if unet_cross_attends(config) else config.in_channels - config.out_channels


def add_image_arguments(parser) -> None:
    add_argument_once(parser, "--image", default=None,
                      help="Input image: the low-resolution image for a super-resolution model, the image to fill for "
                           "an inpainting model (with --mask_image).")


def open_image(flag: str, path: str, mode: str) -> PIL.Image.Image:
    """The image file ``path`` of ``flag``, converted to ``mode``, or a ``ValueError`` naming the flag."""
    try:
        return PIL.Image.open(path).convert(mode)
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise ValueError(f"{flag} {path}: not an image file ({err}).") from None


class SuperResolutionMode(ConditioningMode):
    """``image`` (without ``mask_image``): the low-resolution image, concatenated at the latent size."""

    kind = "concat"
    name = "super_resolution"
    inputs = ("image",)
    title = "super-resolution"
    conditioned_on = "a low-resolution image"
    usage = "image = pipe(image=low_res_image).images[0]"
    compvis_cond_stage_key = "LR_image"
    default_eta = 1.0  # CompVis' super-resolution notebook samples with DDIM eta 1 (deterministic DDIM speckles)

    def recognises(self, pipe):
        return concat_channels(pipe) == pipe.vae.config.in_channels and not conditioning_encoders(pipe)

    def build_encoders(self, args, train_ds, vae):
        return Encoders(concat_channels=vae.config.in_channels)

    def add_generate_arguments(self, parser):
        add_image_arguments(parser)

    def generate_inputs(self, args):
        if args.image is None or getattr(args, "mask_image", None) is not None:
            return None
        return {"image": open_image("--image", args.image, "RGB")}

    def command_words(self, inputs, folder):
        inputs["image"].save(Path(folder) / "image.png")
        return ["--image", "image.png"]

    def demo_inputs(self, gr, pipe):
        image = gr.Image(type="pil", image_mode="RGB", sources=["upload", "clipboard"], format="png", height=256,
                         label=f"Low-resolution image (the result is {pipe.vae_scale_factor}x larger)",
                         elem_id="low-res")
        return [image], widgets.super_resolution_inputs

    def is_selected(self, values):
        return values.get("image") is not None and values.get("mask_image") is None

    def batch_size(self, values):
        return image_tensor(values["image"]).shape[0]

    def check_inputs(self, pipe, values):
        """An RGB low-resolution image (or batch) of a valid type and range."""
        check_image_input("image", values["image"])
        check_rgb(values["image"])

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
    inputs = ("mask_image", "image", "keep_unmasked", "mask_blur")
    title = "inpainting"
    conditioned_on = "an image and a mask of the region to fill"
    usage = "image = pipe(image=image, mask_image=mask).images[0]"
    compvis_cond_stage_key = "masked_image"

    def recognises(self, pipe):
        return concat_channels(pipe) == pipe.unet.config.out_channels + 1 and not conditioning_encoders(pipe)

    def build_encoders(self, args, train_ds, vae):
        return Encoders(concat_channels=vae.latent_channels_for_diffusion + 1)

    def add_generate_arguments(self, parser):
        add_image_arguments(parser)
        parser.add_argument("--mask_image", default=None, help="Inpainting mask (white = fill in), same size as --image.")

    def generate_inputs(self, args):
        if args.mask_image is None:
            return None
        if args.image is None:
            raise ValueError("--mask_image needs --image (the image whose masked part is filled in).")
        return {"image": open_image("--image", args.image, "RGB"),
                "mask_image": open_image("--mask_image", args.mask_image, "L")}

    def command_words(self, inputs, folder):
        inputs["image"].save(Path(folder) / "image.png")
        inputs["mask_image"].save(Path(folder) / "mask.png")
        return ["--image", "image.png", "--mask_image", "mask.png"]

    def demo_inputs(self, gr, pipe):
        editor = gr.ImageEditor(
            type="pil", image_mode="RGBA", sources=["upload", "clipboard"], format="png", transforms=(), layers=False,
            brush=gr.Brush(max(2, min(widgets.default_size(pipe)) // 8), colors=["#ff00ff"], color_mode="fixed"),
            label="Upload an image (any size: larger ones are sampled in windows), then paint over the region to "
                  "fill in", elem_id="inpaint-editor")
        return [editor], widgets.inpainting_inputs

    def finish(self, pipe, values, images):
        """Outside the mask the user's pixels, as CompVis' scripts/inpaint.py pastes them back (``keep_unmasked=False``
        keeps the decoded image whole); ``mask_blur`` > 0 (pixels, default 0 as CompVis) softens the seam with a
        Gaussian of that standard deviation, the filled region staying generated. A padded image is cropped back to
        its size."""
        image = image_tensor(values["image"]).to(images)
        images = images[..., :image.shape[-2], :image.shape[-1]]  # the padding off
        if values.get("keep_unmasked") is False:
            return images
        mask = mask_tensor(values["mask_image"]).to(images).ge(0.5).to(images.dtype)
        blur = values.get("mask_blur") or 0
        if blur:
            mask = torch.maximum(mask, gaussian_blur(mask, blur))
        repeat = images.shape[0] // image.shape[0]  # num_images_per_prompt
        image, mask = image.repeat_interleave(repeat, 0), mask.expand(image.shape[0], -1, -1, -1).repeat_interleave(repeat, 0)
        return (1 - mask) * image + mask * images

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
        image = check_rgb(values["image"])
        mask = mask_tensor(values["mask_image"])
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask_image is {tuple(mask.shape[-2:])} but image is {tuple(image.shape[-2:])}; they must match.")
        if mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"Got {mask.shape[0]} masks (mask_image) for {image.shape[0]} images (image); pass one mask, "
                             "or one per image.")
        blur, keep = values.get("mask_blur"), values.get("keep_unmasked")
        if blur is not None and (not is_real(blur) or not 0 <= blur <= 64):
            raise ValueError(f"mask_blur must be a number of pixels in 0..64 (0: a hard seam, as CompVis), got {blur!r}.")
        if keep is not None and not isinstance(keep, bool):
            raise TypeError(f"keep_unmasked must be True (paste the known pixels back) or False, got {keep!r}.")

    @staticmethod
    def padding(pipe, size) -> tuple[int, int]:
        """(bottom, right) pixels that bring ``size`` (height, width) to sides the model takes: multiples of the
        autoencoder's f times the UNet's downsampling (2 ** (levels - 1))."""
        levels = len(pipe.vae.config.block_out_channels) + len(pipe.unet.config.block_out_channels) - 2
        multiple = 2 ** levels  # f = 2 ** (vae levels - 1) times the UNet's 2 ** (levels - 1)
        return -size[0] % multiple, -size[1] % multiple

    def output_size(self, pipe, values):
        """The image's size, padded to sides the model takes (the result is cropped back in :meth:`finish`)."""
        h, w = image_tensor(values["image"]).shape[-2:]
        pad = self.padding(pipe, (h, w))
        return h + pad[0], w + pad[1]

    cacheable = False  # a new random mask every step needs a new E(masked image)

    def training_inputs(self, batch, columns, rngs=None):
        """The training image in [-1, 1] (as ``condition`` reads a user's image) and a random box / brush-stroke
        mask per example (the paper's inpainting masks), drawn from that example's generator."""
        if "pixel_values" not in batch:
            raise ValueError("Inpainting trains on pixels (each step encodes a freshly masked image); drop --cache_latents.")
        pixels = batch["pixel_values"]
        h, w = pixels.shape[-2:]
        rngs = rngs or [None] * pixels.shape[0]
        masks = torch.stack([torch.from_numpy(random_inpainting_mask(h, w, rng)) for rng in rngs])[:, None]
        return {"image": pixels, "mask_image": masks.to(pixels.device, pixels.dtype)}

    def condition(self, pipe, values, latent_size):
        image = image_tensor(values["image"])
        mask = mask_tensor(values["mask_image"])
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask_image is {tuple(mask.shape[-2:])} but image is {tuple(image.shape[-2:])}; they must match.")
        if mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"Got {mask.shape[0]} masks for {image.shape[0]} images.")
        pad = self.padding(pipe, image.shape[-2:])
        if any(pad):  # the image's edge repeated, marked as known; cropped off in finish()
            logger.warning(f"inpainting: the {image.shape[-1]}x{image.shape[-2]} image is padded to "
                           f"{image.shape[-1] + pad[1]}x{image.shape[-2] + pad[0]} (sides the autoencoder and UNet "
                           "take) and the result cropped back.")
            image = F.pad(image, (0, pad[1], 0, pad[0]), mode="replicate")
            mask = F.pad(mask, (0, pad[1], 0, pad[0]))
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
    title = "semantic synthesis"
    conditioned_on = "segmentation maps"
    usage = "image = pipe(segmentation_map=label_map).images[0]"
    default_dataset = "emoji-scenes"
    compvis_cond_stage_key = "segmentation"

    def recognises(self, pipe):
        """A segmentation encoder, or channels that no other spatial mode of a pipeline without encoders takes
        (the super-resolution and inpainting modes are asked first)."""
        return getattr(pipe, "segmentation_encoder", None) is not None or (
            concat_channels(pipe) > 0 and not conditioning_encoders(pipe))

    def add_training_arguments(self, group):
        group.add_argument("--num_segmentation_classes", type=positive_int, default=None,
                           help="Segmentation mode: classes of the maps, background included (default: from "
                                "emoji-scenes).")
        group.add_argument("--segmentation_column", default="segmentation", help="Segmentation mode: the map column.")

    def build_encoders(self, args, train_ds, vae):
        classes = args.num_segmentation_classes
        if not classes and args.dataset_name == "emoji-scenes":
            classes = len(scene_classes(args.resolution)) + 1
        if not classes:
            raise SystemExit("Pass --num_segmentation_classes (the classes of your semantic maps, background included).")
        return Encoders(concat_channels=classes)

    def add_generate_arguments(self, parser):
        parser.add_argument("--segmentation_map", default=None,
                            help="For a semantic-synthesis model: a label map of class ids, a single-channel PNG ('L', "
                                 "'P' or 'I' mode) or a .npy integer array [H, W]; the image has its size.")

    def generate_inputs(self, args):
        """A label map of class ids from a .npy file (integers, no pickles) or a single-channel image."""
        path = args.segmentation_map
        if path is None:
            return None
        try:
            label_map = np.load(path, allow_pickle=False) if path.endswith(".npy") else PIL.Image.open(path)
        except (ValueError, OSError, PIL.UnidentifiedImageError) as err:
            raise ValueError(f"--segmentation_map {path}: not a .npy array or an image ({err}).") from None
        return {"segmentation_map": label_map}

    def command_words(self, inputs, folder):
        ids = np.asarray(inputs["segmentation_map"])
        if ids.max() > 255:
            raise ValueError(f"segmentation_map has class ids up to {ids.max()}; an 'L' PNG holds 0..255.")
        PIL.Image.fromarray(ids.astype(np.uint8), mode="L").save(Path(folder) / "segmentation.png")
        return ["--segmentation_map", "segmentation.png"]

    def demo_inputs(self, gr, pipe):
        size, n = widgets.default_size(pipe), self.num_classes(pipe)
        colors = [widgets.hex_color(c) for c in widgets.class_colors(n)]
        editor = gr.ImageEditor(
            value={"background": widgets.blank_segmentation_map(size), "layers": [], "composite": None},
            type="pil", image_mode="RGBA", sources=["upload", "clipboard"], format="png", transforms=(), layers=False,
            brush=gr.Brush(max(2, min(size) // 8), colors=colors, default_color=colors[min(1, n - 1)],
                           color_mode="fixed"),
            label="Segmentation map: paint classes in the legend's colours, or upload a label map of class ids",
            elem_id="segmentation-editor")
        legend = " ".join(f'<span style="color:{c}">&#9632;</span>&nbsp;class&nbsp;{i}' for i, c in enumerate(colors))
        gr.HTML(f"<div>{legend}</div>", elem_id="segmentation-legend")
        return [editor], lambda value: widgets.segmentation_inputs(value, n)

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
        check_divisible("segmentation_map", tuple(ids.shape[-2:]), pipe)
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
