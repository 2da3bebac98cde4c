"""The paper's released checkpoints: safe loading of CompVis ``.ckpt`` files and conversion checked against the
original code's outputs (tests/fixtures/compvis: random-weight checkpoints built by the CompVis code at reduced
widths, with its reference outputs; see its README)."""

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.paths import COMPVIS_FIXTURES
from safetensors.torch import load_file, save_file

from ldm_diffusers import LDMAutoencoderKL, LDMVQModel
from ldm_diffusers.conditioning import InpaintingMode, SegmentationMode
from ldm_diffusers.conversion import (
    CheckpointError,
    Placeholder,
    UnsafeCheckpointError,
    convert_compvis_checkpoint,
    load_compvis_ckpt,
    state_dict_of,
)
from ldm_diffusers.conversion.first_stage import first_stage_key

FIXTURES = COMPVIS_FIXTURES
INDEX = json.loads((FIXTURES / "index.json").read_text())
AUTOENCODERS = ["kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16"]
LDMS = ["celeba256", "ffhq256", "lsun_beds256", "lsun_churches256", "cin256", "cin256-v2", "text2img256",
        "txt2img-1p4B-eval", "layout2img-openimages256", "bsr_sr", "inpainting_big", "semantic_synthesis256",
        "semantic_synthesis512"]
ALL = sorted(p.name for p in FIXTURES.iterdir() if (p / "meta.json").is_file())


def tolerance(reference: torch.Tensor) -> float:
    """The fixtures' criterion: max |ours - reference| <= 1e-3 * max(1, max |reference|)."""
    return 1e-3 * max(1.0, reference.abs().max().item())


@pytest.fixture
def checkpoints(compvis_checkpoints):
    return compvis_checkpoints


def test_all_22_fixtures_are_here():
    assert len(ALL) == 22 and set(AUTOENCODERS) <= set(ALL)


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_first_stage_autoencoders_match_the_original_code(name, checkpoints):
    model = convert_compvis_checkpoint(checkpoints / f"{name}.ckpt", FIXTURES / name / "config.yaml")
    ref = load_file(FIXTURES / name / "reference.safetensors")
    assert isinstance(model, LDMVQModel if name.startswith("vq") else LDMAutoencoderKL)
    with torch.no_grad():
        if name.startswith("kl"):
            posterior = model.encode(ref["x"]).latent_dist
            ours = {"posterior_mean": posterior.mean, "posterior_std": posterior.std,
                    "reconstruction": model.decode(posterior.mode()).sample, "decoded": model.decode(ref["z"]).sample}
        else:
            h = model.encode(ref["x"]).latents
            ours = {"h": h, "decoded": model.decode(ref["z"]).sample,  # the LDMs' decode: quantise first
                    "decoded_no_quant": model.decode(ref["z"], force_not_quantize=True).sample}
    for key, value in ours.items():
        assert value.shape == ref[key].shape, key
        error = (value - ref[key]).abs().max().item()
        assert error <= tolerance(ref[key]), (key, error)


@pytest.mark.parametrize("name", ALL)
def test_every_real_width_first_stage_key_is_mapped_or_dropped_on_purpose(name):
    """keys_real_width.json: the state dict of the same config at its released widths."""
    layout = json.loads((FIXTURES / name / "keys_real_width.json").read_text())["state_dict"]
    prefix = "" if name in AUTOENCODERS else "first_stage_model."
    keys = [key[len(prefix):] for key, _, _ in layout if key.startswith(prefix)]
    assert keys
    config = json.loads((FIXTURES / name / "meta.json").read_text())
    levels = max(int(k.split(".")[2]) for k in keys if k.startswith("encoder.down.")) + 1
    names = [first_stage_key(key, levels) for key in keys]
    assert len(set(names)) == len(names)  # one diffusers name per key
    assert config["downsampling_factor"] == 2 ** (levels - 1)


def test_unknown_first_stage_keys_are_errors_and_training_keys_are_dropped():
    assert first_stage_key("loss.discriminator.main.0.weight", 3) is None
    with pytest.raises(CheckpointError, match="Unknown first-stage key 'encoder.down.0.film.weight'"):
        first_stage_key("encoder.down.0.film.weight", 3)


# -- safe loading --------------------------------------------------------------------------------------------------
def test_the_lightning_container_loads_without_lightning(checkpoints):
    checkpoint = load_compvis_ckpt(checkpoints / "kl-f4.ckpt")
    (callback, state), = checkpoint["callbacks"].items()
    assert issubclass(callback, Placeholder) and callback._global.endswith("ModelCheckpoint")
    assert state["monitor"] == "val/rec_loss" and isinstance(state["best_model_score"], torch.Tensor)
    assert "pytorch_lightning" not in sys.modules
    tensors = state_dict_of(checkpoint)
    assert len(tensors) == len(json.loads((FIXTURES / "kl-f4" / "weights.json").read_text())["state_dict"])


def _with_pickle(valid: Path, out: Path, payload: bytes) -> Path:
    """``valid``'s torch zip container with its data.pkl replaced by ``payload``."""
    with zipfile.ZipFile(valid) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, payload if item.filename.endswith("/data.pkl") else src.read(item.filename))
    return out


class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func,global_name", [(os.system, "system"), (eval, "builtins.eval"),
                                              (subprocess.getoutput, "subprocess.getoutput")])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(checkpoints, tmp_path, func, global_name):
    marker = tmp_path / "pwned"
    command = f"open({str(marker)!r}, 'w')" if func is eval else f"touch {marker}"
    payload = pickle.dumps({"state_dict": {}, "x": _Exploit(func, command)}, protocol=4)
    crafted = _with_pickle(checkpoints / "kl-f4.ckpt", tmp_path / "evil.ckpt", payload)
    with pytest.raises(UnsafeCheckpointError, match=f"{global_name}.*refused, nothing was executed"):
        load_compvis_ckpt(crafted)
    with pytest.raises(UnsafeCheckpointError):
        convert_compvis_checkpoint(crafted, FIXTURES / "kl-f4" / "config.yaml")
    old_names = pickle.dumps({"x": _Exploit(func, command)}, protocol=2)  # Python 2 names: __builtin__, commands
    with pytest.raises(UnsafeCheckpointError):
        load_compvis_ckpt(_with_pickle(checkpoints / "kl-f4.ckpt", tmp_path / "evil2.ckpt", old_names))
    assert not marker.exists()


def test_truncated_missing_and_non_checkpoint_files_get_clear_errors(checkpoints, tmp_path):
    whole = (checkpoints / "kl-f4.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_compvis_ckpt(tmp_path / "cut.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_compvis_ckpt(tmp_path / "notes.ckpt")
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        load_compvis_ckpt(tmp_path / "absent.ckpt")
    with pytest.raises(FileNotFoundError, match="No config"):
        convert_compvis_checkpoint(checkpoints / "kl-f4.ckpt", tmp_path / "absent.yaml")
    (tmp_path / "other.yaml").write_text("model:\n  target: some.other.Model\n")
    with pytest.raises(ValueError, match="not a CompVis latent-diffusion model"):
        convert_compvis_checkpoint(checkpoints / "kl-f4.ckpt", tmp_path / "other.yaml")


def test_a_safetensors_checkpoint_converts_the_same(checkpoints, tmp_path):
    tensors = state_dict_of(load_compvis_ckpt(checkpoints / "vq-f8.ckpt"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "vq-f8.safetensors")
    a = convert_compvis_checkpoint(checkpoints / "vq-f8.ckpt", FIXTURES / "vq-f8" / "config.yaml")
    b = convert_compvis_checkpoint(tmp_path / "vq-f8.safetensors", FIXTURES / "vq-f8" / "config.yaml")
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_convert_command_writes_a_loadable_folder_with_a_model_card(checkpoints, tmp_path):
    from huggingface_hub import ModelCard

    from ldm_diffusers.cli import main

    main(["convert", str(checkpoints / "kl-f16.ckpt"), "--config", str(FIXTURES / "kl-f16" / "config.yaml"),
          "--output_dir", str(tmp_path / "kl-f16"), "--dtype", "float16"])
    loaded = LDMAutoencoderKL.from_pretrained(tmp_path / "kl-f16")
    converted = convert_compvis_checkpoint(checkpoints / "kl-f16.ckpt", FIXTURES / "kl-f16" / "config.yaml")
    for name, value in converted.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    card = ModelCard.load(tmp_path / "kl-f16" / "README.md")
    assert card.data.license == "mit" and "converted" in card.data.tags
    assert "kl-f16.ckpt" in card.text and "config.yaml" in card.text and "2112.10752" in card.text
    import hashlib

    assert hashlib.sha256((checkpoints / "kl-f16.ckpt").read_bytes()).hexdigest() in card.text
    assert not list(tmp_path.glob(".*"))  # written aside, then renamed


def test_convert_command_writes_a_pipeline_folder(checkpoints, tmp_path):
    from huggingface_hub import ModelCard

    from ldm_diffusers import LDMPipeline
    from ldm_diffusers.cli import main

    main(["convert", str(checkpoints / "cin256-v2.ckpt"), "--config", str(FIXTURES / "cin256-v2" / "config.yaml"),
          "--output_dir", str(tmp_path / "cin")])
    loaded = LDMPipeline.from_pretrained(tmp_path / "cin")
    converted = convert_compvis_checkpoint(checkpoints / "cin256-v2.ckpt", FIXTURES / "cin256-v2" / "config.yaml")
    for name in ("unet", "vae", "class_embedder"):
        ours = getattr(loaded, name).state_dict()
        for key, value in getattr(converted, name).state_dict().items():
            assert torch.equal(ours[key], value), (name, key)
    card = ModelCard.load(tmp_path / "cin" / "README.md")
    assert card.data.pipeline_tag == "unconditional-image-generation" and "converted" in card.data.tags
    assert "cin256-v2.ckpt" in card.text and "class labels" in card.text and "EMA copy" in card.text


def _assert_matches(ours: torch.Tensor, ref: dict, key: str) -> float:
    assert ours.shape == ref[key].shape, key
    error = (ours - ref[key]).abs().max().item()
    assert error <= tolerance(ref[key]), (key, error)
    return error


def _inputs(pipe, name: str, ref: dict) -> tuple[dict, torch.Tensor | None]:
    """(the pipeline's conditioning inputs in natural units, tau_theta of them) for a fixture."""
    if "cond.lr_image_u8" in ref:  # super-resolution: uint8 HWC low-resolution images, concatenated in [-1, 1]
        from PIL import Image

        from ldm_diffusers.conditioning.image_inputs import image_tensor

        images = [Image.fromarray(a.numpy()) for a in ref["cond.lr_image_u8"]]
        _assert_matches(image_tensor(images), ref, "cond.concat")
        return {"image": images}, None
    if "cond.mask_u8" in ref:  # inpainting: uint8 image and mask (255 = fill) -> [E(masked image), mask]
        from PIL import Image

        values = {"image": [Image.fromarray(a.numpy()) for a in ref["cond.image_u8"]],
                  "mask_image": [Image.fromarray(a.numpy()) for a in ref["cond.mask_u8"]]}
        _assert_matches(InpaintingMode().condition(pipe, values, None).concat, ref, "cond.concat")
        return values, None
    if "cond.segmentation_labels" in ref:  # one-hot label maps through the SpatialRescaler
        values = {"segmentation_map": ref["cond.segmentation_labels"]}
        _assert_matches(SegmentationMode().condition(pipe, values, ref["cond.concat"].shape[-2:]).concat, ref, "cond.concat")
        return values, None
    if "cond.token_ids" in ref and pipe.layout_encoder is not None:  # layouts as taming's bounding-box tokens
        layouts = json.loads((FIXTURES / name / "meta.json").read_text())["pipeline_inputs"]["layout"]
        assert torch.equal(pipe.layout_encoder.tokenize(layouts), ref["cond.token_ids"])
        return {"layout": layouts}, pipe.layout_encoder(layouts)
    if "cond.class_labels" in ref:
        return {"class_labels": ref["cond.class_labels"]}, pipe.class_embedder(ref["cond.class_labels"])
    if "cond.token_ids" in ref:
        from ldm_diffusers.conditioning.text import tokenize

        prompts = json.loads((FIXTURES / name / "meta.json").read_text())["pipeline_inputs"]["prompt"]
        assert torch.equal(tokenize(pipe.tokenizer, prompts), ref["cond.token_ids"])  # one prompt is cut at 77
        assert torch.equal(tokenize(pipe.tokenizer, ["", ""]), ref["cond.null_token_ids"])
        _assert_matches(pipe.text_encoder(ref["cond.null_token_ids"])[0], ref, "cond.null_context")
        return {"prompt": prompts}, pipe.text_encoder(ref["cond.token_ids"])[0]
    return {}, None


@pytest.mark.parametrize("name", LDMS)
def test_latent_diffusion_models_match_the_original_code(name, checkpoints, tmp_path):
    """The condition's tokens and tau_theta of it, eps_theta at two timesteps (EMA weights where there are any),
    10-step DDIM from the same x_T with and without guidance, PLMS with guidance (text models), celeba256's 7 steps
    (which CompVis runs as 8), the first stage's decode, and the same sampling after save_pretrained /
    from_pretrained."""
    from ldm_diffusers import CompVisDDIMScheduler, LDMPipeline, switch_sampler

    pipe = convert_compvis_checkpoint(checkpoints / f"{name}.ckpt", FIXTURES / name / "config.yaml")
    pipe.set_progress_bar_config(disable=True)
    ref = load_file(FIXTURES / name / "reference.safetensors")
    assert isinstance(pipe.scheduler, CompVisDDIMScheduler)
    with torch.no_grad():
        inputs, context = _inputs(pipe, name, ref)
        if context is not None:
            _assert_matches(context, ref, "cond.context")
        z_t = ref["apply_model.z_t"]
        if "cond.concat" in ref:  # the spatially aligned condition goes after z_t
            z_t = torch.cat([z_t, ref["cond.concat"]], dim=1)
        for i in (0, 1):
            eps = pipe.unet(z_t, ref[f"apply_model.{i}.t"], *([] if context is None else [context]))
            _assert_matches(eps.sample, ref, f"apply_model.{i}.eps")
        z = ref["first_stage.z"] / pipe.vae.config.scaling_factor
        _assert_matches(pipe.vae.decode(z).sample, ref, "first_stage.decoded")
        common = dict(inputs, latents=ref["ddim.x_T"], eta=0.0, output_type="latent")
        sample = pipe(**common, num_inference_steps=10, guidance_scale=1.0).images
        _assert_matches(sample, ref, "ddim.g1.latents")
        if "ddim.g3.latents" in ref:
            _assert_matches(pipe(**common, num_inference_steps=10, guidance_scale=3.0).images, ref, "ddim.g3.latents")
        else:
            with pytest.raises(ValueError, match="guidance"):
                pipe(**common, num_inference_steps=2, guidance_scale=3.0)
        if "plms.g3.latents" in ref:  # PLMS = PNDM with skip_prk_steps on the same schedule
            plms = LDMPipeline(**{**pipe.components, "scheduler": switch_sampler(pipe.scheduler, "plms")})
            plms.set_progress_bar_config(disable=True)
            _assert_matches(plms(**common, num_inference_steps=10, guidance_scale=3.0).images, ref, "plms.g3.latents")
        if "ddim_s7.g1.latents" in ref:
            _assert_matches(pipe(**common, num_inference_steps=7).images, ref, "ddim_s7.g1.latents")
            assert len(pipe.scheduler.timesteps) == 8  # CompVis: range(0, 1000, 142) + 1
        pipe.save_pretrained(tmp_path / name)
        loaded = LDMPipeline.from_pretrained(tmp_path / name)
        again = loaded(**common, num_inference_steps=10, guidance_scale=1.0).images
    assert type(loaded.scheduler) is CompVisDDIMScheduler
    assert torch.equal(again, sample)


@pytest.mark.parametrize("name", [n for n in ALL if n not in AUTOENCODERS])
def test_every_real_width_unet_key_is_mapped(name):
    """The released UNets' keys (keys_real_width.json) all find a place, and fill every weight of the UNet."""
    from ldm_diffusers.conversion.compvis import read_compvis_config
    from ldm_diffusers.conversion.unet import convert_unet_state_dict, unet_config

    params = read_compvis_config(FIXTURES / name / "config.yaml")["model"]["params"]["unet_config"]["params"]
    layout = json.loads((FIXTURES / name / "keys_real_width.json").read_text())["state_dict"]
    shapes = {key[len("model.diffusion_model."):]: torch.empty(shape, device="meta")
              for key, shape, _ in layout if key.startswith("model.diffusion_model.")}
    # the fixtures reduce only widths: take the released ones from the shapes
    params = dict(params, model_channels=shapes["input_blocks.0.0.weight"].shape[0])
    if "context_dim" in params:
        params["context_dim"] = next(v.shape[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
    unet_class, config = unet_config(params)
    mapped = convert_unet_state_dict(shapes, params)
    with torch.device("meta"):
        model = unet_class(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected


def _generate_inputs(name: str, ref: dict, folder: Path) -> list[str]:
    """``generate`` flags for a fixture's conditioning, written as the files a user would pass."""
    from PIL import Image

    if name == "bsr_sr":
        Image.fromarray(ref["cond.lr_image_u8"][0].numpy()).save(folder / "low.png")
        return ["--image", str(folder / "low.png")]
    if name == "inpainting_big":
        Image.fromarray(ref["cond.image_u8"][0].numpy()).save(folder / "image.png")
        Image.fromarray(ref["cond.mask_u8"][0].numpy()).save(folder / "mask.png")
        return ["--image", str(folder / "image.png"), "--mask_image", str(folder / "mask.png")]
    if name == "semantic_synthesis256":
        Image.fromarray(ref["cond.segmentation_labels"][0].numpy(), mode="L").save(folder / "labels.png")
        return ["--segmentation_map", str(folder / "labels.png")]
    layout = json.loads((FIXTURES / name / "meta.json").read_text())["pipeline_inputs"]["layout"][0]
    (folder / "layout.json").write_text(json.dumps(layout))
    return ["--layout", str(folder / "layout.json")]


@pytest.mark.parametrize("name,size", [("bsr_sr", 64), ("inpainting_big", 64), ("semantic_synthesis256", 32),
                                       ("layout2img-openimages256", None)])
def test_generate_reaches_every_spatial_and_layout_mode(name, size, checkpoints, tmp_path):
    """``ldm-diffusers generate`` on converted models: --image (super-resolution), --image --mask_image (inpainting),
    --segmentation_map (a label PNG), --layout (a JSON file). The output has the input's size (f=4 for bsr_sr)."""
    from PIL import Image

    from ldm_diffusers.cli import main

    convert_compvis_checkpoint(checkpoints / f"{name}.ckpt", FIXTURES / name / "config.yaml").save_pretrained(tmp_path / "m")
    flags = _generate_inputs(name, load_file(FIXTURES / name / "reference.safetensors"), tmp_path)
    size_flags = [] if size else ["--height", "32", "--width", "32"]  # a layout does not fix the size
    main(["generate", "--model", str(tmp_path / "m"), *flags, *size_flags, "--steps", "2", "--out", str(tmp_path / "o.png")])
    assert Image.open(tmp_path / "o.png").size == (size or 32, size or 32)
    with pytest.raises(SystemExit):  # none of them has an unconditional input to guide against
        main(["generate", "--model", str(tmp_path / "m"), *flags, "--guidance_scale", "3"])


def test_samplers_switch_in_on_the_checkpoints_schedule(checkpoints):
    """PLMS and DPM-Solver++ take over the converted DDIM's schedule (CompVis' alphas_cumprod, to float32) and
    sample from the same x_T."""
    from ldm_diffusers import LDMPipeline, switch_sampler

    name = "cin256-v2"
    pipe = convert_compvis_checkpoint(checkpoints / f"{name}.ckpt", FIXTURES / name / "config.yaml")
    ref = load_file(FIXTURES / name / "reference.safetensors")
    for sampler in ("plms", "dpm++"):
        scheduler = switch_sampler(pipe.scheduler, sampler)
        # diffusers multiplies the 1000 factors in float32, CompVis in float64: 1.0e-6 relative observed
        assert torch.allclose(scheduler.alphas_cumprod.float(), ref["schedule.alphas_cumprod"], rtol=1e-5, atol=0)
        other = LDMPipeline(**{**pipe.components, "scheduler": scheduler})
        other.set_progress_bar_config(disable=True)
        latents = other(class_labels=ref["cond.class_labels"], latents=ref["ddim.x_T"], num_inference_steps=10,
                        guidance_scale=3.0, output_type="latent").images
        assert latents.shape == ref["ddim.g3.latents"].shape and torch.isfinite(latents).all()
