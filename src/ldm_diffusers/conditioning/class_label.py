"""Class-conditional LDMs: tau_theta is an embedding table, one token per image for cross-attention."""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..hub import ComponentCardMixin
from .base import Conditioning, ConditioningMode


class ClassEmbedder(ComponentCardMixin, ModelMixin, ConfigMixin):
    """Labels [B] in 0..num_classes-1 -> tokens [B, 1, context_dim]. Row ``num_classes`` is the learned
    "null" class used for classifier-free guidance (and for label dropout during training)."""

    @register_to_config
    def __init__(self, num_classes: int = 1000, context_dim: int = 512):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, context_dim)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, device=self.embedding.weight.device).long().reshape(-1)
        bad = labels[(labels < 0) | (labels > self.config.num_classes)]
        if bad.numel():
            raise ValueError(
                f"Unknown class id(s) {sorted(set(bad.tolist()))}: this model knows 0..{self.config.num_classes - 1} "
                f"(and {self.config.num_classes} = the null class)."
            )
        return self.embedding(labels)[:, None, :]

    def null(self, batch_size: int) -> torch.Tensor:
        return self(torch.full((batch_size,), self.null_class, dtype=torch.long))


class ClassMode(ConditioningMode):
    """``class_labels`` (int, list or tensor [B]) -> one token each; null: the learned null class."""

    name = "class"
    inputs = ("class_labels",)
    components = ("class_embedder",)

    @staticmethod
    def _labels(values) -> torch.Tensor:
        return torch.as_tensor(values["class_labels"]).reshape(-1)

    def batch_size(self, values):
        return self._labels(values).shape[0]

    def condition(self, pipe, values, latent_size):
        return Conditioning(context=pipe.class_embedder(self._labels(values)))

    def null_values(self, pipe, values):
        return {"class_labels": torch.full_like(self._labels(values), pipe.class_embedder.null_class)}

    def dataset_columns(self, columns):
        return {columns.class_column: "class_labels"}
