"""Super-resolution at real image sizes: memory and time of the released LDM-SR architecture (CompVis ``bsr_sr``:
UNet 160 channels, VQ-f4 with 8,192 codes; random weights, seeded, the same in every run) upscaling L x L to
4L x 4L, with this package's tiled pipeline against diffusers' own ``LDMSuperResolutionPipeline`` (what diffusers
users run for ``CompVis/ldm-super-resolution-4x-openimages``: the whole latent through the UNet and the decoder).

    python benchmarks/large_images.py [--sizes 64 128 256 512] [--steps 2] [--out benchmarks/results/large_images]

Every run is a process of its own (peak memory = its peak resident set, ``ru_maxrss``), the variants of one size
one after another in the same invocation. Times: the UNet's forward calls (s per step, and s per output megapixel
per step) and the decoder's, from timers around those calls. Ours tiles the latent as CompVis' super-resolution
notebook does (windows of 128 latent pixels every 64, ``tile_size=512, tile_stride=256`` image pixels), the decode
too. Writes ``large_images.json``, ``large_images.md`` and ``large_images.png`` (time and memory against size).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURE_CONFIG = REPO / "tests" / "fixtures" / "compvis" / "bsr_sr" / "config.yaml"
VARIANTS = ("ours-tiled", "diffusers")
# the released bsr_sr sizes (CompVis latent-diffusion models/ldm/bsr_sr/config.yaml); the fixture is scaled down
RELEASED = {"model_channels": 160, "ch": 128, "n_embed": 8192}


def build_weights(folder: Path) -> None:
    """The released architecture at random weights (seed 0), saved once for every run to load."""
    import torch
    from diffusers import UNet2DModel, VQModel

    from ldm_diffusers.conversion.compvis import read_compvis_config
    from ldm_diffusers.conversion.first_stage import autoencoder_config
    from ldm_diffusers.conversion.unet import unet_config

    params = read_compvis_config(FIXTURE_CONFIG)["model"]["params"]
    params["unet_config"]["params"]["model_channels"] = RELEASED["model_channels"]
    first = params["first_stage_config"]["params"]
    first["ddconfig"]["ch"], first["n_embed"] = RELEASED["ch"], RELEASED["n_embed"]
    unet_class, unet_kwargs = unet_config(params["unet_config"]["params"])
    assert unet_class is UNet2DModel  # one head width: the stock class, as in diffusers' CompVis repositories
    torch.manual_seed(0)
    UNet2DModel(**unet_kwargs).save_pretrained(folder / "unet")
    VQModel(**autoencoder_config(first)[1]).save_pretrained(folder / "vqvae")


def timed(module, name: str, totals: dict) -> None:
    """Add the seconds of every ``module.<name>`` call to ``totals[name]``."""
    original = getattr(module, name)

    def call(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        totals[f"{name}_calls"] = totals.get(f"{name}_calls", 0) + 1
        return result

    setattr(module, name, call)


def child(variant: str, weights: Path, size: int, steps: int) -> dict:
    """One upscale of a seeded L x L image in this process; its times and peak memory."""
    import numpy as np
    import PIL.Image
    import torch
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    from ldm_diffusers import LDMPipeline, LDMVQModel
    from ldm_diffusers.schedulers import compvis_ddim_scheduler

    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    unet = UNet2DModel.from_pretrained(weights / "unet").eval()
    scheduler = compvis_ddim_scheduler(0.0015, 0.0155, 1000)
    totals: dict = {}
    timed(unet, "forward", totals)
    if variant == "diffusers":
        vqvae = VQModel.from_pretrained(weights / "vqvae").eval()
        pipe = LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
        timed(vqvae, "decode", totals)
        kwargs = {}
    else:
        vae = LDMVQModel.from_pretrained(weights / "vqvae").eval()
        pipe = LDMPipeline(vae=vae, unet=unet, scheduler=scheduler)
        timed(vae, "decode", totals)
        kwargs = {"tile_size": 512, "tile_stride": 256}
    pipe.set_progress_bar_config(disable=True)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    with torch.no_grad():
        out = pipe(image=image, num_inference_steps=steps, eta=1.0, generator=torch.manual_seed(0), output_type="np",
                   **kwargs).images
    total = time.perf_counter() - start
    megapixels = out.shape[1] * out.shape[2] / 1e6
    unet_per_step = totals["forward"] / steps
    return {"variant": variant, "low_res": size, "output": f"{out.shape[2]}x{out.shape[1]}", "steps": steps,
            "seconds": round(total, 2), "unet_s_per_step": round(unet_per_step, 3),
            "unet_s_per_mp_per_step": round(unet_per_step / megapixels, 3), "unet_calls": totals["forward_calls"],
            "decode_s": round(totals.get("decode", 0.0), 2), "peak_gib": round(resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "after_load_gib": round(loaded, 2),
            "threads": torch.get_num_threads()}


def run(variant: str, weights: Path, size: int, steps: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--weights", str(weights), "--sizes", str(size),
           "--steps", str(steps)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)  # exit code read below
    except subprocess.TimeoutExpired:
        return {"variant": variant, "low_res": size, "failed": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"variant": variant, "low_res": size, "failed": f"exit {done.returncode}: {last[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| low-res -> output | variant | UNet s/step | UNet s/MP/step | decode s | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['low_res']} | {r['variant']} | failed: {r['failed']} | | | |")
        else:
            lines.append(f"| {r['low_res']} -> {r['output']} | {r['variant']} | {r['unet_s_per_step']} | "
                         f"{r['unet_s_per_mp_per_step']} | {r['decode_s']} | {r['peak_gib']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in VARIANTS:
        done = [r for r in rows if r["variant"] == variant and "failed" not in r]
        sides = [4 * r["low_res"] for r in done]
        left.plot(sides, [r["unet_s_per_step"] for r in done], "o-", label=variant)
        right.plot(sides, [r["peak_gib"] for r in done], "o-", label=variant)
    left.set(xlabel="output side (px)", ylabel="UNet s / step", xscale="log", yscale="log", title="time")
    right.set(xlabel="output side (px)", ylabel="peak resident GiB", xscale="log", title="memory")
    right.axhline(8, color="grey", linestyle=":", label="8 GiB")
    for axis in (left, right):
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512], help="Low-resolution sides L.")
    p.add_argument("--steps", type=int, default=2, help="Denoising steps per run (times are per step).")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--timeout", type=float, default=3600, help="Seconds per run before it counts as failed.")
    p.add_argument("--out", type=Path, default=HERE / "results" / "large_images")
    p.add_argument("--weights", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.weights, a.sizes[0], a.steps)))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    weights = a.out / "weights"
    if not (weights / "unet").is_dir():
        build_weights(weights)
    rows = []
    for size in a.sizes:
        for variant in a.variants:
            rows.append(run(variant, weights, size, a.steps, a.timeout))
            print(json.dumps(rows[-1]), flush=True)
            (a.out / "large_images.json").write_text(json.dumps(rows, indent=2))
    (a.out / "large_images.md").write_text(table(rows))
    plot(rows, a.out / "large_images.png")
    print(table(rows))


if __name__ == "__main__":
    main()
