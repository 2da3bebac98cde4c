#!/usr/bin/env python
"""Stage-1 speed: ours against stock diffusers ``AutoencoderKL`` of the same shape, same process.

Prints medians (seconds per call and images/s) and ratios ours/stock for
  * encode + decode forward (inference),
  * forward + backward of an L1 + KL step (the part both can run),
and, for ours only, the full VQGAN-style step (L1 + perceptual + PatchGAN with adaptive weight,
then the discriminator step), to show what the extra losses cost.

    python benchmarks/bench_autoencoder.py                      # CPU, fp32
    python benchmarks/bench_autoencoder.py --dtype bf16 --batch 64 --out benchmarks/results/ae_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKL

from ldm_diffusers import LDMAutoencoderKL
from ldm_diffusers.losses import AutoencoderLoss, EfficientNetPerceptualLoss, NLayerDiscriminator


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("-f", "--downsampling_factor", type=int, default=4)
    p.add_argument("--base_channels", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="Also write the results as JSON here.")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    torch.manual_seed(0)

    ours = LDMAutoencoderKL.from_downsampling_factor(
        a.downsampling_factor, latent_channels=3, base_channels=a.base_channels, layers_per_block=1,
        sample_size=a.resolution,
    )
    stock_config = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    stock = AutoencoderKL(**stock_config)
    stock.load_state_dict(ours.state_dict())
    ours.to(device).train()
    stock.to(device).train()
    x = torch.rand(a.batch, 3, a.resolution, a.resolution, device=device) * 2 - 1

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def inference(model):
        def run():
            with torch.no_grad(), autocast():
                model.decode(model.encode(x).latent_dist.mode()).sample
        return run

    def l1_kl_step(model):
        def run():
            with autocast():
                posterior = model.encode(x).latent_dist
                rec = model.decode(posterior.sample()).sample
                loss = (rec.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    loss_fn = AutoencoderLoss(
        "kl", perceptual_loss=EfficientNetPerceptualLoss(), discriminator=NLayerDiscriminator(n_layers=2), disc_start=0
    ).to(device)

    def full_step():
        with autocast():
            out = ours(x)
            g, _ = loss_fn.generator_loss(x, out.sample, 1, last_layer=ours.last_layer(), posterior=out.posterior)
        g.backward()
        with autocast():
            d, _ = loss_fn.discriminator_loss(x, out.sample, 1)
        d.backward()
        ours.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__, "dtype": a.dtype, "batch": a.batch, "resolution": a.resolution,
        "f": a.downsampling_factor, "params_M": round(sum(q.numel() for q in ours.parameters()) / 1e6, 2),
        "repeats": a.repeats,
    }
    for name, make in (("inference", inference), ("l1_kl_train_step", l1_kl_step)):
        t_stock = timed(make(stock), device, a.warmup, a.repeats)
        t_ours = timed(make(ours), device, a.warmup, a.repeats)
        results[name] = {
            "stock_s": t_stock, "ours_s": t_ours, "stock_img_s": a.batch / t_stock, "ours_img_s": a.batch / t_ours,
            "ratio_ours_over_stock_time": t_ours / t_stock,
        }
    t_full = timed(full_step, device, a.warmup, a.repeats)
    results["full_vqgan_style_step"] = {
        "ours_s": t_full, "ours_img_s": a.batch / t_full,
        "ratio_over_stock_l1_kl_step": t_full / results["l1_kl_train_step"]["stock_s"],
    }
    print(json.dumps(results, indent=2))
    if a.out:
        with open(a.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
