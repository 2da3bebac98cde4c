"""The registry of conditioning modes: the one place that lists them.

The pipeline, the training script, ``ldm-diffusers generate``, the web demo, the Hub cards and the CompVis
exporter iterate over :func:`modes` and ask each mode; a new mode needs only :func:`register_mode`.
"""

from __future__ import annotations

from ..models.unet import unet_cross_attends
from .base import Conditioning, ConditioningMode

_MODES: dict[str, ConditioningMode] = {}


class UnconditionalMode(ConditioningMode):
    """No condition: ``batch_size`` images from noise. The fallback when no other mode's input is given."""

    name = "unconditional"
    kind = "none"
    title = "unconditional"
    conditioned_on = "nothing (unconditional)"
    pipeline_tag = "unconditional-image-generation"
    usage = "image = pipe().images[0]"
    compvis_cond_stage_key = "image"

    @property
    def input_name(self) -> str:
        return "unconditional sampling"

    def is_selected(self, values):
        return False  # chosen only when no other mode is

    def recognises(self, pipe):
        config = pipe.unet.config
        return config.in_channels == config.out_channels and not unet_cross_attends(config)

    def batch_size(self, values):
        return values["batch_size"]

    def condition(self, pipe, values, latent_size):
        return Conditioning()

    def drop(self, pipe, values, mask):
        return values


UNCONDITIONAL = UnconditionalMode()


def register_mode(mode: ConditioningMode, replace: bool = False) -> ConditioningMode:
    """Add ``mode`` (before the unconditional fallback); ``replace``: take the place of a mode of the same name."""
    if not isinstance(mode, ConditioningMode) or not mode.name:
        raise TypeError(f"A conditioning mode is a ConditioningMode instance with a name, got {mode!r}.")
    if mode.name in _MODES and not replace:
        raise ValueError(f"A conditioning mode named '{mode.name}' is registered already; pass replace=True.")
    taken = {i: m.name for m in _MODES.values() if m.name != mode.name for i in m.inputs[:1]}
    if mode.inputs and mode.inputs[0] in taken:
        raise ValueError(f"The input '{mode.inputs[0]}' already selects the '{taken[mode.inputs[0]]}' mode.")
    _MODES.pop(UNCONDITIONAL.name, None)
    _MODES[mode.name] = mode
    _MODES[UNCONDITIONAL.name] = UNCONDITIONAL
    return mode


def unregister_mode(name: str) -> None:
    """Remove the mode called ``name`` (the unconditional fallback stays)."""
    if name != UNCONDITIONAL.name:
        _MODES.pop(name, None)


def modes() -> tuple[ConditioningMode, ...]:
    """Every registered mode, the unconditional fallback last."""
    return tuple(_MODES.values())


def mode_named(name: str) -> ConditioningMode:
    if name not in _MODES:
        raise ValueError(f"Unknown conditioning mode '{name}'; the registered modes are {', '.join(_MODES)}.")
    return _MODES[name]


def mode_of(pipe) -> ConditioningMode:
    """The mode of a loaded pipeline: the one its config names (pipelines this package saves), else the first
    that recognises its components and UNet (converted checkpoints, older folders)."""
    name = getattr(getattr(pipe, "config", None), "conditioning_mode", None)
    if name:
        return mode_named(name)
    for mode in _MODES.values():
        if mode.recognises(pipe):
            return mode
    raise ValueError("This pipeline matches no registered conditioning mode (its encoders and its UNet's input "
                     "channels fit none); register the mode it was trained with (ldm_diffusers.register_mode).")


def component_names() -> tuple[str, ...]:
    """Every pipeline component some mode needs, in registration order."""
    return tuple(dict.fromkeys(c for mode in _MODES.values() for c in mode.components))


def input_names() -> tuple[str, ...]:
    """Every call argument some mode reads."""
    return tuple(dict.fromkeys(i for mode in _MODES.values() for i in mode.inputs))
