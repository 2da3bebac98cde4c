"""Autoencoder metrics: PSNR, SSIM and rFID (FID between inputs and their reconstructions)."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from .inception import InceptionFeatureExtractor


def psnr(reconstructions: torch.Tensor, targets: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB for images [B, C, H, W] in [0, data_range]: 10 log10(range^2 / MSE)."""
    mse = (reconstructions.float() - targets.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim(reconstructions: torch.Tensor, targets: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5; Wang et al. 2004) via torchmetrics."""

    return structural_similarity_index_measure(
        reconstructions.float(), targets.float(), data_range=data_range, reduction="none"
    )


@torch.no_grad()
def evaluate_autoencoder(
    autoencoder,
    dataloader,
    max_samples: int | None = None,
    compute_rfid: bool = True,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Reconstruct up to ``max_samples`` images (batches of ``pixel_values`` in [-1, 1]) and return
    mean PSNR (dB), mean SSIM and rFID, with the number of images used."""
    device = device or next(autoencoder.parameters()).device
    dtype = next(autoencoder.parameters()).dtype
    was_training = autoencoder.training
    autoencoder.eval()
    fid = None
    if compute_rfid:
        fid = FrechetInceptionDistance(feature=InceptionFeatureExtractor(), normalize=True).to(device)
    psnrs, ssims, seen = [], [], 0
    total = max_samples or len(dataloader.dataset)
    bar = tqdm(total=total, desc="evaluating reconstructions", disable=not show_progress)
    for batch in dataloader:
        x = batch["pixel_values"] if isinstance(batch, dict) else batch
        if max_samples is not None:
            x = x[: max_samples - seen]
        x = x.to(device=device, dtype=dtype)
        rec = autoencoder(x).sample
        real, fake = (x.float() + 1) / 2, (rec.float().clamp(-1, 1) + 1) / 2
        psnrs.append(psnr(fake, real).cpu())
        ssims.append(ssim(fake, real).cpu())
        if fid is not None:
            fid.update(real, real=True)
            fid.update(fake, real=False)
        seen += x.shape[0]
        bar.update(x.shape[0])
        if max_samples is not None and seen >= max_samples:
            break
    bar.close()
    autoencoder.train(was_training)
    results = {
        "num_images": seen,
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
    }
    if fid is not None:
        results["rfid"] = float(fid.compute()) if seen >= 2 else float("nan")
    return results
