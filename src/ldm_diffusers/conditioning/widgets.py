"""The values of the web demo's widgets, and how each mode turns them into pipeline inputs.

No Gradio here (the modes build their widgets with the gradio module they are handed): the values are plain Python (strings, ints, PIL images, the image editor's
``{"background", "layers", "composite"}`` dict of PIL images, the layout table's rows), so the rules are tested
without a browser. Every refusal is an :class:`~ldm_diffusers.conditioning.base.InputError` whose message the page shows as it is.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from .base import InputError

LAYOUT_COLUMNS = ["class", "x0", "y0", "x1", "y1"]


def default_size(pipe) -> tuple[int, int]:
    """(height, width) the pipeline samples when the input does not fix it."""
    side = (pipe.unet.config.sample_size or 32) * pipe.vae_scale_factor
    return side, side


def class_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours (golden-angle hues, alternating brightness), one per class id."""
    return [tuple(round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.381966) % 1.0, 0.7, 0.95 if i % 2 else 0.7))
            for i in range(n)]


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


# -- widget values -> pipeline inputs ----------------------------------------------------------------------
def text_inputs(prompt: str | None, negative_prompt: str | None) -> dict:
    if not prompt or not prompt.strip():
        raise InputError("Type a prompt first.")
    return {"prompt": [prompt], "negative_prompt": [negative_prompt] if negative_prompt else None}


def class_inputs(class_id: int | None) -> dict:
    if class_id is None:
        raise InputError("Pick a class first.")
    return {"class_labels": [int(class_id)]}


def super_resolution_inputs(image: Image.Image | None) -> dict:
    if image is None:
        raise InputError("Upload a low-resolution image first.")
    return {"image": image.convert("RGB")}


def _rgb(image: Image.Image) -> Image.Image:
    """An RGB copy, transparent parts flattened on white."""
    if "A" not in image.getbands():
        return image.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")


def _layers(editor: dict | None) -> list[np.ndarray]:
    """The drawn layers of an image editor value as RGBA arrays [H, W, 4]."""
    return [np.asarray(layer.convert("RGBA")) for layer in (editor or {}).get("layers") or []]


def inpainting_inputs(editor: dict | None) -> dict:
    """The editor's background as ``image`` and everything drawn on it (any layer, any colour) as the
    ``mask_image`` ('L', 255 = fill in)."""
    if editor is None or editor.get("background") is None:
        raise InputError("Upload an image to inpaint first.")
    image = _rgb(editor["background"])
    drawn = np.zeros((image.height, image.width), bool)
    for layer in _layers(editor):
        if layer.shape[:2] != drawn.shape:
            raise InputError(f"The mask layer is {layer.shape[1]}x{layer.shape[0]} but the image is "
                                 f"{image.width}x{image.height}; draw the mask on the image itself.")
        drawn |= layer[..., 3] > 0
    if not drawn.any():
        raise InputError("Draw a mask first: paint over the region to fill in (nothing is drawn on the image).")
    return {"image": image, "mask_image": Image.fromarray(np.where(drawn, 255, 0).astype(np.uint8), mode="L")}


def _nearest_class(rgb: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    """Per pixel of ``rgb`` [H, W, 3], the id of the nearest colour in ``colors`` -> [H, W] int64."""
    palette = np.asarray(colors, np.int32)
    distances = ((rgb[..., None, :].astype(np.int32) - palette) ** 2).sum(-1)
    return distances.argmin(-1).astype(np.int64)


def segmentation_inputs(editor: dict | None, n_classes: int) -> dict:
    """Class ids [H, W] from the editor: the background is either a label map of class ids (a grey image whose
    values are all below ``n_classes``, as ``generate --segmentation_map`` reads) or a picture in the legend's
    colours (each pixel takes the nearest one); what is painted on top takes its colour's class."""
    if editor is None or editor.get("background") is None:
        raise InputError("Upload or draw a segmentation map first.")
    background = np.asarray(_rgb(editor["background"]))
    colors = class_colors(n_classes)
    grey = (background == background[..., :1]).all()
    if grey and background.max() < n_classes:
        ids = background[..., 0].astype(np.int64)
    else:
        ids = _nearest_class(background, colors)
    for layer in _layers(editor):
        if layer.shape[:2] != ids.shape:
            raise InputError(f"A drawn layer is {layer.shape[1]}x{layer.shape[0]} but the map is "
                                 f"{ids.shape[1]}x{ids.shape[0]}; draw on the map itself.")
        painted = layer[..., 3] > 127
        ids[painted] = _nearest_class(layer[..., :3], colors)[painted]
    return {"segmentation_map": ids}


def blank_segmentation_map(size: tuple[int, int]) -> Image.Image:
    """An all-class-0 map (in class 0's colour) of ``size`` (height, width) to draw on."""
    return Image.new("RGB", (size[1], size[0]), class_colors(1)[0])


def _number(value) -> float | None:
    """A table cell as a float, None when empty (or NaN); a ``InputError`` for anything else but a finite number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"Layout table: {value!r} is not a number.") from None
    if math.isinf(number):
        raise InputError(f"Layout table: {value!r} is not a finite number.")
    return None if math.isnan(number) else number


def layout_rows(rows) -> list[tuple[int, tuple[float, float, float, float]]]:
    """The layout table's rows ``[class, x0, y0, x1, y1]`` (coordinates in [0, 1], x right, y down) as the
    pipeline's ``(class_id, (x0, y0, x1, y1))`` pairs; empty rows are skipped, partly filled ones refused."""
    layout = []
    for number, row in enumerate(rows or [], start=1):
        cells = [_number(v) for v in list(row)[:5]] + [None] * (5 - len(row))
        if all(v is None for v in cells):
            continue
        if any(v is None for v in cells):
            raise InputError(f"Layout table, row {number}: fill in all of class, x0, y0, x1, y1.")
        if cells[0] != int(cells[0]):
            raise InputError(f"Layout table, row {number}: the class is a whole number, got {cells[0]:g}.")
        layout.append((int(cells[0]), tuple(cells[1:])))
    return layout


def layout_inputs(rows) -> dict:
    """``layout_rows`` as the pipeline's ``layout`` (which checks the classes and boxes against the model)."""
    layout = layout_rows(rows)
    if not layout:
        raise InputError("Add at least one box to the layout table: class, x0, y0, x1, y1.")
    return {"layout": [[class_id, list(box)] for class_id, box in layout]}


def layout_preview(rows, size: tuple[int, int], n_classes: int, scale: int = 4) -> Image.Image:
    """The table's boxes as outlined rectangles with their class over a blank canvas of the output ``size``
    (height, width) times ``scale``; rows that are not complete boxes of known classes are left out."""
    height, width = size[0] * scale, size[1] * scale
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    colors = class_colors(n_classes)
    for row in rows or []:
        try:
            boxes = layout_rows([row])
        except InputError:
            continue
        for class_id, (x0, y0, x1, y1) in boxes:
            if not (0 <= class_id < n_classes and 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
                continue
            box = (x0 * (width - 1), y0 * (height - 1), x1 * (width - 1), y1 * (height - 1))
            draw.rectangle(box, outline=colors[class_id], width=max(2, scale // 2))
            label = f"class {class_id}"
            draw.rectangle(draw.textbbox(box[:2], label), fill=colors[class_id])
            draw.text(box[:2], label, fill="black")
    return canvas
