"""Whether a component's config is what the converter builds back from its exported CompVis config: the check that
makes ``convert(export(model))`` give the model back, with a reason for every key CompVis cannot express."""

from __future__ import annotations

import inspect

# Settings only training reads (no weight shape depends on them): not compared; CompVis' UNetModel takes ``dropout``.
TRAINING_ONLY = {"dropout", "beta"}
HEAD_KEYS = {"attention_head_dim", "num_attention_heads", "attention_head_counts"}  # checked per level instead
# Why a config value has no CompVis counterpart, for the keys one is likely to meet.
REASONS = {
    "norm_num_groups": "every CompVis normalisation is a GroupNorm of 32 groups",
    "use_linear_projection": "SpatialTransformer's proj_in / proj_out are 1x1 convolutions, not linear layers",
    "addition_embed_type": "UNetModel adds no text / image / time-id embeddings to the timestep embedding",
    "class_embed_type": "UNetModel adds no class embedding to the timestep embedding",
    "encoder_hid_dim_type": "UNetModel cross-attends to the context as it is, without a projection",
    "mid_block_add_attention": "every CompVis Encoder / Decoder has an AttnBlock in the middle unless attn_type none",
    "scaling_factor": "a CompVis autoencoder config has no latent scale (the LatentDiffusion config holds it as "
                      "scale_factor): export the pipeline, or register_to_config(scaling_factor=1.0) first",
    "has_null_class": "CompVis' ClassEmbedder has no null class; the converter reads one only as class 1000 of "
                      "n_classes 1001 (cin256-v2)",
}


def plain(value):
    """Config values as plain YAML data (tuples -> lists)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def check_config(component: str, model, config: dict, cls, kwargs: dict, what: str, skip=frozenset()) -> None:
    """Raise ``NotImplementedError`` unless every key of ``config`` (``model``'s, normalised) is what the converter
    builds from the exported CompVis config: ``cls(**kwargs)``, defaults for the rest."""
    wanted, own = {**_defaults(cls), **kwargs}, _defaults(type(model))
    bad = []
    for key, value in config.items():
        want = wanted.get(key, own.get(key))  # a key the converter's class lacks: the model's default is fine
        if not key.startswith("_") and key not in skip and plain(value) != plain(want):
            bad.append(f"{key}={plain(value)!r} where CompVis gives {plain(want)!r}"
                       + (f" ({REASONS[key]})" if key in REASONS else ""))
    if bad:
        raise NotImplementedError(f"{component} ({type(model).__name__}) cannot be written as a CompVis {what}: "
                                  f"{'; '.join(bad)}.")
