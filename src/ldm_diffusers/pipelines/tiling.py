"""Sampling and decoding larger than the trained size, window by window, as the original code's
``split_input_params`` does it (``LatentDiffusion.apply_model`` / ``decode_first_stage``).

eps_theta runs on overlapping latent windows of ``tile`` x ``tile`` every ``stride`` latent pixels (the spatial
conditioning concatenated to z_t is cut to the same windows, the cross-attention context is the same for every
window); the window outputs are summed with a weight per pixel that falls off towards the window's border and
divided by the summed weights. The weight is CompVis': the distance to the nearest window border as a fraction of
the window (``delta_border``), clipped to [clip_min_weight, clip_max_weight], times, with ``tie_breaker``, the same
function of the window's place in the grid. Decoding cuts the latent the same way and blends the decoded windows
with the weights at the image's scale. Where the grid does not reach the far edge (the size minus the window is
not a multiple of the stride), one more window is placed flush with that edge, so any size is covered.

Written here because diffusers has no tiled *denoising*; its ``AutoencoderKL.enable_tiling`` blends decoded tiles
linearly (not CompVis' weighting) and its VQModel has no tiling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class Tiling:
    """Latent windows: ``tile`` and ``stride`` in latent pixels (h, w); ``batch`` windows per model call (memory
grows with it, time per window falls); CompVis' weight clipping; ``progress(n)``, if set, is told after every
model call how many windows it ran."""

    tile: tuple[int, int]
    stride: tuple[int, int]
    batch: int = 4
    clip_min_weight: float = 0.01
    clip_max_weight: float = 0.5
    tie_breaker: bool = False
    clip_min_tie_weight: float = 0.01
    clip_max_tie_weight: float = 0.5
    progress: Callable[[int], None] | None = field(default=None, compare=False, repr=False)

    def covers(self, height: int, width: int) -> bool:
        """Whether one window holds a latent of this size (then nothing is tiled)."""
        return height <= self.tile[0] and width <= self.tile[1]

    def window(self, height: int, width: int) -> tuple[int, int]:
        """The window's size on a latent of this size (no larger than the latent)."""
        return min(self.tile[0], height), min(self.tile[1], width)

    def count(self, height: int, width: int) -> int:
        """How many windows a latent of this size takes (1 where one window holds it)."""
        tile = self.window(height, width)
        return len(origins(height, tile[0], self.stride[0])) * len(origins(width, tile[1], self.stride[1]))


def delta_border(height: int, width: int) -> torch.Tensor:
    """[height, width]: each pixel's distance to the nearest border, as a fraction of the side (0 on the border,
    0.5 in the middle)."""
    y = torch.arange(height, dtype=torch.float64) / max(height - 1, 1)
    x = torch.arange(width, dtype=torch.float64) / max(width - 1, 1)
    y, x = y[:, None].expand(height, width), x[None, :].expand(height, width)
    return torch.minimum(torch.minimum(y, x), torch.minimum(1 - y, 1 - x))


def origins(size: int, tile: int, stride: int) -> list[int]:
    """Window starts along one side: 0, stride, ... while a window fits, and one flush with the far edge if the
    grid stops short of it."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def window_weights(tiling: Tiling, scale: int, rows: int, cols: int) -> Callable[[int, int], torch.Tensor]:
    """weight(row, col) -> [tile_h * scale, tile_w * scale] for the window at that grid place."""
    pixel = delta_border(tiling.tile[0] * scale, tiling.tile[1] * scale)
    pixel = pixel.clamp(tiling.clip_min_weight, tiling.clip_max_weight)
    grid = delta_border(rows, cols).clamp(tiling.clip_min_tie_weight, tiling.clip_max_tie_weight)

    def weight(row: int, col: int) -> torch.Tensor:
        return pixel * grid[row, col] if tiling.tie_breaker else pixel

    return weight


def blend_windows(fn: Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor], x: torch.Tensor, tiling: Tiling,
                  scale: int = 1) -> torch.Tensor:
    """fn(windows, origins) -> outputs, applied to the windows of x [B, C, h, w] ``tiling.batch`` at a time (the
    windows stacked along the batch: [n * B, C, th, tw], with their (top, left) in latent pixels; outputs
    [n * B, C', th * scale, tw * scale]) and blended with CompVis' weights into [B, C', h * scale, w * scale]."""
    height, width = x.shape[-2:]
    tile = tiling.window(height, width)
    tops, lefts = origins(height, tile[0], tiling.stride[0]), origins(width, tile[1], tiling.stride[1])
    weight = window_weights(replace(tiling, tile=tile), scale, len(tops), len(lefts))
    places = [(row, col, top, left) for row, top in enumerate(tops) for col, left in enumerate(lefts)]
    total = norm = None
    for start in range(0, len(places), max(1, tiling.batch)):
        chunk = places[start:start + max(1, tiling.batch)]
        windows = torch.cat([x[..., top:top + tile[0], left:left + tile[1]] for _, _, top, left in chunk])
        outputs = fn(windows, [(top, left) for _, _, top, left in chunk]).chunk(len(chunk))
        for (row, col, top, left), out in zip(chunk, outputs):
            w = weight(row, col).to(out.device, out.dtype)
            if total is None:
                total = out.new_zeros(*out.shape[:-2], height * scale, width * scale)
                norm = out.new_zeros(height * scale, width * scale)
            rows = slice(top * scale, (top + tile[0]) * scale)
            cols = slice(left * scale, (left + tile[1]) * scale)
            total[..., rows, cols] += out * w
            norm[rows, cols] += w
        if tiling.progress is not None:
            tiling.progress(len(chunk))
    return total / norm


class TiledSamplingMixin:
    """``enable_tiled_sampling`` / ``disable_tiled_sampling`` and the per-call ``tile_size`` of
    :class:`~ldm_diffusers.LDMPipeline` (which provides ``unet``, ``vae_scale_factor``)."""

    tiling: Tiling | None = None

    def enable_tiled_sampling(self, tile_size: int | None = None, tile_stride: int | None = None,
                              tie_breaker: bool = False, tile_batch: int = 4) -> None:
        """Denoise and decode latents larger than one window in overlapping windows, blended as the original
        code's ``split_input_params``. ``tile_size`` / ``tile_stride`` in image pixels, multiples of the
        autoencoder's f (default: the UNet's trained size, and half of it: the CompVis notebook's 128 / 64 latent
        pixels at its scale). ``tile_batch`` windows go through the model at once. Images no larger than one
        window are sampled exactly as without tiling."""
        self.tiling = self.tiling_for(tile_size, tile_stride, tie_breaker, tile_batch)

    def disable_tiled_sampling(self) -> None:
        """Back to one pass over the whole latent."""
        self.tiling = None

    def tiling_for(self, tile_size: int | None, tile_stride: int | None, tie_breaker: bool = False,
                   tile_batch: int = 4) -> Tiling:
        """The latent windows for ``tile_size`` / ``tile_stride`` pixels (see :meth:`enable_tiled_sampling`)."""
        f = self.vae_scale_factor
        trained = self.unet.config.sample_size
        trained = trained if isinstance(trained, int) else min(trained)
        tile = trained * f if tile_size is None else tile_size
        stride = tile // 2 if tile_stride is None else tile_stride
        for name, value in (("tile_size", tile), ("tile_stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < f or value % f:
                raise ValueError(f"{name} must be a positive multiple of the autoencoder's factor f={f} (pixels), "
                                 f"got {value!r}.")
        if stride > tile:
            raise ValueError(f"tile_stride={stride} is larger than tile_size={tile}: the windows would leave gaps.")
        if not isinstance(tile_batch, int) or tile_batch < 1:
            raise ValueError(f"tile_batch must be a positive int (windows per model call), got {tile_batch!r}.")
        return Tiling((tile // f, tile // f), (stride // f, stride // f), tile_batch, tie_breaker=tie_breaker)

    def call_tiling(self, tile_size: int | None, tile_stride: int | None) -> Tiling | None:
        """The tiling of one call: its ``tile_size`` / ``tile_stride`` if given, else the pipeline's."""
        return self.tiling if tile_size is None and tile_stride is None else self.tiling_for(tile_size, tile_stride)

    def window_contexts(self, mode, cond, tiling: Tiling | None, latent_size: tuple[int, int]):
        """origins -> the cross-attention tokens of those windows stacked along the batch (each computed once per
        call), for modes whose tokens depend on the window (CompVis' layout crop tokens); None where every window
        shares the call's tokens."""
        if tiling is None or tiling.covers(*latent_size) or mode.same_context_per_window:
            return None
        height, width = latent_size
        tile = tiling.window(height, width)
        cache = {}

        def context_at(origin: tuple[int, int]) -> torch.Tensor:
            if origin not in cache:
                top, left = origin
                box = (left / width, top / height, tile[1] / width, tile[0] / height)
                cache[origin] = mode.window_context(self, cond, box)
            return cache[origin]

        return lambda places: torch.cat([context_at(origin) for origin in places])

    @staticmethod
    def tiled(fn: Callable[[torch.Tensor, list[tuple[int, int]] | None], torch.Tensor], x: torch.Tensor,
              tiling: Tiling | None, scale: int = 1) -> torch.Tensor:
        """fn(x, None), or fn(windows, origins) over ``tiling``'s windows of x (stacked along the batch, see
        :func:`blend_windows`), blended (``scale``: output pixels per latent pixel)."""
        if tiling is None or tiling.covers(*x.shape[-2:]):
            return fn(x, None)
        return blend_windows(fn, x, tiling, scale)
