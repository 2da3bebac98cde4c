"""tau_theta, the conditioning "switch": encoders that turn y into cross-attention tokens."""

from .class_label import ClassEmbedder
from .text import bert_tokenizer, build_text_transformer, encode_prompts, load_frozen_text_encoder, minilm_path, tokenize

__all__ = [
    "ClassEmbedder",
    "bert_tokenizer",
    "build_text_transformer",
    "encode_prompts",
    "load_frozen_text_encoder",
    "minilm_path",
    "tokenize",
]
