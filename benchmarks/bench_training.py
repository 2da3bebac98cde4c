#!/usr/bin/env python
"""Training throughput: ldm-diffusers' stage-2 step against the loop of diffusers'
``examples/text_to_image/train_text_to_image.py`` on the same models and batches.

Both sides train the same ``UNet2DConditionModel`` (ours: ``LDMUNet2DConditionModel``, same config)
in the latent space of the same ``AutoencoderKL`` with the same frozen text encoder (the offline
MiniLM), AdamW, fp32 or the chosen autocast dtype:

* stock: pixels -> ``vae.encode(x).latent_dist.sample() * scale``, ``text_encoder(ids)[0]``, one
  ``torch.randn`` / ``torch.randint`` for the batch, ``add_noise``, UNet, MSE, backward, step
  (the body of diffusers' script, without its DataLoader);
* ours, pixels: ``ldm_diffusers.training.latent_diffusion.optimisation_step`` with its
  ``DiffusionObjective`` (per-example seeded draws, condition dropout, the conditioning switch);
* ours, cached: the same from a latent cache (posterior moments and text tokens), so neither the
  stage-1 encoder nor the text encoder runs;
* ours_fast (pixels / cached): the same with the training script's speed switches as they are set by
  ``--compile --channels_last --adam_implementation fused`` (a second copy of the UNet; compile time
  printed apart). ``--fast_flags`` picks a subset, to measure each switch.

Prints median images/s over ``--repeats`` timed blocks of ``--steps`` steps (interleaved) and the
ratios against stock.

    python benchmarks/bench_training.py                       # CPU defaults: 64x64 emoji, batch 16
    python benchmarks/bench_training.py --device cuda --dtype bf16 --batch 64 --resolution 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def build(a, device):
    from ldm_diffusers import LDMAutoencoderKL, LDMUNet2DConditionModel
    from ldm_diffusers.conditioning import load_frozen_text_encoder
    from ldm_diffusers.schedulers import ldm_scheduler

    torch.manual_seed(0)
    vae = LDMAutoencoderKL.from_downsampling_factor(4, latent_channels=3, base_channels=32, layers_per_block=1,
                                                    sample_size=a.resolution, scaling_factor=1.0)
    tokenizer, text_encoder = load_frozen_text_encoder()
    tokenizer.model_max_length = a.max_prompt_length
    unet = LDMUNet2DConditionModel.from_ldm_config(
        latent_channels=3, context_dim=text_encoder.config.hidden_size, base_channels=a.base_channels,
        channel_multipliers=(1, 2, 2), layers_per_block=1, attention_head_dim=32, sample_size=a.resolution // 4,
    )
    for m in (vae, text_encoder):
        m.requires_grad_(False).eval().to(device)
    unet.to(device).train()
    return vae, tokenizer, text_encoder, unet, ldm_scheduler("ddpm", "text")


def batches(a, n):
    from ldm_diffusers.data import collate_examples, example_transform, load_image_splits

    train, _ = load_image_splits("emoji", resolution=a.resolution)
    train.set_transform(example_transform("image", a.resolution, columns={"text": "prompt"}))
    rows = [{**train[i], "index": i} for i in range(n * a.batch)]
    return [collate_examples(rows[i * a.batch:(i + 1) * a.batch]) for i in range(n)]


def stock_step(parts, batch, optimizer, device, dtype):
    vae, tokenizer, text_encoder, unet, scheduler = parts
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        latents = vae.encode(batch["pixel_values"].to(device)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        ids = tokenizer(batch["prompt"], padding="max_length", truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids.to(device))[0]
        pred = unet(noisy, t, context).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--base_channels", type=int, default=64)
    p.add_argument("--max_prompt_length", type=int, default=24)
    p.add_argument("--steps", type=int, default=5, help="Steps per timed block.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fast_flags", nargs="*", default=["compile", "channels_last", "fused"],
                   choices=["compile", "channels_last", "fused"], help="The switches of the ours_fast variants.")
    p.add_argument("--out", default=None, help="Write the numbers as JSON here.")
    a = p.parse_args()

    import copy

    from accelerate import Accelerator

    from ldm_diffusers.conditioning import TextMode, TrainingColumns, encode_prompts
    from ldm_diffusers.losses.diffusion import DiffusionObjective
    from ldm_diffusers.models.autoencoders import encode_latent_moments
    from ldm_diffusers.training.latent_diffusion import make_denoiser, optimisation_step
    from ldm_diffusers.training.loop import adam_kwargs

    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no" if a.dtype == "fp32" else a.dtype)
    parts = build(a, device)
    vae, tokenizer, text_encoder, unet, scheduler = parts
    data = batches(a, a.steps)
    cached = []
    with torch.no_grad():
        for b in data:
            extra = encode_latent_moments(vae, b["pixel_values"].to(device))
            extra["context"] = encode_prompts(tokenizer, text_encoder, b["prompt"]).half()
            cached.append({"index": b["index"], "prompt": b["prompt"], **{k: v.cpu() for k, v in extra.items()}})
        null_context = encode_prompts(tokenizer, text_encoder, [""]).to(dtype if dtype != torch.float32 else torch.float32)

    mode = TextMode()
    columns = TrainingColumns(downsampling_factor=4)
    weight_dtype = torch.float32 if a.dtype == "fp32" else dtype
    stock_optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)  # as diffusers' script: torch's default kernel

    def ours(fast: bool):
        """(step function, compile seconds) of our loop, eager or with the speed switches."""
        flags = set(a.fast_flags) if fast else set()
        args = SimpleNamespace(seed=0, conditioning_dropout_prob=0.1, noise_offset=0.0, input_perturbation=0.0,
                               prediction_type="epsilon", snr_gamma=None, max_grad_norm=None, conditioning="text",
                               channels_last="channels_last" in flags, compile="compile" in flags,
                               cache_latents=False, gradient_checkpointing=False,
                               enable_xformers_memory_efficient_attention=False)
        model, enc_vae, encoder = unet, vae, text_encoder
        if fast:  # own copies: compiling and channels-last change the modules in place
            model, enc_vae, encoder = copy.deepcopy(unet), copy.deepcopy(vae), copy.deepcopy(text_encoder)
        # the training script's own switches: compiles the UNet and, frozen, the encoders that run every step
        denoiser = make_denoiser(args, accelerator, model, mode, {}, {"text_encoder": encoder, "tokenizer": tokenizer},
                                 enc_vae)
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4, **adam_kwargs("fused" if "fused" in flags else "foreach", params))
        objective = DiffusionObjective(args, mode, columns, enc_vae, scheduler, weight_dtype, device, null_context)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

        def step(batch):
            optimisation_step(accelerator, args, objective, batch, 0, denoiser, optimizer, sched, 0)

        start = time.perf_counter()
        step(data[0])
        step(cached[0])
        return step, time.perf_counter() - start

    ours_eager, _ = ours(fast=False)
    ours_fast, compile_seconds = ours(fast=True)
    variants = {
        "stock": lambda b, i: stock_step(parts, b, stock_optimizer, device, dtype),
        "ours_pixels": lambda b, i: ours_eager(b),
        "ours_cached": lambda b, i: ours_eager(cached[i]),
        "ours_fast_pixels": lambda b, i: ours_fast(b),
        "ours_fast_cached": lambda b, i: ours_fast(cached[i]),
    }
    for name, fn in variants.items():  # warm-up
        fn(data[0], 0)
    times = {name: [] for name in variants}
    for _ in range(a.repeats):
        for name, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for i, b in enumerate(data):
                fn(b, i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(a.steps * a.batch / (time.perf_counter() - start))
    result = {name: statistics.median(v) for name, v in times.items()}
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": a.dtype, "resolution": a.resolution, "batch": a.batch,
        "unet_params_m": round(sum(q.numel() for q in unet.parameters()) / 1e6, 2),
        "fast_flags": a.fast_flags, "compile_and_first_steps_seconds": round(compile_seconds, 1),
        "images_per_s": {k: round(v, 2) for k, v in result.items()},
        "ratio_vs_stock": {k: round(v / result["stock"], 3) for k, v in result.items() if k != "stock"},
    }
    print(json.dumps(report, indent=2))
    if a.out:
        with open(a.out, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
