"""Image <-> tensor conversions and dataset loading shared by the training scripts.

torchvision is deliberately absent (its PyPI wheel breaks the CPU torch): PIL and numpy do the work.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image: Image.Image, resolution: int, center_crop: bool = True, random_flip: bool = False) -> torch.Tensor:
    """RGB PIL image -> [3, resolution, resolution] float tensor in [-1, 1] (resize shorter side, crop)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left, top = random.randint(0, new_w - resolution), random.randint(0, new_h - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    arrays = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def load_image_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    resolution: int = 64,
    validation_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
):
    """(train, validation) ``datasets.Dataset`` from a Hub dataset, a local imagefolder, or the built-in
    emoji set (``dataset_name="emoji"`` or nothing). A source without a validation split gets one by a
    seeded ``train_test_split``."""
    from datasets import load_dataset

    if train_data_dir:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir '{train_data_dir}' is not a folder.")
        data = load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    elif dataset_name in (None, "emoji", "builtin:emoji"):
        from .emoji import load_emoji_dataset

        data = load_emoji_dataset(resolution=resolution)
    else:
        data = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if "train" not in data:
        raise ValueError(f"The dataset has no 'train' split (it has {list(data)}).")
    for name in ("validation", "valid", "val", "test"):
        if name in data:
            return data["train"], data[name]
    split = data["train"].train_test_split(test_size=validation_fraction, seed=seed)
    return split["train"], split["test"]


def image_column_of(dataset, image_column: str | None = None) -> str:
    """The image column: the one named, else the first column of the datasets ``Image`` type."""
    from datasets import Image as ImageFeature

    if image_column:
        if image_column not in dataset.column_names:
            raise ValueError(f"--image_column '{image_column}' not in the dataset's columns {dataset.column_names}.")
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, ImageFeature):
            return name
    raise ValueError(f"No image column among {dataset.column_names}; pass --image_column.")


def pixel_transform(image_column: str, resolution: int, center_crop: bool = True, random_flip: bool = False):
    """A ``Dataset.set_transform`` function adding ``pixel_values`` [3, R, R] in [-1, 1]."""

    def transform(batch):
        return {
            "pixel_values": [
                pil_to_tensor(img, resolution, center_crop=center_crop, random_flip=random_flip)
                for img in batch[image_column]
            ]
        }

    return transform


def collate_pixels(examples) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
