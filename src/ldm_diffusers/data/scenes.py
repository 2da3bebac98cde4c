"""Emoji scenes: real images with exact layouts and semantic maps, for layout-to-image and
semantic-synthesis training offline.

Each scene pastes 2-4 Noto emoji (alpha-composited, random sizes and positions) on a white canvas.
A row holds

* ``image``: the RGB scene, resolution x resolution;
* ``layout``: one ``[class_id, x0, y0, x1, y1]`` per emoji, the tight box of its visible pixels in
  [0, 1] (x right, y down), class = the emoji's Unicode group (9 classes);
* ``segmentation``: an 'L' image of per-pixel class ids, 0 = background, ``1 + group id`` where an
  emoji's alpha is above one half (later pastes cover earlier ones);
* ``text``: "<name>, <name> and <name>" for the pasted emoji.

Train scenes use the emoji of the emoji dataset's train split, validation scenes its validation
emoji. The dataset is saved with ``datasets`` once per setting and reloaded from disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageFont

from ..utils.model_files import atomic_directory, publish_directory
from .emoji import (
    EMOJI_TEST_PATH,
    FONT_PATH,
    INSTALL_HINT,
    _in_validation,
    already_built,
    default_cache_dir,
    parse_emoji_test,
    render_emoji_rgba,
)

SCENES_VERSION = 1


def compose_scene(glyphs: list, resolution: int, rng: np.random.Generator, objects: tuple[int, int] = (2, 4)):
    """Paste 2-4 of ``glyphs`` (list of (RGBA image, class id, name)) on white.
    Returns (RGB image, layout [[class, x0, y0, x1, y1], ...], class-id map [R, R] uint8, names)."""
    canvas = PILImage.new("RGBA", (resolution, resolution), (255, 255, 255, 255))
    seg = np.zeros((resolution, resolution), np.uint8)
    layout, names = [], []
    for _ in range(rng.integers(objects[0], objects[1] + 1)):
        glyph, class_id, name = glyphs[rng.integers(len(glyphs))]
        size = int(rng.uniform(0.3, 0.6) * resolution)
        sprite = glyph.resize((size, size), PILImage.Resampling.LANCZOS)
        x, y = int(rng.integers(0, resolution - size + 1)), int(rng.integers(0, resolution - size + 1))
        canvas.alpha_composite(sprite, (x, y))
        alpha = np.asarray(sprite)[..., 3] > 127
        seg[y:y + size, x:x + size][alpha] = class_id + 1
        ys, xs = np.nonzero(alpha)
        if len(xs) == 0:
            continue
        box = [(x + xs.min()) / resolution, (y + ys.min()) / resolution,
               (x + xs.max() + 1) / resolution, (y + ys.max() + 1) / resolution]
        layout.append([class_id] + [round(float(v), 4) for v in box])
        names.append(name)
    return canvas.convert("RGB"), layout, seg, names


def _caption(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def build_scene_dataset(
    output_dir: str | os.PathLike | None = None,
    resolution: int = 64,
    num_train: int = 4000,
    num_validation: int = 256,
    seed: int = 0,
    validation_fraction: float = 0.1,
    overwrite: bool = False,
) -> Path:
    """Render the scenes (once per setting) into a ``datasets`` folder with train and validation splits."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    if not FONT_PATH.is_file():
        raise FileNotFoundError(f"Noto Color Emoji font not found at '{FONT_PATH}'. Install it with `{INSTALL_HINT}`.")
    settings = {"version": SCENES_VERSION, "resolution": resolution, "num_train": num_train,
                "num_validation": num_validation, "seed": seed, "validation_fraction": validation_fraction}
    output_dir = Path(output_dir) if output_dir else default_cache_dir() / f"emoji-scenes-{resolution}"
    if already_built(output_dir, "scenes_info_ldm.json", settings, overwrite):
        return output_dir

    entries = [e for e in parse_emoji_test(EMOJI_TEST_PATH) if "skin tone" not in e.name]
    groups = sorted({e.group for e in entries})
    font = ImageFont.truetype(str(FONT_PATH), 109)
    rng = np.random.default_rng(seed)
    features = Features({
        "image": Image(), "segmentation": Image(), "layout": Sequence(Sequence(Value("float32"))), "text": Value("string"),
    })
    splits = {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        pool = [e for e in entries if _in_validation(e.name, validation_fraction) == (split == "validation")]
        glyphs = []
        for entry in pool:
            glyph = render_emoji_rgba(entry.char, resolution, font)
            if glyph is not None:
                glyphs.append((glyph, groups.index(entry.group), entry.name))
        rows = {"image": [], "segmentation": [], "layout": [], "text": []}
        for _ in range(count):
            image, layout, seg, names = compose_scene(glyphs, resolution, rng)
            rows["image"].append(image)
            rows["segmentation"].append(PILImage.fromarray(seg, mode="L"))
            rows["layout"].append(layout)
            rows["text"].append(_caption(names))
        splits[split] = Dataset.from_dict(rows, features=features)
    tmp = atomic_directory(output_dir)
    DatasetDict(splits).save_to_disk(str(tmp))
    (tmp / "scenes_info_ldm.json").write_text(json.dumps({"settings": settings, "classes": groups}, indent=2))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    publish_directory(tmp, output_dir)  # replaces an older build whole
    return output_dir


def load_scene_dataset(resolution: int = 64, output_dir: str | os.PathLike | None = None, **kwargs):
    """Build (if needed) and load the scenes as a ``datasets.DatasetDict`` (train, validation)."""
    from datasets import load_from_disk

    return load_from_disk(str(build_scene_dataset(output_dir, resolution=resolution, **kwargs)))


def scene_classes(resolution: int = 64, output_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the layout classes (segmentation id = 1 + layout class; 0 = background)."""
    root = Path(output_dir) if output_dir else default_cache_dir() / f"emoji-scenes-{resolution}"
    return json.loads((root / "scenes_info_ldm.json").read_text())["classes"]
