"""tau_theta of a pipeline as CompVis' conditioning stage: the pipeline's mode names the ``cond_stage_key``
(``ConditioningMode.compvis_cond_stage_key``), and ``STAGES`` says how CompVis builds each key."""

from __future__ import annotations

import torch
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

from ..conditioning import ClassEmbedder, LayoutBERTEncoder, SpatialRescaler, bert_tokenizer, conditioning_encoders
from ..conditioning.text import MAX_LENGTH
from ..models.autoencoders import is_vq_config, latent_scaling_factor
from ..models.unet import unet_cross_attends
from .compvis import ENCODERS, bert_embedder_config, bert_embedder_names, convert_class_embedder
from .config_checks import check_config


def _bert_embedder(component: str, encoder, use_tokenizer: bool) -> tuple[dict, dict]:
    """(BERTEmbedder params, weights under ``cond_stage_model.transformer.``) of an ``LDMBertModel``."""
    c = encoder.config
    params = {"n_embed": c.d_model, "n_layer": c.encoder_layers, "vocab_size": c.vocab_size,
              "max_seq_len": c.max_position_embeddings, "use_tokenizer": use_tokenizer}
    shapes = {"cond_stage_model.transformer.token_emb.weight": torch.empty(c.vocab_size, c.d_model, device="meta"),
              "cond_stage_model.transformer.pos_emb.emb.weight": torch.empty(c.max_position_embeddings, c.d_model,
                                                                             device="meta")}
    wanted = bert_embedder_config(shapes, params)
    arch = ("vocab_size", "max_position_embeddings", "d_model", "encoder_ffn_dim", "encoder_layers",
            "encoder_attention_heads", "head_dim", "activation_function", "scale_embedding")
    bad = [f"{key}={getattr(c, key)!r} where CompVis gives {getattr(wanted, key)!r}" for key in arch
           if getattr(c, key) != getattr(wanted, key)]
    if bad:
        raise NotImplementedError(f"{component} (LDMBertModel) cannot be written as a CompVis BERTEmbedder (8 heads of "
                                  f"64, feed-forward 4 x width, GELU): {'; '.join(bad)}.")
    names = {ours: theirs for theirs, ours in bert_embedder_names(c.encoder_layers).items()}
    return params, {f"cond_stage_model.transformer.{names[k]}": v for k, v in encoder.state_dict().items()}


def _text_stage(pipe) -> tuple[dict, dict]:
    encoder = pipe.text_encoder
    if not isinstance(encoder, LDMBertModel):
        raise NotImplementedError(
            f"text_encoder ({type(encoder).__name__}): CompVis' only text encoder is its BERTEmbedder (diffusers' "
            f"LDMBertModel: pre-norm layers, q/k/v without bias, no token-type embeddings); {type(encoder).__name__} "
            "is another architecture, as are transformers' BERT, MiniLM and CLIP text models.")
    tokenizer = pipe.tokenizer
    if tokenizer is None or tokenizer.get_vocab() != bert_tokenizer().get_vocab():
        raise NotImplementedError(f"tokenizer ({type(tokenizer).__name__}): CompVis' BERTEmbedder tokenizes with "
                                  "bert-base-uncased's WordPiece vocabulary; this tokenizer has another.")
    positions = encoder.config.max_position_embeddings
    if min(tokenizer.model_max_length, MAX_LENGTH) != positions:
        raise NotImplementedError(f"tokenizer: prompts of {min(tokenizer.model_max_length, MAX_LENGTH)} tokens for a "
                                  f"text encoder of {positions} positions: CompVis' BERTEmbedder has one max_seq_len "
                                  "for both.")
    params, state = _bert_embedder("text_encoder", encoder, use_tokenizer=True)
    return {"target": ENCODERS + "BERTEmbedder", "params": params}, state


def _class_stage(pipe) -> tuple[dict, dict]:
    embedder = pipe.class_embedder
    if not isinstance(embedder, ClassEmbedder):
        raise NotImplementedError(f"class_embedder ({type(embedder).__name__}): CompVis' ClassEmbedder is one "
                                  "nn.Embedding table (ldm_diffusers.ClassEmbedder).")
    weight = embedder.embedding.weight.detach()
    params = {"embed_dim": weight.shape[1], "n_classes": weight.shape[0], "key": "class_label"}
    state = {"cond_stage_model.embedding.weight": weight}
    back = convert_class_embedder(state, params)
    check_config("class_embedder", embedder, dict(embedder.config), ClassEmbedder, dict(back.config), "ClassEmbedder")
    return {"target": ENCODERS + "ClassEmbedder", "params": params}, state


def _layout_stage(pipe) -> tuple[dict, dict]:
    encoder = pipe.layout_encoder
    if not isinstance(encoder, LayoutBERTEncoder):
        raise NotImplementedError(
            f"layout_encoder ({type(encoder).__name__}): CompVis' layout model reads taming's bounding-box tokens "
            "with a BERTEmbedder (ldm_diffusers.LayoutBERTEncoder); this encoder (class and box embeddings into a "
            "torch transformer) has no CompVis counterpart.")
    c = encoder.config
    check_config("layout_encoder", encoder, dict(c), LayoutBERTEncoder,
                  {"vocab_size": c.vocab_size, "max_objects": c.max_objects, "d_model": c.d_model,
                   "num_layers": c.num_layers}, "BERTEmbedder (taming's builder's class count is not in its config)")
    params, state = _bert_embedder("layout_encoder", encoder.transformer, use_tokenizer=False)
    return {"target": ENCODERS + "BERTEmbedder", "params": params}, state


def cond_stage(pipe, vae_state: dict) -> tuple[dict, dict, dict]:
    """(LatentDiffusion params for tau_theta, cond_stage_config, weights under ``cond_stage_model.``) for the
    pipeline's mode: its ``compvis_cond_stage_key`` names what CompVis conditions on, and how CompVis builds that key
    (``STAGES``) is the exporter's to know: text, class and layout -> crossattn; segmentation, super-resolution,
    inpainting -> concat."""
    mode = pipe.mode
    key = mode.compvis_cond_stage_key
    if key not in STAGES:
        raise NotImplementedError(f"the {mode.name} mode: CompVis has no LatentDiffusion conditioned on it.")
    encoders = list(conditioning_encoders(pipe))
    if len(encoders) > 1:
        raise NotImplementedError(f"{' and '.join(encoders)}: a CompVis LatentDiffusion has one conditioning stage.")
    unet = pipe.unet.config
    cross, concat = unet_cross_attends(unet), unet["in_channels"] - unet["out_channels"]
    if mode.kind == "context":
        if not cross or concat:
            raise NotImplementedError(f"unet: a {mode.components[0]} pipeline whose UNet "
                                      + ("concatenates channels too" if cross else "does not cross-attend")
                                      + ": CompVis' crossattn conditioning feeds the context to SpatialTransformers only.")
        config, state = STAGES[key](pipe)
        return {"cond_stage_key": key, "cond_stage_trainable": True, "conditioning_key": "crossattn"}, config, state
    if cross:
        raise NotImplementedError("unet: it cross-attends, but the pipeline has no encoder to give it a context.")
    return STAGES[key](pipe, vae_state)


def _unconditional_stage(pipe, vae_state: dict) -> tuple[dict, str, dict]:
    return {"cond_stage_key": "image", "cond_stage_trainable": False}, "__is_unconditional__", {}


def _segmentation_stage(pipe, vae_state: dict) -> tuple[dict, dict, dict]:
    """CompVis' SpatialRescaler is the same module as ours; without one, CompVis has no segmentation model."""
    rescaler = getattr(pipe, "segmentation_encoder", None)
    if not isinstance(rescaler, SpatialRescaler):
        raise NotImplementedError(f"segmentation_encoder ({type(rescaler).__name__}): CompVis' is a SpatialRescaler.")
    params = {k: v for k, v in rescaler.config.items() if not k.startswith("_")}
    state = {f"cond_stage_model.{k}": v for k, v in rescaler.state_dict().items()}
    return ({"cond_stage_key": "segmentation", "cond_stage_trainable": True, "conditioning_key": "concat"},
            {"target": ENCODERS + "SpatialRescaler", "params": params}, state)


def _super_resolution_stage(pipe, vae_state: dict) -> tuple[dict, dict, dict]:
    """The low-resolution image itself."""
    return ({"cond_stage_key": "LR_image", "cond_stage_trainable": False, "conditioning_key": "concat"},
            {"target": "torch.nn.Identity"}, {})


def _inpainting_stage(pipe, vae_state: dict) -> tuple[dict, str, dict]:
    """The first stage again (``__is_first_stage__``), for a VQ first stage with scale 1 only."""
    if not is_vq_config(pipe.vae.config) or latent_scaling_factor(pipe.vae) != 1.0:
        raise NotImplementedError(
            "inpainting with " + (f"a latent scale of {latent_scaling_factor(pipe.vae):g}: CompVis concatenates the "
                                  "first stage's encoding of the masked image unscaled" if is_vq_config(pipe.vae.config)
                                  else "a KL first stage: CompVis' inpainting (scripts/inpaint.py) concatenates "
                                  "cond_stage_model.encode(masked image), a tensor only for a VQ first stage") + ".")
    state = {f"cond_stage_model.{k}": v for k, v in vae_state.items()}  # __is_first_stage__: the first stage again
    return ({"cond_stage_key": "masked_image", "cond_stage_trainable": False, "conditioning_key": "concat"},
            "__is_first_stage__", state)


# how CompVis builds each cond_stage_key: (pipe) -> (cond_stage_config, weights) for cross-attention keys,
# (pipe, first-stage weights) -> (LatentDiffusion params, cond_stage_config, weights) for the others
STAGES = {"caption": _text_stage, "class_label": _class_stage, "coordinates_bbox": _layout_stage,
          "segmentation": _segmentation_stage, "LR_image": _super_resolution_stage, "masked_image": _inpainting_stage,
          "image": _unconditional_stage}
