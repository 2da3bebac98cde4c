"""kill -9 at any moment loses nothing: both training loops, SIGKILLed again and again and resumed with
``--resume_from_checkpoint latest``, end with the same weights as an uninterrupted run, bit for bit.

Kills land while the latent cache is written, while checkpoints are written, at random times and while the final
model is written (tests/helpers/kill9.py watches the temporary folders). Every run, killed or not, uses one thread, so the
uninterrupted reference computes exactly alike.
"""

import json
import random
import time

import pytest
import torch
from helpers import kill9
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def ctx():
    return kill9.context()


def weights(out, loop):
    files = [out / "diffusion_pytorch_model.safetensors"] if loop == "stage1" else sorted(out.glob("*/*.safetensors"))
    assert files
    return {f"{f.relative_to(out)}:{name}": t for f in files for name, t in load_file(f).items()}


def chaos(ctx, loop, argv, tmp_path, seed, cache=False):
    """A reference run, then the same run killed at >= 10 moments and resumed each time; returns the outcomes."""
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    start = time.monotonic()
    reference = kill9.run(ctx, loop, [*argv, "--output_dir", str(ref_out)], ref_out, tmp_path / "reference.log", None)
    duration = time.monotonic() - start
    assert reference.exitcode == 0, (tmp_path / "reference.log").read_text()[-3000:]

    rng = random.Random(seed)
    resumed = [*argv, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    outcomes = []
    for i, plan in enumerate(kill9.chaos_plans(rng, duration, cache)):
        outcome = kill9.run(ctx, loop, resumed, out, tmp_path / f"run-{i}.log", plan)
        assert outcome.killed or outcome.exitcode == 0, (tmp_path / f"run-{i}.log").read_text()[-3000:]
        outcomes.append(outcome)
    final = kill9.run(ctx, loop, resumed, out, tmp_path / "final.log", None)
    assert final.exitcode == 0, (tmp_path / "final.log").read_text()[-3000:]

    kills = [o for o in outcomes if o.killed]
    report = "\n".join(kill9.killed_line(o) for o in kills)
    print(f"\n{loop}: {len(kills)} kills survived\n{report}")
    assert len(kills) >= 10, report
    kinds = {kind for o in kills for kind in o.writing}  # what was half-written at some kill
    assert {"checkpoint", "final model"} | ({"latent cache"} if cache else set()) <= kinds
    a, b = weights(ref_out, loop), weights(out, loop)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not list(out.glob(".*")) + list(out.glob("latent_cache/.*"))  # no temporary folder or marker left
    return ref_out, out, kills


@pytest.mark.slow
def test_stage2_with_latent_cache_survives_kill_9(ctx, stage1, emoji16_tiny, tmp_path):
    argv = [
        "--pretrained_vae_model_name_or_path", str(stage1), "--train_data_dir", str(emoji16_tiny),
        "--resolution", "16", "--unet_base_channels", "16", "--unet_channel_multipliers", "1", "2",
        "--norm_num_groups", "8", "--attention_head_dim", "8", "--context_dim", "32", "--text_encoder_layers", "1", "--text_encoder_heads", "2",
        "--max_prompt_length", "8", "--train_batch_size", "2", "--max_train_samples", "6", "--max_train_steps", "16",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--use_ema", "--cache_latents",
        "--logging_steps", "1", "--seed", "5", "--num_validation_images", "2", "--validation_inference_steps", "2",
        "--validation_steps", "0", "--report_to", "none", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--learning_rate", "1e-3",
    ]
    ref_out, out, _ = chaos(ctx, "stage2", argv, tmp_path, seed=12, cache=True)
    caches = list((out / "latent_cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "latent_cache_info.json").is_file()  # half-written ones never published
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == list(range(1, 17))


@pytest.mark.slow
def test_stage1_survives_kill_9(ctx, emoji16_tiny, tmp_path):
    argv = [
        "--train_data_dir", str(emoji16_tiny), "--resolution", "16", "--base_channels", "8", "--norm_num_groups", "4",
        "--disc_channels", "8", "--disc_layers", "2", "--disc_start", "3", "--train_batch_size", "2",
        "--max_train_samples", "6", "--max_train_steps", "16", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2", "--use_ema", "--num_validation_images", "2", "--max_eval_samples", "4",
        "--scaling_factor_samples", "4", "--skip_rfid", "--logging_steps", "1", "--seed", "5", "--report_to", "none",
        "--validation_steps", "0",
    ]
    ref_out, out, _ = chaos(ctx, "stage1", argv, tmp_path, seed=7)
    assert json.loads((ref_out / "config.json").read_text())["scaling_factor"] == \
        json.loads((out / "config.json").read_text())["scaling_factor"]


def test_a_damaged_latent_cache_is_rebuilt_not_trained_on(tmp_path, caplog):
    """A cache folder that lost bytes (a disk filled up, a copy cut short) is found out by the sizes its info file
    recorded and rebuilt with the same contents; a build killed half-way never had a name to be found by."""
    from helpers.models import tiny_kl

    from ldm_diffusers.conditioning import UNCONDITIONAL
    from ldm_diffusers.training.latent_cache import INFO_FILE, build_latent_cache, cache_problem

    rows = [{"pixel_values": torch.rand(3, 16, 16) * 2 - 1, "index": i} for i in range(6)]
    vae = tiny_kl(4).eval()
    settings = {"test": "damaged cache"}
    first = build_latent_cache(rows, vae, UNCONDITIONAL, None, tmp_path, settings, batch_size=4, show_progress=False)
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert cache_problem(folder) is None
    expected = first[:]["latent_mean"].clone()
    arrow = max(folder.rglob("*.npy"), key=lambda p: p.stat().st_size)
    whole = arrow.read_bytes()
    arrow.write_bytes(whole[: len(whole) // 2])
    assert "bytes" in cache_problem(folder)
    with caplog.at_level("WARNING"):
        rebuilt = build_latent_cache(rows, vae, UNCONDITIONAL, None, tmp_path, settings, batch_size=4, show_progress=False)
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert cache_problem(folder) is None and arrow.read_bytes() == whole
    assert torch.equal(rebuilt[:]["latent_mean"], expected)
    (folder / INFO_FILE).unlink()  # as a build killed before its last write would leave it, had it been published
    assert "no complete" in cache_problem(folder)
    assert not list(tmp_path.glob(".*"))  # no temporary folders left


def test_a_folder_whose_save_was_interrupted_is_refused(tmp_path):
    """publish_into marks the folder while it moves files in; a kill half-way leaves the mark, and every loader
    refuses the folder, saying how to finish it, until a save completes."""
    from helpers.models import tiny_kl

    from ldm_diffusers import LDMAutoencoderKL
    from ldm_diffusers.utils.model_files import PUBLISHING_MARKER, CheckpointError, atomic_directory, publish_into

    out = tmp_path / "model"
    tmp = atomic_directory(out)
    tiny_kl(4).save_pretrained(tmp)
    publish_into(tmp, out)
    assert not (out / PUBLISHING_MARKER).exists()
    LDMAutoencoderKL.from_pretrained(out)
    (out / PUBLISHING_MARKER).write_text("being replaced\n")  # what a kill during the moves leaves
    for load in (lambda: LDMAutoencoderKL.from_pretrained(out), lambda: LDMAutoencoderKL.from_pretrained(tmp_path, subfolder="model")):
        with pytest.raises(CheckpointError, match="was being saved.*--resume_from_checkpoint latest"):
            load()
    tmp = atomic_directory(out)
    tiny_kl(4).save_pretrained(tmp)
    publish_into(tmp, out)  # the next complete save clears it
    LDMAutoencoderKL.from_pretrained(out)
