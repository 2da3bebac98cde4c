"""Model cards rendered from the templates in ``card_templates/`` (package data) with ``huggingface_hub``, and the card
of one component.

Low level on purpose: models and conditioning encoders take :class:`ComponentCardMixin` from here, and it
imports none of them; each component describes itself in ``_card_details``. The pipeline-level cards and
uploads are in :mod:`ldm_diffusers.hub`, above the pipeline.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATES = resources.files("ldm_diffusers.utils") / "card_templates"  # installed with the package, wherever it is

# What a component's ``_card_details()`` returns: (description, tags, pipeline tag, table rows).
CardDetails = tuple[str, list[str], str | None, list[tuple[str, object]]]


def template_text(name: str) -> str:
    template = TEMPLATES / name
    if not template.is_file():
        raise FileNotFoundError(f"Model card template '{name}' is missing from {TEMPLATES}: reinstall ldm-diffusers.")
    return template.read_text(encoding="utf-8")


def _fmt(value, digits=4):
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "n/a" if value is None else str(value)


def _render_card(template: str, repo_id: str, *, pipeline_tag: str | None, tags: list[str],
                 datasets: list[str] | None = None, base_model: str | None = None, license: str = "apache-2.0",
                 **fields):
    """A ``huggingface_hub.ModelCard`` from ``card_templates/<template>``, with the Hub metadata every
    card here shares (diffusers library, ldm-diffusers / latent-diffusion tags; Apache-2.0 unless the weights
    come under another license)."""

    card_data = ModelCardData(library_name="diffusers", license=license, pipeline_tag=pipeline_tag,
                              tags=["ldm-diffusers", "latent-diffusion", *tags], datasets=datasets,
                              base_model=base_model)
    return ModelCard.from_template(card_data, template_str=template_text(template),
                                   model_name=repo_id.split("/")[-1], repo_id=repo_id, **fields)


def component_model_card(model, repo_id: str, base_model: str | None = None, datasets: list[str] | None = None,
                         template: str = "component.md", extra_tags: tuple[str, ...] = (), **fields):
    """A ``huggingface_hub.ModelCard`` for one saved component (UNet, autoencoder, conditioning encoder), from
    ``template`` (``converted.md`` for a converted CompVis model, with its own ``fields``)."""
    if not isinstance(model, ComponentCardMixin):
        raise TypeError(f"No model card for {type(model).__name__}: not an ldm-diffusers component.")
    description, tags, pipeline_tag, rows = model._card_details()
    bases = [c.__name__ for c in type(model).__mro__ if c.__module__.startswith("diffusers.")]
    return _render_card(
        template,
        repo_id,
        pipeline_tag=pipeline_tag,
        tags=[*tags, *extra_tags],
        datasets=datasets,
        base_model=base_model,
        **fields,
        description=description,
        class_name=type(model).__name__,
        base_class=bases[0] if bases else "ModelMixin",
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        details=[(k, v) for k, v in rows if v is not None],
    )


class ComponentCardMixin:
    """diffusers' ``push_to_hub`` for a model, with this package's model card (:func:`component_model_card`,
    Hub metadata included) in place of diffusers' generic one.

    A class that mixes it in describes itself for the card with ``_card_details(self) -> CardDetails``:
    (description, tags, pipeline tag or None when it does not run on its own, table rows)."""

    def _upload_folder(self, working_dir, repo_id: str, token=None, commit_message=None, create_pr=False,
                       subfolder=None):
        if not subfolder:  # a component pushed into a pipeline's subfolder leaves the pipeline's card alone
            component_model_card(self, repo_id).save(Path(working_dir) / "README.md")
        return super()._upload_folder(working_dir, repo_id, token=token, commit_message=commit_message,
                                      create_pr=create_pr, subfolder=subfolder)
