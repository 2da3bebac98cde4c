"""tau_theta and the conditioning "switch".

Each mode is a :class:`~ldm_diffusers.conditioning.base.ConditioningMode` in its own file; ``MODES``
lists them in the order the pipeline and the training loop consult them.
"""

from .base import Conditioning, ConditioningMode, TrainingColumns
from .class_label import ClassEmbedder, ClassMode
from .layout import LayoutBERTEncoder, LayoutEncoder, LayoutMode
from .spatial import InpaintingMode, SegmentationMode, SpatialRescaler, SuperResolutionMode
from .text import (
    TextMode,
    bert_tokenizer,
    build_text_transformer,
    encode_prompts,
    load_frozen_text_encoder,
    minilm_path,
    tokenize,
)

MODES: tuple[ConditioningMode, ...] = (
    TextMode(),
    ClassMode(),
    LayoutMode(),
    InpaintingMode(),
    SuperResolutionMode(),
    SegmentationMode(),
)

__all__ = [
    "MODES",
    "ClassEmbedder",
    "ClassMode",
    "Conditioning",
    "ConditioningMode",
    "InpaintingMode",
    "LayoutBERTEncoder",
    "LayoutEncoder",
    "LayoutMode",
    "SegmentationMode",
    "SpatialRescaler",
    "SuperResolutionMode",
    "TextMode",
    "TrainingColumns",
    "bert_tokenizer",
    "build_text_transformer",
    "encode_prompts",
    "load_frozen_text_encoder",
    "minilm_path",
    "tokenize",
]
