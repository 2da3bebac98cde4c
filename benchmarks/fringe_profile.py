#!/usr/bin/env python
"""Colour fringes of an autoencoder's reconstructions, on the 343 validation emoji (64 px):

    python benchmarks/fringe_profile.py AUTOENCODER_DIR

Prints JSON: the mean absolute error of each pixel column (first 4, the middle 16 averaged, last 4), the chroma error
(the reconstruction error minus its mean over R, G, B: colour that is not in the input) in the 4 pixels right of
objects' right edges and left of their left edges, and the fraction of pixels whose chroma error exceeds 0.25
(false colour, on the [-1, 1] scale).
"""

import json
import sys

import torch
import torch.nn.functional as F

from ldm_diffusers.data.transforms import collate_pixels, image_column_of, load_image_splits, pixel_transform
from ldm_diffusers.models.autoencoders import load_autoencoder

BAND = 4


def bands(lum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [B, H, W] of the BAND pixels right of a right edge (brighter to the right: object -> background) and
    left of a left edge."""
    gx = lum[..., 1:] - lum[..., :-1]
    right, left = F.pad(gx > 0.5, (1, 0)), F.pad(gx < -0.5, (0, 1))
    band_r, band_l = torch.zeros_like(right), torch.zeros_like(left)
    width = lum.shape[-1]
    for k in range(BAND):
        band_r[..., k:] |= right[..., :width - k]
        band_l[..., :width - k] |= left[..., k:]
    return band_r, band_l


def main(path: str) -> dict:
    torch.set_num_threads(1)
    model = load_autoencoder(path).float().eval()
    _, val = load_image_splits(None, None, None, 64)
    val.set_transform(pixel_transform(image_column_of(val), 64))
    columns, images, sums = torch.zeros(64), 0, {"right": 0.0, "nr": 0, "left": 0.0, "nl": 0, "false": 0, "n": 0}
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(val, batch_size=49, collate_fn=collate_pixels):
            x = batch["pixel_values"]
            error = model(x).sample.clamp(-1, 1) - x
            columns += error.abs().mean(dim=(1, 2)).sum(0)
            images += x.shape[0]
            chroma = (error - error.mean(1, keepdim=True)).norm(dim=1)
            band_r, band_l = bands(x.mean(1))
            sums["right"] += chroma[band_r].sum().item()
            sums["nr"] += band_r.sum().item()
            sums["left"] += chroma[band_l].sum().item()
            sums["nl"] += band_l.sum().item()
            sums["false"] += (chroma > 0.25).sum().item()
            sums["n"] += chroma.numel()
    columns /= images
    right, left = sums["right"] / sums["nr"], sums["left"] / sums["nl"]
    return {"column_error_first4": [round(v, 4) for v in columns[:4].tolist()],
            "column_error_middle16": round(columns[24:40].mean().item(), 4),
            "column_error_last4": [round(v, 4) for v in columns[-4:].tolist()],
            "chroma_error_right_of_right_edges": round(right, 4), "chroma_error_left_of_left_edges": round(left, 4),
            "false_colour_fraction": round(sums["false"] / sums["n"], 4)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
