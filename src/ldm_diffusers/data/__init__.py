"""Data: the built-in emoji dataset and the image transforms used for training."""

from .emoji import build_emoji_dataset, load_emoji_dataset, parse_emoji_test, render_emoji
from .transforms import collate_pixels, load_image_splits, pil_to_tensor, pixel_transform, tensor_to_pil

__all__ = [
    "build_emoji_dataset",
    "collate_pixels",
    "load_emoji_dataset",
    "load_image_splits",
    "parse_emoji_test",
    "pil_to_tensor",
    "pixel_transform",
    "render_emoji",
    "tensor_to_pil",
]
