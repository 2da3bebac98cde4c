"""Tiled sampling (``pipe.enable_tiled_sampling``, ``pipe(..., tile_size=...)``): the window blending, its weights,
and every mode sampling at three times its trained size."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from helpers.models import demo_pipe, make_pipe

from ldm_diffusers.pipelines.tiling import Tiling, blend_windows, delta_border, origins


@pytest.mark.parametrize("size,tile,stride,tie", [((37, 23), (8, 8), (4, 4), False), ((24, 24), (8, 8), (4, 4), True),
                                                  ((9, 30), (8, 16), (8, 5), False)])
def test_blending_a_pointwise_map_gives_the_map(size, tile, stride, tie):
    """Window outputs of a pointwise map agree where windows overlap, so any weights that sum to one reproduce it:
    exact in float64 up to the rounding of the weighted sum (a few ulps)."""
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    tiling = Tiling(tile, stride, tie_breaker=tie)
    out = blend_windows(lambda w, origins: torch.tanh(w) * 3, x, tiling)
    torch.testing.assert_close(out, torch.tanh(x) * 3, rtol=0, atol=1e-13)
    up = blend_windows(lambda w, origins: F.interpolate(w, scale_factor=4), x, tiling, scale=4)
    torch.testing.assert_close(up, F.interpolate(x, scale_factor=4), rtol=0, atol=1e-13)


def test_every_latent_pixel_is_covered_and_windows_see_their_own_place():
    assert origins(37, 8, 4) == [0, 4, 8, 12, 16, 20, 24, 28, 29]  # the last window flush with the edge
    assert origins(24, 8, 4) == [0, 4, 8, 12, 16] and origins(8, 8, 4) == [0] and origins(5, 8, 4) == [0]
    seen = []
    x = torch.zeros(2, 1, 12, 20)
    blend_windows(lambda w, origins: seen.append((origins, tuple(w.shape))) or w, x, Tiling((8, 8), (4, 6), batch=4))
    assert seen == [([(0, 0), (0, 6), (0, 12), (4, 0)], (8, 1, 8, 8)), ([(4, 6), (4, 12)], (4, 1, 8, 8))]


def test_weights_are_the_distance_to_the_window_border_clipped():
    """CompVis' delta_border: min(i, j, h-1-i, w-1-j) as fractions of (h-1, w-1), clipped to [0.01, 0.5]."""
    h, w = 5, 9
    expected = torch.tensor([[min(i / (h - 1), j / (w - 1), 1 - i / (h - 1), 1 - j / (w - 1)) for j in range(w)]
                             for i in range(h)], dtype=torch.float64)
    torch.testing.assert_close(delta_border(h, w), expected, rtol=0, atol=1e-15)
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    x[..., :8, :] = 1.0  # two windows stacked (rows 0-7 and 8-15), each with a constant output
    out = blend_windows(lambda win, origins: torch.full_like(win, float(origins[0][0])), x, Tiling((8, 16), (8, 16), 1))
    assert torch.equal(out[..., :8, :], torch.zeros(1, 1, 8, 16, dtype=torch.float64))  # no overlap: no mixing
    assert torch.equal(out[..., 8:, :], torch.full((1, 1, 8, 16), 8.0, dtype=torch.float64))


def _count_unet_calls(pipe):
    calls = []
    forward = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(tuple(sample.shape))
        return forward(sample, *args, **kwargs)

    pipe.unet.forward = counting
    return calls


def test_an_image_within_one_window_samples_exactly_as_untiled():
    pipe = make_pipe("class")
    args = {"class_labels": [1, 3], "num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "np"}
    plain = pipe(generator=torch.Generator().manual_seed(0), **args).images
    pipe.enable_tiled_sampling()
    assert np.array_equal(pipe(generator=torch.Generator().manual_seed(0), **args).images, plain)
    pipe.disable_tiled_sampling()
    assert pipe.tiling is None


MODES = {"class": {"class_labels": [2]}, "unconditional": {}, "super_resolution": {"image": torch.rand(1, 3, 24, 24)},
         "inpainting": {"image": torch.rand(1, 3, 96, 96), "mask_image": torch.ones(1, 1, 96, 96)},
         "segmentation": {"segmentation_map": torch.randint(0, 6, (1, 96, 96))}}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_samples_three_times_its_trained_size_window_by_window(mode):
    """32 px trained (8 latent pixels): a 96 px image is 24 latent pixels, 5 x 5 windows of 8 every 4, and each
    sampler step runs eps_theta over all of them, 4 windows per call (6 x 4 + 1), with the spatial conditioning
    cut to the windows."""
    pipe = demo_pipe(mode)
    calls = _count_unet_calls(pipe)
    extra = {"height": 96, "width": 96} if mode in ("class", "unconditional") else {}
    out = pipe(num_inference_steps=2, output_type="np", tile_size=32, tile_stride=16,
               generator=torch.Generator().manual_seed(0), **MODES[mode], **extra).images
    assert out.shape == (1, 96, 96, 3) and np.isfinite(out).all()
    channels = pipe.unet.config.in_channels
    assert calls == ([(4, channels, 8, 8)] * 6 + [(1, channels, 8, 8)]) * 2


@pytest.mark.parametrize("scheduler", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_guidance_and_other_samplers_tile(scheduler):
    pipe = make_pipe("class")
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    calls = _count_unet_calls(pipe)
    pipe.enable_tiled_sampling(tile_size=32, tile_stride=24)
    out = pipe(class_labels=[0, 4], guidance_scale=3.0, num_inference_steps=2, height=64, width=48,
               output_type="np", generator=torch.Generator().manual_seed(1)).images
    assert out.shape == (2, 64, 48, 3) and np.isfinite(out).all()
    # windows at rows 0, 6, 8 and columns 0, 4: 6 windows of the [null, cond] batch of 4, 4 windows per call
    assert calls == [(16, 3, 8, 8), (8, 3, 8, 8)] * 2


def test_bad_tile_sizes_and_layouts_get_clear_errors():
    pipe = make_pipe("class")
    for size, stride, message in ((30, None, "multiple of the autoencoder's factor f=4"),
                                  (32, 36, "larger than tile_size"), (0, None, "positive multiple")):
        with pytest.raises(ValueError, match=message):
            pipe.enable_tiled_sampling(tile_size=size, tile_stride=stride)
    layout = demo_pipe("layout")  # the package's own layout encoder: boxes as embeddings, no crop tokens
    layout.enable_tiled_sampling()
    with pytest.raises(NotImplementedError, match="Tiled sampling needs crop tokens"):
        layout(layout=[(1, (0.1, 0.1, 0.5, 0.5))], height=64, width=64, num_inference_steps=1)
    assert layout(layout=[(1, (0.1, 0.1, 0.5, 0.5))], num_inference_steps=1, output_type="np").images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("vae", ["kl", "vq"])
def test_decoding_tiles_blend_the_window_decodings(vae):
    """The decoded image is the weighted blend of each latent window decoded alone (what CompVis' split
    decode_first_stage computes), at the image's scale."""
    pipe = make_pipe("class", vae=vae)
    z = torch.randn(1, 3, 16, 12)
    tiling = Tiling((8, 8), (4, 4))
    tiled = pipe.decode_latents(z, tiling)
    scale = 0.8  # make_pipe's scaling factor

    def window(zw, origins):
        return torch.cat([pipe.vae.decode(one / scale).sample for one in zw.split(1)])  # one window at a time

    torch.testing.assert_close(tiled, blend_windows(window, z, tiling, scale=4), rtol=1e-5, atol=1e-5)
    assert tiled.shape == (1, 3, 64, 48)
    torch.testing.assert_close(pipe.decode_latents(z[..., :8, :8], tiling), pipe.decode_latents(z[..., :8, :8]),
                               rtol=0, atol=0)
