"""The model card of an :class:`~ldm_diffusers.LDMPipeline` (``utils/card_templates/pipeline.md``): what it is
conditioned on (its mode's words), its parts and its schedule, with Hub metadata."""

from __future__ import annotations

from ..conditioning import conditioning_encoders
from ..models.autoencoders import is_vq_config, latent_scaling_factor
from ..models.unet import unet_cross_attends
from ..utils.model_cards import _fmt, _render_card


def pipeline_model_card(pipe, repo_id: str, extra_text: str = "", datasets: list[str] | None = None,
                        base_model: str | None = None):
    """A ``huggingface_hub.ModelCard`` for an :class:`~ldm_diffusers.LDMPipeline`, from ``pipeline.md``."""
    encoders = [(name, type(module).__name__) for name, module in conditioning_encoders(pipe).items()]
    concat = pipe.unet.config.in_channels - pipe.unet.config.out_channels
    mode = pipe.mode
    sched = pipe.scheduler.config
    return _render_card(
        "pipeline.md",
        repo_id,
        pipeline_tag=mode.pipeline_tag,
        tags=["diffusers:LDMPipeline"],
        datasets=datasets,
        base_model=base_model,
        vae_kind="VQ-regularised" if is_vq_config(pipe.vae.config) else "KL-regularised",
        vae_class=type(pipe.vae).__name__,
        f=pipe.vae_scale_factor,
        latent_channels=pipe.unet.config.out_channels,
        scaling_factor=_fmt(latent_scaling_factor(pipe.vae), 6),
        unet_class=type(pipe.unet).__name__,
        unet_params=f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M",
        context_dim=pipe.unet.config.cross_attention_dim if unet_cross_attends(pipe.unet.config) else None,
        concat_channels=concat,
        encoders=encoders,
        conditioning=mode.conditioned_on,
        scheduler_class=type(pipe.scheduler).__name__,
        beta_start=sched.beta_start,
        beta_end=sched.beta_end,
        beta_schedule=sched.beta_schedule,
        prediction_type=sched.prediction_type,
        extra_text=extra_text,
        usage=mode.usage,
    )
