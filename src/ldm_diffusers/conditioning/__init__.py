"""tau_theta and the conditioning "switch".

Each mode is a :class:`~ldm_diffusers.conditioning.base.ConditioningMode` in its own file that knows everything
about itself; the registry (:mod:`.registry`) lists them in the order the pipeline consults them, with the
unconditional fallback last. A new mode is one :func:`register_mode` call.
"""

from .base import (
    Conditioning,
    ConditioningMode,
    Encoders,
    InputError,
    TrainingColumns,
    add_argument_once,
    conditioning_encoders,
)
from .class_label import ClassEmbedder, ClassMode
from .layout import LayoutBERTEncoder, LayoutEncoder, LayoutMode
from .registry import (
    UNCONDITIONAL,
    UnconditionalMode,
    component_names,
    input_names,
    mode_named,
    mode_of,
    modes,
    register_mode,
    unregister_mode,
)
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

for _mode in (TextMode(), ClassMode(), LayoutMode(), SuperResolutionMode(), InpaintingMode(), SegmentationMode()):
    register_mode(_mode)

__all__ = [
    "UNCONDITIONAL",
    "ClassEmbedder",
    "ClassMode",
    "Conditioning",
    "ConditioningMode",
    "Encoders",
    "InpaintingMode",
    "InputError",
    "LayoutBERTEncoder",
    "LayoutEncoder",
    "LayoutMode",
    "SegmentationMode",
    "SpatialRescaler",
    "SuperResolutionMode",
    "TextMode",
    "TrainingColumns",
    "UnconditionalMode",
    "add_argument_once",
    "bert_tokenizer",
    "build_text_transformer",
    "component_names",
    "conditioning_encoders",
    "encode_prompts",
    "input_names",
    "load_frozen_text_encoder",
    "minilm_path",
    "mode_named",
    "mode_of",
    "modes",
    "register_mode",
    "tokenize",
    "unregister_mode",
]
