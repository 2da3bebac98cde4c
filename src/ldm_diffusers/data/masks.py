"""Random inpainting masks for training, after the paper's inpainting setup (which follows LaMa):
a mix of rectangles and thick free-form brush strokes, covering roughly 10-50 % of the image."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def _boxes(draw: ImageDraw.ImageDraw, h: int, w: int, rng: np.random.Generator) -> None:
    for _ in range(rng.integers(1, 4)):
        bw, bh = rng.integers(w // 8 + 1, w // 2 + 1), rng.integers(h // 8 + 1, h // 2 + 1)
        x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
        draw.rectangle((x0, y0, x0 + bw - 1, y0 + bh - 1), fill=255)


def _strokes(draw: ImageDraw.ImageDraw, h: int, w: int, rng: np.random.Generator) -> None:
    size = min(h, w)
    for _ in range(rng.integers(1, 4)):
        width = max(1, int(rng.uniform(0.06, 0.18) * size))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        points = [(x, y)]
        for _ in range(rng.integers(2, 6)):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * size
            x = float(np.clip(x + length * math.cos(angle), 0, w - 1))
            y = float(np.clip(y + length * math.sin(angle), 0, h - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
        for px, py in points:  # round the stroke's ends and corners
            r = width / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)


def random_inpainting_mask(height: int, width: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A mask [height, width] float32 in {0, 1} (1 = region to fill): boxes or brush strokes, each
    with probability 1/2. Never empty and never the whole image."""
    rng = rng if rng is not None else np.random.default_rng()
    while True:
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        (_boxes if rng.random() < 0.5 else _strokes)(draw, height, width, rng)
        mask = (np.asarray(canvas) > 127).astype(np.float32)
        if 0 < mask.mean() < 1:
            return mask
