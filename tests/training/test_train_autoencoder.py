"""The stage-1 training script, run in-process on the real emoji data at 16x16 with tiny models."""

import json

import pytest
import torch
from helpers.training import stage1_args
from safetensors.torch import load_file

from ldm_diffusers import LDMAutoencoderKL, LDMVQModel, load_autoencoder
from ldm_diffusers.training.autoencoder import _check_finite, main, parse_args

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("regularization", ["kl", "vq"])
def test_reconstruction_loss_falls_on_a_fixed_batch(emoji16, tmp_path, regularization):
    out = tmp_path / regularization
    results = main(stage1_args(
        emoji16, out, "--regularization", regularization, "-f", "2", "--max_train_samples", "4",
        "--max_train_steps", "40", "--learning_rate", "2e-3", "--disc_start", "30", "--checkpointing_steps", "100",
        "--validation_steps", "20", "--skip_rfid", "--num_vq_embeddings", "16",
    ))
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 41))
    first = sum(r["rec_loss"] for r in log[:5]) / 5
    last = sum(r["rec_loss"] for r in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert "disc_loss" in log[-1] and "disc_loss" not in log[10]  # discriminator switched on at step 30
    assert "kl_loss" in log[0] if regularization == "kl" else "perplexity" in log[0]
    # outputs: model with an estimated scaling factor, grids, metrics, tensorboard events
    model = load_autoencoder(out)
    assert isinstance(model, LDMVQModel if regularization == "vq" else LDMAutoencoderKL)
    assert model.config.scaling_factor == pytest.approx(results["scaling_factor"])
    assert model.config.scaling_factor not in (1.0, 0.18215)
    assert (out / "validation" / "reconstructions-000020.png").is_file()
    assert json.loads((out / "eval_results.json").read_text())["psnr"] == pytest.approx(results["psnr"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "validation/reconstructions" in events.Tags()["images"]
    assert "rec_loss" in events.Tags()["scalars"] and "eval/psnr" in events.Tags()["scalars"]


def _weights(path):
    return load_file(str(path))


@pytest.mark.parametrize("regularization", ["kl", "vq"])
def test_resume_equals_uninterrupted_run(emoji16, tmp_path, regularization):
    common = ["--regularization", regularization, "-f", "2", "--disc_start", "2", "--use_ema", "--perceptual_loss",
              "none", "--skip_rfid", "--checkpointing_steps", "3", "--validation_steps", "0", "--report_to", "none",
              "--num_vq_embeddings", "16", "--max_train_samples", "12"]
    straight = tmp_path / "straight"
    main(stage1_args(emoji16, straight, *common, "--max_train_steps", "7"))
    resumed = tmp_path / "resumed"
    main(stage1_args(emoji16, resumed, *common, "--max_train_steps", "4"))  # stops mid-epoch (3 batches/epoch)
    main(stage1_args(emoji16, resumed, *common, "--max_train_steps", "7", "--resume_from_checkpoint", "latest"))
    state = json.loads((resumed / "checkpoint-4" / "training_state.json").read_text())
    assert state == {"global_step": 4, "epoch": 1, "batches_in_epoch": 1}
    for name in ("model.safetensors", "model_1.safetensors"):  # autoencoder, discriminator
        a, b = _weights(straight / "checkpoint-7" / name), _weights(resumed / "checkpoint-7" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}:{key}")
    a, b = _weights(straight / "diffusion_pytorch_model.safetensors"), _weights(resumed / "diffusion_pytorch_model.safetensors")
    for key in a:  # final (EMA) weights
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    log_a, log_b = read_log(straight), read_log(resumed)
    assert [r["step"] for r in log_b] == list(range(1, 8))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_checkpoint_limit_and_no_partial_checkpoints(emoji16, tmp_path):
    out = tmp_path / "run"
    main(stage1_args(emoji16, out, "-f", "2", "--max_train_steps", "5", "--checkpointing_steps", "1",
                   "--checkpoints_total_limit", "2", "--perceptual_loss", "none", "--skip_rfid",
                   "--validation_steps", "0", "--report_to", "none"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bad_arguments_give_clear_errors(emoji16, tmp_path):
    with pytest.raises(SystemExit, match="not divisible"):
        parse_args(["--resolution", "20", "-f", "8"])
    with pytest.raises(FileNotFoundError, match="train_data_dir"):
        main(stage1_args(tmp_path / "missing", tmp_path / "o", "--max_train_steps", "1"))
    with pytest.raises(FileNotFoundError, match="Use --resume_from_checkpoint latest"):
        main(stage1_args(emoji16, tmp_path / "o2", "--max_train_steps", "1", "--perceptual_loss", "none",
                       "--resume_from_checkpoint", "checkpoint-99"))
    with pytest.raises(FloatingPointError, match="--learning_rate"):
        _check_finite(torch.tensor(float("nan")), "The autoencoder loss", 12)


def test_gradient_accumulation_matches_the_full_batch(emoji16, tmp_path):
    # VQ (deterministic encoder), no discriminator and no perceptual net: every loss term is a batch mean,
    # so two accumulated micro-batches of 2 must give the same update as one batch of 4.
    common = ["--regularization", "vq", "-f", "2", "--perceptual_loss", "none", "--disc_start", "1000",
              "--skip_rfid", "--validation_steps", "0", "--report_to", "none", "--max_train_samples", "4",
              "--max_train_steps", "3", "--num_vq_embeddings", "16", "--checkpointing_steps", "3"]
    main(stage1_args(emoji16, tmp_path / "full", *common, "--train_batch_size", "4"))
    main(stage1_args(emoji16, tmp_path / "accum", *common, "--train_batch_size", "2", "--gradient_accumulation_steps", "2"))
    a = _weights(tmp_path / "full" / "checkpoint-3" / "model.safetensors")
    b = _weights(tmp_path / "accum" / "checkpoint-3" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    log_a, log_b = read_log(tmp_path / "full"), read_log(tmp_path / "accum")
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == [1, 2, 3]


def test_perceptual_weight_default_depends_on_the_backbone(tmp_path):
    assert parse_args([]).perceptual_weight == 0.05
    weights = tmp_path / "vgg16-397923af.pth"
    weights.touch()  # parse_args only checks that the file is there
    assert parse_args(["--perceptual_loss", "lpips", "--vgg16_weights_path", str(weights)]).perceptual_weight == 1.0
    assert parse_args(["--perceptual_weight", "0.3"]).perceptual_weight == 0.3


@pytest.mark.parametrize("regularization", ["kl", "vq"])
def test_mixed_precision_training_runs(emoji16, tmp_path, regularization):
    # bf16 autocast also exists on CPU; it once broke VQ (accelerate rebuilds nested output dataclasses
    # from dicts when it converts outputs back to float32).
    results = main(stage1_args(emoji16, tmp_path / regularization, "--regularization", regularization, "-f", "2",
                             "--mixed_precision", "bf16", "--max_train_steps", "3", "--disc_start", "1",
                             "--skip_rfid", "--num_vq_embeddings", "16", "--validation_steps", "0"))
    assert results["steps"] == 3 and results["psnr"] > 0
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in read_log(tmp_path / regularization)])))
