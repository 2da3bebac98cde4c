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

from dataclasses import dataclass
from collections.abc import Callable

import torch


@dataclass(frozen=True)
class Tiling:
    """Latent windows: ``tile`` and ``stride`` in latent pixels (h, w); CompVis' weight clipping."""

    tile: tuple[int, int]
    stride: tuple[int, int]
    clip_min_weight: float = 0.01
    clip_max_weight: float = 0.5
    tie_breaker: bool = False
    clip_min_tie_weight: float = 0.01
    clip_max_tie_weight: float = 0.5

    def covers(self, height: int, width: int) -> bool:
        """Whether one window holds a latent of this size (then nothing is tiled)."""
        return height <= self.tile[0] and width <= self.tile[1]


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


def blend_windows(fn: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor], x: torch.Tensor, tiling: Tiling,
                  scale: int = 1) -> torch.Tensor:
    """fn(window of x [B, C, th, tw], (top, left) in latent pixels) -> [B, C', th * scale, tw * scale], applied to
    every window of x [B, C, h, w] and blended with CompVis' weights into [B, C', h * scale, w * scale]."""
    height, width = x.shape[-2:]
    tile = (min(tiling.tile[0], height), min(tiling.tile[1], width))
    tiling = Tiling(tile, tiling.stride, tiling.clip_min_weight, tiling.clip_max_weight, tiling.tie_breaker,
                    tiling.clip_min_tie_weight, tiling.clip_max_tie_weight)
    tops, lefts = origins(height, tile[0], tiling.stride[0]), origins(width, tile[1], tiling.stride[1])
    weight = window_weights(tiling, scale, len(tops), len(lefts))
    total = norm = None
    for row, top in enumerate(tops):
        for col, left in enumerate(lefts):
            out = fn(x[..., top:top + tile[0], left:left + tile[1]], (top, left))
            w = weight(row, col).to(out.device, out.dtype)
            if total is None:
                total = out.new_zeros(*out.shape[:-2], height * scale, width * scale)
                norm = out.new_zeros(height * scale, width * scale)
            rows = slice(top * scale, (top + tile[0]) * scale)
            cols = slice(left * scale, (left + tile[1]) * scale)
            total[..., rows, cols] += out * w
            norm[rows, cols] += w
    return total / norm


class TiledSamplingMixin:
    """``enable_tiled_sampling`` / ``disable_tiled_sampling`` and the per-call ``tile_size`` of
    :class:`~ldm_diffusers.LDMPipeline` (which provides ``unet``, ``vae_scale_factor``)."""

    tiling: Tiling | None = None

    def enable_tiled_sampling(self, tile_size: int | None = None, tile_stride: int | None = None,
                              tie_breaker: bool = False) -> None:
        """Denoise and decode latents larger than one window in overlapping windows, blended as the original
        code's ``split_input_params``. ``tile_size`` / ``tile_stride`` in image pixels, multiples of the
        autoencoder's f (default: the UNet's trained size, and half of it: the CompVis notebook's 128 / 64 latent
        pixels at its scale). Images no larger than one window are sampled exactly as without tiling."""
        self.tiling = self.tiling_for(tile_size, tile_stride, tie_breaker)

    def disable_tiled_sampling(self) -> None:
        """Back to one pass over the whole latent."""
        self.tiling = None

    def tiling_for(self, tile_size: int | None, tile_stride: int | None, tie_breaker: bool = False) -> Tiling:
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
        return Tiling((tile // f, tile // f), (stride // f, stride // f), tie_breaker=tie_breaker)

    def call_tiling(self, tile_size: int | None, tile_stride: int | None, mode, latent_size: tuple[int, int]):
        """The tiling of one call: its ``tile_size`` / ``tile_stride`` if given, else the pipeline's; refused for a
        mode whose cross-attention tokens depend on the window when the latent needs more than one."""
        tiling = self.tiling if tile_size is None and tile_stride is None else self.tiling_for(tile_size, tile_stride)
        if tiling is not None and not tiling.covers(*latent_size) and not mode.same_context_per_window:
            raise NotImplementedError(f"Tiled sampling of {mode.name} models (cross-attention tokens that depend on "
                                      f"the window) is not implemented; sample at most "
                                      f"{tiling.tile[0] * self.vae_scale_factor} px.")
        return tiling

    @staticmethod
    def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiling: Tiling | None,
              scale: int = 1) -> torch.Tensor:
        """fn(x), or fn over ``tiling``'s windows of x blended (``scale``: output pixels per latent pixel)."""
        if tiling is None or tiling.covers(*x.shape[-2:]):
            return fn(x)
        return blend_windows(lambda window, _origin: fn(window), x, tiling, scale)
