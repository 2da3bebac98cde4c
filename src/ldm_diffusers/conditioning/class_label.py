"""Class-conditional LDMs: tau_theta is an embedding table, one token per image for cross-attention."""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..utils.model_cards import CardDetails, ComponentCardMixin
from .base import Conditioning, ConditioningMode


class ClassEmbedder(ComponentCardMixin, ModelMixin, ConfigMixin):
    """Labels [B] in 0..num_classes-1 -> tokens [B, 1, context_dim]. Row ``num_classes`` is the learned
    "null" class used for classifier-free guidance (and for label dropout during training)."""

    @register_to_config
    def __init__(self, num_classes: int = 1000, context_dim: int = 512, has_null_class: bool = True):
        super().__init__()
        # has_null_class=False: a model trained without label dropout (CompVis cin256), which cannot guide
        self.embedding = nn.Embedding(num_classes + int(has_null_class), context_dim)

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes if self.config.has_null_class else None

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, device=self.embedding.weight.device).long().reshape(-1)
        bad = labels[(labels < 0) | (labels >= self.embedding.num_embeddings)]
        if bad.numel():
            raise ValueError(
                f"Unknown class id(s) {sorted(set(bad.tolist()))}: this model knows 0..{self.config.num_classes - 1}"
                + (f" (and {self.config.num_classes} = the null class)." if self.config.has_null_class else ".")
            )
        return self.embedding(labels)[:, None, :]

    def null(self, batch_size: int) -> torch.Tensor:
        if self.null_class is None:
            raise ValueError("This class embedder has no null class (trained without label dropout): classifier-free "
                             "guidance and condition dropout need one; sample with guidance_scale=1.")
        return self(torch.full((batch_size,), self.null_class, dtype=torch.long))

    def _card_details(self) -> CardDetails:
        """Description, tags, pipeline tag and table rows for this encoder's model card."""
        config = self.config
        return ((f"The class-label encoder tau_theta: labels [B] in 0..{config.num_classes - 1} -> tokens "
                 f"[B, 1, {config.context_dim}] for cross-attention"
                 + (f" (row {config.num_classes} is the null class)." if config.has_null_class else " (no null class).")),
                ["conditioning", "class-conditional"], None, [("classes", config.num_classes)])


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

    def check_inputs(self, pipe, values):
        """Integer ids (an int, a list of ints or an integer tensor/array of at most one dimension), at least
        one, each in 0..num_classes - 1 of the class embedder's config (or num_classes, the null class)."""
        from .base import is_int, shown

        labels = values["class_labels"]
        num_classes = pipe.class_embedder.config.num_classes
        accepted = (f"an int, a list of ints or a 1-d integer tensor of class ids in 0..{num_classes - 1} "
                    f"(or {num_classes}, the null class)")
        if isinstance(labels, torch.Tensor) or (hasattr(labels, "dtype") and hasattr(labels, "shape")):
            try:
                tensor = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"class_labels must be {accepted}, got {shown(labels)}.") from err
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise TypeError(f"class_labels must be {accepted}, got a {tensor.dtype} tensor.")
            if tensor.ndim > 1:
                raise ValueError(f"class_labels must be {accepted}, got shape {tuple(tensor.shape)}.")
            ids = tensor.reshape(-1).tolist()
        elif is_int(labels):
            ids = [labels]
        elif isinstance(labels, (list, tuple)) and all(is_int(v) for v in labels):
            ids = list(labels)
        else:
            raise TypeError(f"class_labels must be {accepted}, got {shown(labels)}.")
        if not ids:
            raise ValueError(f"class_labels is empty: pass at least one class id in 0..{num_classes - 1}.")
        top = num_classes if pipe.class_embedder.null_class is not None else num_classes - 1
        bad = sorted({int(v) for v in ids if not 0 <= v <= top})
        if bad:
            raise ValueError(f"Unknown class id(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} in class_labels: this model "
                             f"knows 0..{num_classes - 1}"
                             + (f" (and {num_classes} = the null class)." if top == num_classes else "."))

    def condition(self, pipe, values, latent_size):
        return Conditioning(context=pipe.class_embedder(self._labels(values)))

    def null_values(self, pipe, values):
        null = pipe.class_embedder.null_class
        return None if null is None else {"class_labels": torch.full_like(self._labels(values), null)}

    def dataset_columns(self, columns):
        return {columns.class_column: "class_labels"}
