"""``export_compvis_checkpoint`` / ``ldm-diffusers export``: the inverse of the CompVis converter. Every fixture
(tests/fixtures/compvis) is converted, exported and converted back bit for bit; the exported checkpoint is the
fixture's own CompVis state dict (with the EMA values in the UNet's place) and the exported config says what the
fixture's says. Components the CompVis code lacks are refused by name."""


import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from helpers.models import tiny_kl
from helpers.paths import COMPVIS_FIXTURES

from ldm_diffusers import (
    ClassEmbedder,
    LayoutEncoder,
    LDMAutoencoderKL,
    LDMPipeline,
    LDMUNet2DConditionModel,
    LDMVQModel,
    convert_compvis_checkpoint,
    export_compvis_checkpoint,
    ldm_scheduler,
)
from ldm_diffusers.conversion import load_compvis_ckpt, read_compvis_config, state_dict_of
from ldm_diffusers.conversion.export import attention_heads_per_level, compvis_heads
from ldm_diffusers.conversion.unet import attention_heads

FIXTURES = COMPVIS_FIXTURES
AUTOENCODERS = ["kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16"]
EXPORTABLE = AUTOENCODERS + [
    "celeba256", "ffhq256", "lsun_beds256", "lsun_churches256", "cin256", "cin256-v2", "text2img256",
    "txt2img-1p4B-eval", "bsr_sr", "inpainting_big", "layout2img-openimages256", "semantic_synthesis256",
    "semantic_synthesis512",
]


def _config(component) -> dict:
    """A component's config without bookkeeping keys (diffusers' ``_*``, transformers' version and name)."""
    config = component.config.to_dict() if hasattr(component.config, "to_dict") else dict(component.config)
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}


def assert_same_model(a, b):
    """Same classes, bit-equal weights under the same names, equal configs, component by component."""
    parts_a = a.components if isinstance(a, LDMPipeline) else {"model": a}
    parts_b = b.components if isinstance(b, LDMPipeline) else {"model": b}
    assert {k for k, v in parts_a.items() if v is not None} == {k for k, v in parts_b.items() if v is not None}
    for name, part in parts_a.items():
        other = parts_b[name]
        if part is None:
            continue
        assert type(part) is type(other), name
        if name == "tokenizer":
            assert part.get_vocab() == other.get_vocab() and part.model_max_length == other.model_max_length
            continue
        assert _config(part) == _config(other), name
        if isinstance(part, torch.nn.Module):
            ours, theirs = part.state_dict(), other.state_dict()
            assert ours.keys() == theirs.keys(), name
            for key, value in ours.items():
                assert torch.equal(value, theirs[key]), (name, key)


def _effective_attention(params: dict, levels: int) -> set:
    """CompVis attention_resolutions that name a level (factors 1, 2, 4, ... below 2**levels)."""
    return {r for r in params.get("attention_resolutions") or [] if r < 2**levels}


def _assert_config_says_what_the_fixture_says(ours: dict, fixture: dict, checkpoint: dict):
    """The exported CompVis config against the fixture's, key by key where the fixture's is explicit, and by
    effect where CompVis has several spellings (heads, attention resolutions beyond the levels, defaults)."""
    p, q = ours["model"]["params"], fixture["model"]["params"]
    first_stage = (p, q) if "ddconfig" in q else (p["first_stage_config"]["params"], q["first_stage_config"]["params"])
    if "ddconfig" not in q:
        assert p["first_stage_config"]["target"] == q["first_stage_config"]["target"]
    for mine, theirs in (first_stage, (first_stage[0]["ddconfig"], first_stage[1]["ddconfig"])):
        for key in ("embed_dim", "n_embed", "ch", "ch_mult", "num_res_blocks", "z_channels", "resolution", "in_channels",
                    "out_ch", "double_z"):
            if key in theirs:
                assert mine[key] == theirs[key], key
    dd, dd_fixture = first_stage[0]["ddconfig"], first_stage[1]["ddconfig"]
    sizes = {dd["resolution"] // 2**i for i in range(len(dd["ch_mult"]))}
    assert set(dd["attn_resolutions"]) == sizes & set(dd_fixture["attn_resolutions"])
    assert (dd.get("attn_type") == "none") == (dd_fixture.get("attn_type", "vanilla") == "none")
    if "unet_config" not in q:
        return
    for key in ("linear_start", "linear_end", "timesteps"):
        assert p[key] == q[key], key
    scale = float(checkpoint["scale_factor"]) if q.get("scale_by_std") else q.get("scale_factor", 1.0)
    assert p["scale_factor"] == scale and p["use_ema"] is False
    cond = q["cond_stage_config"]
    unconditional = cond == "__is_unconditional__"
    key = None if unconditional else q.get("conditioning_key", "concat" if q.get("concat_mode", True) else "crossattn")
    assert p.get("conditioning_key") == key
    if isinstance(cond, str):
        assert p["cond_stage_config"] == cond
    else:
        assert p["cond_stage_config"]["target"] == cond["target"]
        for name, value in (cond.get("params") or {}).items():
            assert p["cond_stage_config"]["params"][name] == value, name
    u, v = p["unet_config"]["params"], q["unet_config"]["params"]
    for key in ("model_channels", "channel_mult", "num_res_blocks", "in_channels", "out_channels", "context_dim",
                "transformer_depth", "use_spatial_transformer", "use_scale_shift_norm", "resblock_updown"):
        if key in v:
            assert u[key] == v[key], key
    levels = len(v["channel_mult"])
    assert set(u["attention_resolutions"]) == _effective_attention(v, levels)
    widths = [v["model_channels"] * m for m in v["channel_mult"]]
    used = [w for i, w in enumerate(widths) if 2**i in _effective_attention(v, levels)] + [widths[-1]]
    assert [attention_heads(u, w) for w in used] == [attention_heads(v, w) for w in used]  # heads wherever there is attention


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_then_convert_gives_the_model_back(name, compvis_checkpoints, tmp_path):
    """convert(export(convert(fixture))) == convert(fixture) tensor for tensor and config for config; the exported
    state dict is the fixture's (the UNet's EMA values where it has an EMA copy, no model_ema.*, no loss.*), schedule
    buffers included."""
    model = convert_compvis_checkpoint(compvis_checkpoints / f"{name}.ckpt", FIXTURES / name / "config.yaml")
    checkpoint, config = export_compvis_checkpoint(model, tmp_path / "model.ckpt", tmp_path / "model.yaml")
    assert_same_model(convert_compvis_checkpoint(checkpoint, config), model)

    exported = load_compvis_ckpt(checkpoint)
    assert set(exported) == {"state_dict", "global_step"}
    fixture = state_dict_of(load_compvis_ckpt(compvis_checkpoints / f"{name}.ckpt"))
    ema = any(key.startswith("model_ema.") for key in fixture)
    expected = {key for key in fixture if not key.startswith(("model_ema.", "loss.")) and key != "scale_factor"}
    assert set(exported["state_dict"]) == expected
    for key, value in exported["state_dict"].items():
        reference = fixture["model_ema." + key[len("model."):].replace(".", "")] if ema and key.startswith("model.") \
            else fixture[key]
        assert value.dtype == reference.dtype and torch.equal(value, reference), key
    _assert_config_says_what_the_fixture_says(read_compvis_config(config),
                                              read_compvis_config(FIXTURES / name / "config.yaml"), fixture)
    assert not list(tmp_path.glob(".*"))  # written aside, then renamed


def _vq():
    """A CompVis-expressible VQ-f4 first stage (GroupNorm 32, so at least 32 channels)."""
    return LDMVQModel.from_downsampling_factor(4, latent_channels=3, base_channels=32, channel_multipliers=[1, 1, 2],
                                               layers_per_block=1, num_vq_embeddings=16, vq_embed_dim=3, sample_size=64)


def _unet(context_dim=32, **kwargs):
    """A UNet as this package builds one (``from_ldm_config`` defaults: 32 channels per head, GroupNorm 32)."""
    return LDMUNet2DConditionModel.from_ldm_config(latent_channels=3, context_dim=context_dim, base_channels=32,
                                                   channel_multipliers=(1, 2), layers_per_block=1, sample_size=16,
                                                   **kwargs)


@pytest.mark.parametrize("first_stage", ["vq", "kl"])
def test_a_class_conditional_pipeline_built_from_scratch_round_trips(first_stage, tmp_path):
    """Ours, not converted: from_ldm_config's UNet (cross-attention, num_head_channels 32), a ClassEmbedder with
    ImageNet's 1000 classes + the null class, a first stage with its latent scale, the paper's class schedule."""
    torch.manual_seed(0)
    vae = _vq() if first_stage == "vq" else LDMAutoencoderKL.from_downsampling_factor(
        4, latent_channels=3, base_channels=32, channel_multipliers=[1, 1, 2], layers_per_block=1, sample_size=64,
        scaling_factor=0.5)
    pipe = LDMPipeline(vae=vae, unet=_unet(), scheduler=ldm_scheduler("ddim", "class"),
                       class_embedder=ClassEmbedder(num_classes=1000, context_dim=32))
    export_compvis_checkpoint(pipe, tmp_path / "m.ckpt", tmp_path / "m.yaml")
    back = convert_compvis_checkpoint(tmp_path / "m.ckpt", tmp_path / "m.yaml")
    params = read_compvis_config(tmp_path / "m.yaml")["model"]["params"]
    assert params["unet_config"]["params"]["num_head_channels"] == 32
    assert params["scale_factor"] == vae.config.scaling_factor
    # the scheduler comes back as CompVis' DDIM over the same schedule
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert back.scheduler.config[key] == pipe.scheduler.config[key]
    assert_same_model(LDMPipeline(**{**back.components, "scheduler": pipe.scheduler}), pipe)
    if first_stage == "vq":  # an autoencoder folder on its own, as safetensors
        vae.save_pretrained(tmp_path / "vae")
        export_compvis_checkpoint(tmp_path / "vae", tmp_path / "ae.safetensors", tmp_path / "ae.yaml")
        assert_same_model(convert_compvis_checkpoint(tmp_path / "ae.safetensors", tmp_path / "ae.yaml"), vae)


def test_the_export_command_writes_what_convert_reads(compvis_checkpoints, tmp_path, capsys):
    from ldm_diffusers.cli import main

    model = convert_compvis_checkpoint(compvis_checkpoints / "cin256-v2.ckpt", FIXTURES / "cin256-v2" / "config.yaml")
    model.save_pretrained(tmp_path / "pipe")
    main(["export", str(tmp_path / "pipe"), "--output", str(tmp_path / "out" / "m.safetensors"),
          "--config", str(tmp_path / "out" / "m.yaml")])
    assert "m.safetensors" in capsys.readouterr().out
    assert_same_model(convert_compvis_checkpoint(tmp_path / "out" / "m.safetensors", tmp_path / "out" / "m.yaml"), model)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.safetensors", "m.yaml"]
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "absent"), "--output", str(tmp_path / "m.ckpt")])
    assert "absent: no such folder" in capsys.readouterr().err


def _bert_text_pipe():
    """A text-to-image pipeline as ``ldm-diffusers train --conditioning text`` builds it: a transformers BertModel."""
    from ldm_diffusers.conditioning import bert_tokenizer, build_text_transformer

    tokenizer = bert_tokenizer()
    encoder = build_text_transformer(tokenizer.vocab_size, 32, depth=1, num_heads=2)
    return LDMPipeline(vae=_vq(), unet=_unet(), scheduler=ldm_scheduler("ddim", "text"), tokenizer=tokenizer,
                       text_encoder=encoder)


REFUSED = {
    r"text_encoder \(BertModel\)": lambda: _bert_text_pipe(),
    r"layout_encoder \(LayoutEncoder\)": lambda: LDMPipeline(
        vae=_vq(), unet=_unet(), scheduler=ldm_scheduler(),
        layout_encoder=LayoutEncoder(num_classes=4, context_dim=32, max_objects=2, depth=1, num_heads=2)),
    r"norm_num_groups=4 .*GroupNorm of 32": lambda: LDMPipeline(
        vae=tiny_kl(4, latent_channels=3), unet=_unet(), scheduler=ldm_scheduler(),
        class_embedder=ClassEmbedder(1000, 32)),
    r"use_linear_projection=True .*1x1 convolutions": lambda: LDMPipeline(
        vae=_vq(), unet=_unet(use_linear_projection=True), scheduler=ldm_scheduler(),
        class_embedder=ClassEmbedder(1000, 32)),
    r"has_null_class=True .*class 1000 of": lambda: LDMPipeline(
        vae=_vq(), unet=_unet(), scheduler=ldm_scheduler(), class_embedder=ClassEmbedder(5, 32)),
    r"mid block UNetMidBlock2D": lambda: LDMPipeline(vae=_vq(), unet=_unet(None), scheduler=ldm_scheduler()),
    r"inpainting with a KL first stage": lambda: LDMPipeline(
        vae=LDMAutoencoderKL.from_downsampling_factor(4, latent_channels=3, base_channels=32, channel_multipliers=[1, 1, 2],
                                                      layers_per_block=1),
        unet=UNet2DModel(sample_size=16, in_channels=3 + 4, out_channels=3, block_out_channels=(32, 64),
                         layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32, attn_norm_num_groups=32),
        scheduler=ldm_scheduler()),
    r"scaling_factor=0.18215 .*LatentDiffusion config": lambda: LDMAutoencoderKL.from_downsampling_factor(
        4, base_channels=32, channel_multipliers=[1, 1, 2], layers_per_block=1, scaling_factor=0.18215),
}


@pytest.mark.parametrize("message", REFUSED)
def test_what_compvis_lacks_is_refused_by_name(message, tmp_path):
    with pytest.raises(NotImplementedError, match=message):
        export_compvis_checkpoint(REFUSED[message](), tmp_path / "m.ckpt", tmp_path / "m.yaml")
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_text_model_compvis_lacks_is_refused_by_the_command(tmp_path, capsys):
    from ldm_diffusers.cli import main

    _bert_text_pipe().save_pretrained(tmp_path / "pipe")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "pipe"), "--output", str(tmp_path / "m.ckpt")])
    assert "text_encoder (BertModel)" in capsys.readouterr().err and not (tmp_path / "m.ckpt").exists()


@pytest.mark.parametrize("scheduler,message", [
    (lambda: ldm_scheduler("ddim", "class", prediction_type="v_prediction"), "prediction_type 'v_prediction'"),
    (lambda: DDPMScheduler(beta_schedule="linear"), "beta_schedule 'linear'"),
])
def test_schedules_compvis_cannot_express_are_value_errors(scheduler, message, tmp_path):
    pipe = LDMPipeline(vae=_vq(), unet=_unet(), scheduler=scheduler(), class_embedder=ClassEmbedder(1000, 32))
    with pytest.raises(ValueError, match=message):
        export_compvis_checkpoint(pipe, tmp_path / "m.ckpt", tmp_path / "m.yaml")



def test_heads_per_level_from_every_unet_config_kind():
    """UNet2DConditionModel counts heads, UNet2DModel gives a head's width, LDMUNet2DModel counts per level; CompVis
    says num_heads (one count) or num_head_channels (one width) wherever there is attention."""
    widths = (32, 64, 128)
    cross = {"block_out_channels": widths, "cross_attention_dim": 32}
    assert attention_heads_per_level({**cross, "attention_head_dim": (1, 2, 4)}) == (1, 2, 4)
    assert attention_heads_per_level({**cross, "attention_head_dim": 8}) == (8, 8, 8)
    assert attention_heads_per_level({"block_out_channels": widths, "attention_head_dim": 32}) == (1, 2, 4)
    assert attention_heads_per_level({"block_out_channels": widths, "attention_head_dim": None}) == (1, 1, 1)
    assert attention_heads_per_level({"block_out_channels": widths, "attention_head_dim": None,
                                      "attention_head_counts": (8, 8, 8)}) == (8, 8, 8)
    assert compvis_heads(widths, (1, 2, 4), [False, True, True]) == {"num_heads": -1, "num_head_channels": 32}
    assert compvis_heads(widths, (8, 8, 8), [True, True, True]) == {"num_heads": 8, "num_head_channels": -1}
    # attention in the middle only (semantic synthesis): both fit; the levels without attention pick neither
    assert compvis_heads(widths, (1, 4, 8), [False, False, False]) == {"num_heads": -1, "num_head_channels": 16}
    with pytest.raises(NotImplementedError, match="one head count"):
        compvis_heads(widths, (2, 8, 4), [True, True, True])
