"""Tiled sampling equals the original code's ``split_input_params`` at three times the trained latent size
(tests/fixtures/compvis/<name>/tiled_reference.safetensors, made by make_tiled_references.py with the CompVis
code): eps_theta at two timesteps, a 10-step DDIM trajectory and the split first-stage decode, through the
pipeline's own tiling."""

import json

import pytest
import torch
from helpers.paths import COMPVIS_FIXTURES
from PIL import Image
from safetensors.torch import load_file

from ldm_diffusers.conversion import convert_compvis_checkpoint

NAMES = ["bsr_sr", "semantic_synthesis256", "layout2img-openimages256", "inpainting_big"]


def _close(ours: torch.Tensor, ref: dict, key: str) -> None:
    """The fixtures' criterion: max |ours - reference| <= 1e-3 * max(1, max |reference|)."""
    assert ours.shape == ref[key].shape, key
    error = (ours - ref[key]).abs().max().item()
    assert error <= 1e-3 * max(1.0, ref[key].abs().max().item()), (key, error)


def _inputs(ref: dict, meta: dict) -> dict:
    """The pipeline's inputs in natural units (uint8 images as PIL, label maps, layouts)."""
    values = {}
    for name, key in meta["pipeline_inputs"].items():
        if isinstance(key, str) and key.endswith("_u8"):
            values[name] = [Image.fromarray(a.numpy()) for a in ref[key]]
        else:
            values[name] = ref[key] if isinstance(key, str) else key
    return values


@pytest.mark.parametrize("name", NAMES)
def test_tiled_sampling_matches_the_original_split_input(name, compvis_checkpoints):
    pipe = convert_compvis_checkpoint(compvis_checkpoints / f"{name}.ckpt", COMPVIS_FIXTURES / name / "config.yaml")
    pipe.set_progress_bar_config(disable=True)
    ref = load_file(COMPVIS_FIXTURES / name / "tiled_reference.safetensors")
    meta = json.loads((COMPVIS_FIXTURES / name / "tiled_meta.json").read_text())
    pipe.enable_tiled_sampling(tile_size=meta["tile_size_px"], tile_stride=meta["tile_stride_px"], tile_batch=25)
    values, size = _inputs(ref, meta), (meta["latent_side"],) * 2
    assert pipe.tiling.tile == tuple(meta["split_input_params"]["ks"])
    with torch.no_grad():
        mode = pipe.mode
        cond, _ = mode.encode(pipe, values, size)  # the call's own steps, taken one at a time
        contexts = pipe.window_contexts(mode, cond, pipe.tiling, size)
        model_input = cond.model_input(ref["apply_model.z_t"])
        for i in (0, 1):
            t = ref[f"apply_model.{i}.t"]

            def eps(windows, origins, t=t):
                if cond.context is None:
                    return pipe.unet(windows, t).sample
                context = cond.context.repeat(len(origins), 1, 1) if contexts is None else contexts(origins)
                return pipe.unet(windows, t, context).sample

            _close(pipe.tiled(eps, model_input, pipe.tiling), ref, f"apply_model.{i}.eps")
        steps = []
        latents = pipe(**values, latents=ref["ddim.x_T"], num_inference_steps=10, eta=0.0, output_type="latent",
                       callback_on_step_end=lambda p, i, t, kw: steps.append(kw["latents"]) or kw).images
        _close(latents, ref, "ddim.latents")
        _close(torch.stack([ref["ddim.x_T"], *steps]), ref, "ddim.x_inter")
        _close(pipe.decode_latents(ref["first_stage.z"], pipe.tiling), ref, "first_stage.decoded")
