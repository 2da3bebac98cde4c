#!/usr/bin/env python
"""Training throughput against the real stock script: diffusers' ``examples/text_to_image/train_text_to_image.py``,
run as a user runs it (``accelerate launch``, one process), and ``ldm-diffusers train`` (the same way, through
``examples/train_text_to_image.py``), side by side in one run on the same models and data:

* one Stable-Diffusion-layout folder: the same ``AutoencoderKL`` (KL-f4, random weights), ``UNet2DConditionModel``
  shapes, a frozen CLIP text encoder (``CLIPTextModel`` from a config, random weights: no CLIP weights ship in any
  wheel) with a CLIP tokenizer (a character-level CLIP BPE vocabulary: no merges, the same 77 tokens per prompt), the
  ``DDPMScheduler``;
* the built-in 64x64 emoji imagefolder, batch 16, no condition dropout on either side, fp32, no EMA;
* ours from pixels (the stage-1 encoder and the text encoder run every step, as in stock), as launched (``accelerate
  launch`` without ``--cpu`` gives every CPU process one thread; ours then takes its share of the cores) and with
  ``--num_cpu_threads 1`` (the stock script's thread count), and with ``--cached`` from the latent cache.

The stock script is never committed: pass ``--stock_script`` (a copy at the pinned commit, e.g. ``git show
<commit>:examples/text_to_image/train_text_to_image.py`` in a diffusers clone) or let ``--fetch`` download it at
``STOCK_COMMIT``. It runs unchanged through ``benchmarks/stock_runner.py``, which gives it PIL equivalents of
its torchvision transforms (torchvision's wheels break this project's CPU torch). Throughput is read the same way for both: the wall times TensorBoard records
with each step's logged loss, from the ``--skip``-th step to the last (start-up, the first steps and the final save
left out). Prints and writes images/s per side and the ratios.

    python benchmarks/bench_training_stock.py --stock_script /tmp/train_text_to_image.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOCK_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"  # huggingface/diffusers main, 2026-12-03
STOCK_URL = ("https://raw.githubusercontent.com/huggingface/diffusers/{commit}/examples/text_to_image/"
             "train_text_to_image.py")


def clip_tokenizer_files(folder: Path, max_length: int = 77) -> None:
    """A CLIP tokenizer with a character-level vocabulary: every byte's unicode stand-in, alone and word-final
    (``</w>``), the start and end tokens, and no merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def build_model_folder(folder: Path, a) -> None:
    """The Stable-Diffusion-layout folder both scripts start from."""
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm_diffusers import LDMAutoencoderKL, LDMUNet2DConditionModel
    from ldm_diffusers.schedulers import ldm_scheduler

    torch.manual_seed(0)
    clip_tokenizer_files(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=a.text_width, intermediate_size=4 * a.text_width,
        num_hidden_layers=a.text_layers, num_attention_heads=a.text_width // 64, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder.save_pretrained(folder / "text_encoder")
    vae = LDMAutoencoderKL.from_downsampling_factor(4, latent_channels=3, base_channels=32, layers_per_block=1,
                                                    sample_size=a.resolution, scaling_factor=1.0)
    vae.save_pretrained(folder / "vae")
    unet = LDMUNet2DConditionModel.from_ldm_config(
        latent_channels=3, context_dim=a.text_width, base_channels=a.base_channels, channel_multipliers=(1, 2, 2),
        layers_per_block=1, attention_head_dim=32, sample_size=a.resolution // 4)
    unet.save_pretrained(folder / "unet")
    DDPMScheduler.from_config(ldm_scheduler("ddpm", "text").config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))


def stock_script(a) -> Path:
    if a.stock_script:
        return Path(a.stock_script)
    target = Path.home() / ".cache" / "ldm_diffusers" / "stock" / STOCK_COMMIT / "train_text_to_image.py"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(STOCK_URL.format(commit=STOCK_COMMIT), target)
    return target


def launch(script: Path, args: list[str], log: Path) -> None:
    """``accelerate launch`` (one process, as a user starts either script) of ``script`` into a fresh output folder."""
    shutil.rmtree(args[args.index("--output_dir") + 1], ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    with open(log, "w") as handle:
        done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{script.name} failed; see {log}:\n" + log.read_text()[-3000:])


def images_per_second(logdir: Path, tag: str, batch: int, skip: int) -> float:
    """From the TensorBoard events: steps ``skip``..last of ``tag`` over their wall-clock span."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder in sorted({path.parent for path in logdir.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            break
    else:
        raise SystemExit(f"No '{tag}' scalars under {logdir}.")
    steps = sorted((e.step, e.wall_time) for e in events.Scalars(tag))
    steps = [s for s in steps if s[0] >= skip]
    (first, t0), (last, t1) = steps[0], steps[-1]
    return (last - first) * batch / (t1 - t0)


def run_stock(a, work: Path, models: Path, data: Path, i: int) -> float:
    out = work / f"stock-{i}"
    launch(REPO / "benchmarks" / "stock_runner.py", [
        str(stock_script(a)), "--pretrained_model_name_or_path", str(models), "--train_data_dir", str(data), "--caption_column", "text",
        "--resolution", str(a.resolution), "--center_crop", "--train_batch_size", str(a.batch),
        "--max_train_steps", str(a.steps), "--learning_rate", "1e-4", "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--output_dir", str(out),
        "--report_to", "tensorboard", "--seed", "0"], work / f"stock-{i}.log")
    return images_per_second(out / "logs", "train_loss", a.batch, a.skip)


def run_ours(a, work: Path, models: Path, data: Path, i: int, cached: bool, threads: int | None = None) -> float:
    out = work / f"ours-{'cached' if cached else 'pixels'}{'' if threads is None else f'-{threads}thread'}-{i}"
    launch(REPO / "examples" / "train_text_to_image.py", [
        "--pretrained_vae_model_name_or_path", str(models / "vae"), "--conditioning", "text", "--text_encoder",
        "frozen", "--text_encoder_name_or_path", str(models / "text_encoder"), "--tokenizer_name_or_path",
        str(models / "tokenizer"), "--max_prompt_length", "77", "--unet_base_channels", str(a.base_channels),
        "--unet_channel_multipliers", "1", "2", "2", "--attention_head_dim", "32", "--train_data_dir", str(data),
        "--resolution", str(a.resolution), "--train_batch_size", str(a.batch), "--max_train_steps", str(a.steps),
        "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--adam_weight_decay",
        "1e-2", "--conditioning_dropout_prob", "0", "--checkpointing_steps", "1000000", "--validation_steps", "0",
        "--logging_steps", "1", "--output_dir", str(out), "--report_to", "tensorboard", "--seed", "0",
        *(["--cache_latents"] if cached else []), *([] if threads is None else ["--num_cpu_threads", str(threads)])],
        work / f"{out.name}.log")
    return images_per_second(out / "logs", "loss", a.batch, a.skip)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stock_script", default=None, help="diffusers' train_text_to_image.py (default: --fetch it).")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="Steps left out at the start (first-step overheads).")
    p.add_argument("--repeats", type=int, default=3, help="Runs per side, interleaved; medians are quoted.")
    p.add_argument("--base_channels", type=int, default=64)
    p.add_argument("--text_width", type=int, default=256)
    p.add_argument("--text_layers", type=int, default=4)
    p.add_argument("--cached", action="store_true", help="Also time ours from the latent cache.")
    p.add_argument("--work_dir", default=None, help="Default: a temporary folder.")
    p.add_argument("--out", default=None, help="Write the numbers as JSON here.")
    a = p.parse_args()

    from ldm_diffusers.data import build_emoji_dataset

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="bench-stock-"))
    work.mkdir(parents=True, exist_ok=True)
    models, data = work / "models", build_emoji_dataset(resolution=a.resolution)
    if not (models / "model_index.json").is_file():
        build_model_folder(models, a)
    runs = {"stock": [], "ours_pixels": [], "ours_pixels_1thread": [], **({"ours_cached": []} if a.cached else {})}
    for i in range(a.repeats):
        runs["stock"].append(run_stock(a, work, models, data, i))
        runs["ours_pixels"].append(run_ours(a, work, models, data, i, cached=False))
        runs["ours_pixels_1thread"].append(run_ours(a, work, models, data, i, cached=False, threads=1))
        if a.cached:
            runs["ours_cached"].append(run_ours(a, work, models, data, i, cached=True))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} img/s" for k, v in runs.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    result = {"stock_commit": STOCK_COMMIT, "settings": vars(a), "images_per_s": runs, "median_images_per_s": medians,
              "ratio_to_stock": {k: v / medians["stock"] for k, v in medians.items()}}
    print(json.dumps(result["median_images_per_s"]), json.dumps(result["ratio_to_stock"]))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
