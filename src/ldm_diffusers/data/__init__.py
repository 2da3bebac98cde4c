"""Data: the built-in emoji dataset and the image transforms used for training."""

from .emoji import build_emoji_dataset, load_emoji_dataset, parse_emoji_test, render_emoji
from .masks import random_inpainting_mask
from .scenes import build_scene_dataset, compose_scene, load_scene_dataset
from .transforms import (
    collate_examples,
    collate_pixels,
    example_transform,
    load_image_splits,
    load_pixels,
    pil_to_tensor,
    pixel_transform,
    tensor_to_pil,
)

__all__ = [
    "build_emoji_dataset",
    "build_scene_dataset",
    "collate_examples",
    "compose_scene",
    "example_transform",
    "load_scene_dataset",
    "random_inpainting_mask",
    "collate_pixels",
    "load_emoji_dataset",
    "load_image_splits",
    "load_pixels",
    "parse_emoji_test",
    "pil_to_tensor",
    "pixel_transform",
    "render_emoji",
    "tensor_to_pil",
]
