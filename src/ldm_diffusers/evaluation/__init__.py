"""Evaluation metrics. Stage 1 so far: PSNR, SSIM and rFID with the offline TF-Inception network."""

from .inception import InceptionFeatureExtractor
from .reconstruction import evaluate_autoencoder, psnr, ssim

__all__ = ["InceptionFeatureExtractor", "evaluate_autoencoder", "psnr", "ssim"]
