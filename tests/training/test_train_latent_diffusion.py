"""The stage-2 training script, run in-process on real data (emoji at 16x16, emoji scenes) with tiny models."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.training import read_log, stage2_args
from safetensors.torch import load_file

from ldm_diffusers import LDMPipeline
from ldm_diffusers.conditioning import ClassMode, LayoutMode, TextMode
from ldm_diffusers.losses.diffusion import draw_noise, example_generators
from ldm_diffusers.training.latent_diffusion import main, parse_args

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def scenes16(tmp_path_factory):
    from ldm_diffusers.data import build_scene_dataset

    return build_scene_dataset(tmp_path_factory.mktemp("scenes") / "scenes16", resolution=16, num_train=16, num_validation=4)


MODE_ARGS = {
    "text": [],
    "class": ["--class_column", "group_id"],
    "unconditional": [],
    "super_resolution": [],
    "inpainting": [],
    "layout": ["--num_classes", "9"],
    "segmentation": ["--num_segmentation_classes", "10"],
}


@pytest.mark.parametrize("conditioning", sorted(MODE_ARGS))
def test_every_mode_trains_and_its_loss_falls_on_a_fixed_batch(stage1, emoji16, scenes16, tmp_path, conditioning):
    data = scenes16 if conditioning in ("layout", "segmentation") else emoji16
    out = tmp_path / conditioning
    summary = main(stage2_args(stage1, data, out, "--conditioning", conditioning, "--max_train_steps", "30",
                             "--learning_rate", "2e-3", "--validation_steps", "30", *MODE_ARGS[conditioning]))
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    first = np.mean([r["loss"] for r in log[:5]])
    last = np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.8 * first, (first, last)
    # the whole pipeline is saved and samples in the mode it was trained for
    pipe = LDMPipeline.from_pretrained(out)
    assert Path(summary["validation_grid"]).is_file()
    unet = pipe.unet
    expected_concat = {"super_resolution": 3, "inpainting": 4, "segmentation": 10}.get(conditioning, 0)
    assert unet.config.in_channels - unet.config.out_channels == expected_concat
    assert (unet.context_dim is not None) == (conditioning in ("text", "class", "layout"))
    trained = load_file(out / "checkpoint-30" / "model.safetensors")
    assert any(k.startswith("encoders.") for k in trained) == (conditioning in ("text", "class", "layout"))


def test_dropout_rate_and_null_inputs():
    gens = example_generators(0, 0, torch.arange(4000))
    drop = draw_noise(gens, (3, 2, 2), 1000, 0.3)["drop"]
    assert abs(drop.float().mean().item() - 0.3) < 0.03
    again = draw_noise(example_generators(0, 0, torch.arange(4000)), (3, 2, 2), 1000, 0.3)
    assert torch.equal(again["drop"], drop)  # the same (seed, epoch, index) gives the same draws
    other_epoch = draw_noise(example_generators(0, 1, torch.arange(4000)), (3, 2, 2), 1000, 0.3)
    assert not torch.equal(other_epoch["t"], again["t"])

    mask = torch.tensor([True, False, True])
    from types import SimpleNamespace

    from ldm_diffusers import ClassEmbedder, LayoutBERTEncoder, LayoutEncoder

    pipe = SimpleNamespace(class_embedder=ClassEmbedder(num_classes=5, context_dim=4),
                           layout_encoder=LayoutEncoder(num_classes=3, context_dim=8, max_objects=2, depth=1, num_heads=2))
    assert TextMode().drop(pipe, {"prompt": ["a", "b", "c"]}, mask)["prompt"] == ["", "b", ""]
    labels = ClassMode().drop(pipe, {"class_labels": torch.tensor([1, 2, 3])}, mask)["class_labels"]
    assert labels.tolist() == [5, 2, 5]
    box = [(0, (0.1, 0.1, 0.5, 0.5))]
    assert LayoutMode().drop(pipe, {"layout": [box, box, box]}, mask)["layout"] == [[], box, []]
    # CompVis' layout model was trained without a null layout: nothing to drop to
    compvis = SimpleNamespace(layout_encoder=LayoutBERTEncoder(vocab_size=64, max_objects=2, num_classes=3, d_model=8,
                                                               num_layers=1))
    with pytest.raises(ValueError, match="no null input"):
        LayoutMode().drop(compvis, {"layout": [box, box, box]}, mask)


def test_caption_dropout_reaches_the_text_encoder(stage1, emoji16, tmp_path, monkeypatch):
    from ldm_diffusers.conditioning import text

    seen = []
    original = text.encode_prompts
    monkeypatch.setattr(text, "encode_prompts", lambda tok, enc, prompts: seen.extend(prompts) or original(tok, enc, prompts))
    main(stage2_args(stage1, emoji16, tmp_path / "o", "--max_train_steps", "25", "--conditioning_dropout_prob", "0.5",
                   "--max_train_samples", "8", "--validation_steps", "0"))
    training = seen[: 25 * 4]
    share = sum(p == "" for p in training) / len(training)
    assert 0.3 < share < 0.7, share
    assert all(p.startswith("an emoji of") for p in training if p)
    assert not (tmp_path / "o" / "validation").exists()  # --validation_steps 0: no grid, not even at the end


def test_ema_is_updated_once_per_optimizer_step_and_saved(stage1, emoji16, tmp_path):
    out = tmp_path / "ema"
    main(stage2_args(stage1, emoji16, out, "--max_train_steps", "3", "--use_ema", "--ema_decay", "0.5",
                   "--gradient_accumulation_steps", "2", "--max_train_samples", "8", "--train_batch_size", "2",
                   "--checkpointing_steps", "3"))
    ema_state = torch.load(out / "checkpoint-3" / "custom_checkpoint_0.pkl", weights_only=False)
    assert ema_state["optimization_step"] == 3  # 6 micro-batches, 3 updates
    pipe = LDMPipeline.from_pretrained(out)
    saved = list(pipe.unet.parameters())
    for shadow, param in zip(ema_state["shadow_params"], saved):
        torch.testing.assert_close(param, shadow, rtol=0, atol=0)
    raw = load_file(out / "checkpoint-3" / "model.safetensors")
    live = raw["unet.conv_in.weight"]
    assert not torch.equal(live, pipe.unet.conv_in.weight)  # EMA weights, not the live ones, were saved


def test_resume_is_exact(stage1, emoji16, tmp_path):
    extra = ["--max_train_samples", "8", "--train_batch_size", "2", "--checkpointing_steps", "2", "--use_ema",
             "--conditioning_dropout_prob", "0.5"]
    main(stage2_args(stage1, emoji16, tmp_path / "full", "--max_train_steps", "5", *extra))
    main(stage2_args(stage1, emoji16, tmp_path / "cut", "--max_train_steps", "2", *extra))  # stops mid-epoch
    main(stage2_args(stage1, emoji16, tmp_path / "cut", "--max_train_steps", "5", "--resume_from_checkpoint", "latest", *extra))
    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["loss"] for r in full] == [r["loss"] for r in cut]
    a = load_file(tmp_path / "full" / "checkpoint-5" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint-5" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("text_encoder", ["transformer", "frozen"])
def test_latent_cache_trains_exactly_like_pixels(stage1, emoji16, tmp_path, text_encoder):
    extra = ["--max_train_steps", "4", "--text_encoder", text_encoder, "--conditioning_dropout_prob", "0.5",
             "--max_train_samples", "8"]
    main(stage2_args(stage1, emoji16, tmp_path / "pixels", *extra))
    main(stage2_args(stage1, emoji16, tmp_path / "cached", "--cache_latents", *extra))
    caches = list((tmp_path / "cached" / "latent_cache").iterdir())
    assert len(caches) == 1
    from ldm_diffusers.training.latent_cache import load_latent_cache

    cache = load_latent_cache(caches[0])
    assert {"latent_mean", "latent_std", "index"} <= set(cache.column_names)
    assert ("context" in cache.column_names) == (text_encoder == "frozen")
    pixels, cached = read_log(tmp_path / "pixels"), read_log(tmp_path / "cached")
    np.testing.assert_allclose([r["loss"] for r in pixels], [r["loss"] for r in cached], rtol=1e-4)


def test_v_prediction_snr_gamma_noise_offset_and_accumulation_run(stage1, emoji16, tmp_path):
    out = tmp_path / "v"
    main(stage2_args(stage1, emoji16, out, "--max_train_steps", "2", "--prediction_type", "v_prediction",
                   "--snr_gamma", "5", "--noise_offset", "0.1", "--input_perturbation", "0.1",
                   "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "--report_to", "tensorboard"))
    assert all(np.isfinite(r["loss"]) for r in read_log(out))
    assert LDMPipeline.from_pretrained(out).scheduler.config.prediction_type == "v_prediction"
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_bad_input_gets_clear_errors(stage1, emoji16, tmp_path, capsys):
    def parser_error(argv):
        with pytest.raises(SystemExit):
            parse_args(argv)
        return capsys.readouterr().err

    assert "train-autoencoder" in parser_error(["--output_dir", str(tmp_path)])  # no stage-1 model
    vae = ["--pretrained_vae_model_name_or_path", str(stage1)]
    assert "random masks" in parser_error([*vae, "--conditioning", "inpainting", "--cache_latents"])
    assert "no null input" in parser_error([*vae, "--conditioning", "super_resolution", "--conditioning_dropout_prob", "0.1"])
    with pytest.raises(SystemExit, match="--caption_column"):
        main(stage2_args(stage1, emoji16, tmp_path / "o", "--caption_column", "nope", "--max_train_steps", "1"))
    with pytest.raises(SystemExit, match="divisible"):
        main(stage2_args(stage1, emoji16, tmp_path / "o2", "--resolution", "18", "--max_train_steps", "1"))


def test_vq_stage1_latents_train_from_pixels_and_cache(emoji16, tmp_path):
    """VQ models: the diffusion model lives on pre-quantisation latents (CompVis), scale 1.0 unless stored."""
    from helpers.models import tiny_vq

    torch.manual_seed(0)
    tiny_vq(4, latent_channels=3, vq_embed_dim=3).save_pretrained(tmp_path / "vq")
    extra = ["--max_train_steps", "3", "--max_train_samples", "8", "--conditioning", "class", "--class_column", "group_id"]
    main(stage2_args(tmp_path / "vq", emoji16, tmp_path / "pixels", *extra))
    main(stage2_args(tmp_path / "vq", emoji16, tmp_path / "cached", "--cache_latents", *extra))
    from ldm_diffusers.training.latent_cache import load_latent_cache

    cache = load_latent_cache(next((tmp_path / "cached" / "latent_cache").iterdir()))
    assert "latents" in cache.column_names and "latent_mean" not in cache.column_names
    np.testing.assert_allclose([r["loss"] for r in read_log(tmp_path / "pixels")],
                               [r["loss"] for r in read_log(tmp_path / "cached")], rtol=1e-4)
    pipe = LDMPipeline.from_pretrained(tmp_path / "cached")
    assert pipe.unet.config.out_channels == 3 and type(pipe.vae).__name__ == "LDMVQModel"


def test_evaluation_steps_save_samples_and_log_fid(stage1, emoji16, tmp_path):
    from ldm_diffusers.training.sample_evaluation import load_samples

    out = tmp_path / "eval"
    main(stage2_args(stage1, emoji16, out, "--max_train_steps", "3", "--evaluation_steps", "2",
                   "--evaluation_num_images", "4", "--evaluation_batch_size", "3"))
    saved = sorted(p.name for p in (out / "eval_samples").glob("*.npz"))
    assert saved == ["step-000002.npz", "step-000003.npz"]  # every 2 steps and at the end
    images = load_samples(out / "eval_samples" / "step-000003.npz")
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    fids = [row["eval/fid"] for row in logged if "eval/fid" in row]
    assert len(fids) == 2 and all(np.isfinite(fids)) and all(f > 0 for f in fids)
    assert all(0 <= row["eval/precision"] <= 1 for row in logged if "eval/precision" in row)


def test_stop_signal_saves_a_checkpoint_and_the_pipeline(stage1, emoji16, tmp_path, monkeypatch):
    import signal

    from ldm_diffusers.training.run_checkpoints import StopRequest

    calls = []

    def signal_at_step_two(self, accelerator):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag instead of killing pytest
        return self.requested

    monkeypatch.setattr(StopRequest, "should_stop", signal_at_step_two)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "stopped"
    summary = main(stage2_args(stage1, emoji16, out, "--max_train_steps", "50"))
    assert summary["steps"] == 2 and summary["stopped_by_signal"]
    assert (out / "checkpoint-2").is_dir() and (out / "model_index.json").is_file()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is handed back
    resumed = main(stage2_args(stage1, emoji16, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert resumed["steps"] == 3 and not resumed["stopped_by_signal"]


@pytest.fixture(scope="module")
def emoji_shards(emoji16, tmp_path_factory):
    """The first 32 training rows of ``emoji16`` as 4 parquet shards, and 8 validation rows as their own split."""
    from ldm_diffusers.data import load_image_splits

    train, val = load_image_splits(train_data_dir=str(emoji16), resolution=16)
    folder = tmp_path_factory.mktemp("shards")
    for s in range(4):
        train.select(range(s * 8, s * 8 + 8)).to_parquet(folder / f"train-{s:05d}.parquet")
    val.select(range(8)).to_parquet(folder / "validation-00000.parquet")
    return folder


def test_streaming_trains_and_resumes_exactly(stage1, emoji_shards, tmp_path):
    def run(out, steps, *extra):
        return main(stage2_args(stage1, emoji_shards, out, "--streaming", "--streaming_shuffle_buffer", "6",
                              "--max_train_samples", "32", "--max_train_steps", str(steps), "--checkpointing_steps", "5",
                              "--dataloader_num_workers", "2", *extra))

    run(tmp_path / "whole", 12)
    run(tmp_path / "cut", 5)  # stops after the step-5 checkpoint, mid-epoch (8 batches of 4 per epoch)
    run(tmp_path / "cut", 12, "--resume_from_checkpoint", "latest")
    whole, cut = read_log(tmp_path / "whole"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 13))
    np.testing.assert_array_equal([r["loss"] for r in cut], [r["loss"] for r in whole])
    a = load_file(tmp_path / "whole" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_refuses_what_a_stream_cannot_do(stage1, emoji_shards, tmp_path, capsys):
    for extra, message in ((["--cache_latents"], "--cache_latents"), (["--num_train_epochs", "2"], "--num_train_epochs")):
        with pytest.raises(SystemExit):
            parse_args(stage2_args(stage1, emoji_shards, tmp_path, "--streaming", *extra))
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_vae_model_name_or_path", str(stage1), "--streaming"])
    assert "built-in datasets" in capsys.readouterr().err
