"""The conditioning switch, written once.

Every way of conditioning an LDM is a :class:`ConditioningMode`: it names the call arguments it reads,
the pipeline components it needs, and turns the user's input into a :class:`Conditioning` (tokens
for cross-attention and/or channels to concatenate to z_t) plus its "null" version for
classifier-free guidance (None where the paper has none). The pipeline and the training loop only
talk to this interface; each mode lives in its own file.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or NumPy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def shown(value) -> str:
    """``value`` for an error message: its repr, shortened, with its type where the repr does not show it."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if isinstance(value, (int, float, str, type(None))) else f"{text} ({type(value).__name__})"


@dataclass
class Conditioning:
    """What eps_theta receives besides (z_t, t).

    context: tokens [B, n, d] for cross-attention (K, V), or None.
    concat: spatially aligned input [B, c, h, w] at the latent size, concatenated to z_t, or None.
    tokens: the encoder's input ids [B, n] where tiled sampling re-encodes them for each window (CompVis'
    layout crop tokens), or None.
    """

    context: torch.Tensor | None = None
    concat: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def _tensors(self):
        return self.context, self.concat, self.tokens

    def repeat_interleave(self, n: int) -> "Conditioning":
        return Conditioning(*(None if t is None else t.repeat_interleave(n, dim=0) for t in self._tensors()))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Batch several conditionings (e.g. [null, cond] for guidance in one forward pass)."""
        def join(tensors):
            return None if tensors[0] is None else torch.cat(tensors)

        return Conditioning(*(join(list(parts)) for parts in zip(*(c._tensors() for c in items))))

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """z_t with the concatenated channels appended: [B, c_latent + c_concat, h, w]."""
        return latents if self.concat is None else torch.cat([latents, self.concat.to(latents.dtype)], dim=1)


class TrainingColumns:
    """Where a training dataset keeps each mode's input: ``columns.<name>_column`` for every ``--<name>_column``
    flag of the run (a mode that adds such a flag reads it here), and ``downsampling_factor``, the stage-1 f."""

    def __init__(self, downsampling_factor: int = 4, **names: str):
        self.downsampling_factor = downsampling_factor
        self.caption_column, self.class_column = "text", "label"
        self.layout_column, self.segmentation_column = "layout", "segmentation"
        self.__dict__.update(names)

    @classmethod
    def from_args(cls, args, downsampling_factor: int) -> "TrainingColumns":
        """Every ``*_column`` attribute of the parsed training flags that is set."""
        names = {k: v for k, v in vars(args).items() if k.endswith("_column") and k != "image_column" and v}
        return cls(downsampling_factor, **names)

    def flags_for(self, columns) -> list[str]:
        """The ``--*_column`` flags that name any of ``columns``."""
        return [f"--{field}" for field, value in vars(self).items() if field.endswith("_column") and value in columns]


@dataclass
class Encoders:
    """What a mode builds for training: ``trainable`` modules (trained with the UNet, saved as pipeline components),
    ``frozen`` components (a pretrained text encoder, a tokenizer), the UNet's ``context_dim`` (cross-attention token
    width, None: no cross-attention) and ``concat_channels`` (channels concatenated to z_t)."""

    trainable: dict = field(default_factory=dict)
    frozen: dict = field(default_factory=dict)
    context_dim: int | None = None
    concat_channels: int = 0


def conditioning_encoders(pipe) -> dict[str, torch.nn.Module]:
    """{name: module} of a loaded pipeline's tau_theta: every component with weights besides the autoencoder and the
    UNet (a text, class, layout or segmentation encoder; tokenizers and the scheduler left out)."""
    return {name: module for name, module in pipe.components.items()
            if name not in ("vae", "unet") and isinstance(module, torch.nn.Module)}


def add_argument_once(parser, *flags: str, **kwargs) -> None:
    """``parser.add_argument(*flags, **kwargs)`` unless a mode already declared the flag (several modes read
    ``--image`` or ``--num_classes``): each flag is declared once, by the first mode that needs it."""
    container = getattr(parser, "_actions_container", parser)  # an argument group adds to its parser's options
    if flags[0] not in container._option_string_actions and not any(
            action.dest == flags[0] for action in container._actions if not action.option_strings):
        parser.add_argument(*flags, **kwargs)


class ConditioningMode:
    """One conditioning mode, and everything the package knows about it: the pipeline, the training script, the
    command line, the web demo, the Hub cards and the CompVis exporter ask the mode and never branch on it. A new
    mode is a subclass passed to :func:`~ldm_diffusers.conditioning.register_mode`.

    Subclasses set ``name``, ``inputs`` (call arguments; the first one selects the mode), ``components`` (pipeline
    components it needs), ``kind`` and implement :meth:`condition` (and :meth:`null_values` where the mode has an
    unconditional input). ``pipe`` is anything with the pipeline's attributes (``vae``, ``unet``, the encoders,
    ``_execution_device``): the pipeline when sampling, the training loop's components when training.
    """

    name: str = ""
    inputs: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    kind: str = "context"  # "context": cross-attention tokens; "concat": channels concatenated to z_t
    cacheable: bool = True  # False where every step needs a fresh stage-1 encoding (random inpainting masks)
    trains_null: bool = False  # training drops the condition to its null input (--conditioning_dropout_prob 0.1)
    same_context_per_window: bool = True  # tiled sampling gives every window the same cross-attention tokens
    title: str = ""  # "text-to-image": the demo's heading
    conditioned_on: str = ""  # "text prompts": the model card's "conditioned on ..."
    pipeline_tag: str = "image-to-image"  # the Hub's pipeline tag
    usage: str = ""  # one line of Python that samples a pipeline of this mode (the model card's example)
    default_dataset: str = "emoji"  # the training set when neither --dataset_name nor --train_data_dir is given
    noise_schedule: str = "unconditional"  # the beta preset (ldm_diffusers.schedulers.LDM_SCHEDULES)
    default_eta: float = 0.0  # DDIM's eta when a call gives none
    compvis_cond_stage_key: str | None = None  # CompVis LatentDiffusion's cond_stage_key; None: no CompVis model

    @property
    def input_name(self) -> str:
        """The call argument that selects the mode, for messages."""
        return f"`{self.inputs[0]}`"

    # -- recognising a pipeline -------------------------------------------------------------------
    def recognises(self, pipe) -> bool:
        """Whether ``pipe`` (a loaded pipeline that does not name its mode) is of this mode: by default, it has
        every component of the mode."""
        return bool(self.components) and all(getattr(pipe, c, None) is not None for c in self.components)

    def can_guide(self, pipe) -> bool:
        """Whether ``pipe`` has this mode's null input, so that guidance_scale > 1 applies."""
        return False

    def check_inputs(self, pipe, values: dict) -> None:
        """Refuse malformed inputs of this mode, before anything is encoded or sampled, with a ``TypeError`` /
        ``ValueError`` that names the argument and what it accepts. The pipeline calls it once the mode is chosen
        (so the mode's components exist); the training loop does not (its inputs come from a dataset)."""

    def is_selected(self, values: dict) -> bool:
        """Whether the call's arguments ask for this mode."""
        return values.get(self.inputs[0]) is not None

    def batch_size(self, values: dict) -> int:
        raise NotImplementedError

    def condition(self, pipe, values: dict, latent_size: tuple[int, int]) -> Conditioning:
        """The conditioning for a batch of ``batch_size(values)`` inputs."""
        raise NotImplementedError

    def null_values(self, pipe, values: dict) -> dict | None:
        """The inputs of the "null" condition for classifier-free guidance (same batch size), or None
        where the mode has none."""
        return None

    def encode(self, pipe, values: dict, latent_size: tuple[int, int]) -> tuple[Conditioning, Conditioning | None]:
        """(condition, null condition or None) for a batch of ``batch_size(values)`` inputs."""
        null = self.null_values(pipe, values)
        return self.condition(pipe, values, latent_size), None if null is None else self.condition(pipe, null, latent_size)

    def window_context(self, pipe, cond: Conditioning, box: tuple[float, float, float, float]) -> torch.Tensor:
        """The cross-attention tokens of tiled sampling's window at ``box`` (x, y, width, height as fractions of
        the image): the same for every window, unless the mode sets ``same_context_per_window = False``."""
        return cond.context

    def drop(self, pipe, values: dict, mask: torch.Tensor) -> dict:
        """``values`` with the rows where ``mask`` [B] is True replaced by the null input: the condition
        dropout that trains one model to be both conditional and unconditional (classifier-free guidance)."""
        if not bool(mask.any()):
            return values
        null = self.null_values(pipe, values)
        if null is None:
            raise ValueError(f"The {self.name} mode has no null input, so it cannot be dropped; set the dropout to 0.")
        key = self.inputs[0]
        kept, nulls = values[key], null[key]
        if isinstance(kept, torch.Tensor):
            dropped = torch.where(mask.to(kept.device).view(-1, *[1] * (kept.ndim - 1)), nulls.to(kept.device), kept)
        else:
            dropped = [n if m else k for k, n, m in zip(kept, nulls, mask.tolist())]
        return {**values, key: dropped}

    def output_size(self, pipe, values: dict) -> tuple[int, int] | None:
        """(height, width) the input fixes, for modes whose input is an image; else None."""
        return None

    # -- training ---------------------------------------------------------------------------------
    def dataset_columns(self, columns: TrainingColumns) -> dict[str, str]:
        """{dataset column: input name} that a training row must provide."""
        return {}

    def training_inputs(self, batch: dict, columns: TrainingColumns, rngs: list | None = None) -> dict:
        """The mode's call inputs for a collated training batch (``pixel_values`` [B, 3, H, W] in
        [-1, 1] unless latents were cached, plus the renamed dataset columns); ``rngs`` are per-example
        ``numpy.random.Generator`` for modes that draw random inputs."""
        return {name: batch[name] for name in self.dataset_columns(columns).values()}

    def cache_inputs(self, batch: dict, columns: TrainingColumns) -> dict[str, torch.Tensor]:
        """Tensors derived from the pixels that a latent cache must keep for :meth:`training_inputs`."""
        return {}

    # -- training (ldm-diffusers train) -------------------------------------------------------------
    def add_training_arguments(self, group) -> None:
        """The mode's own flags of ``ldm-diffusers train`` (declare shared ones with :func:`add_argument_once`)."""

    def check_training_args(self, parser, args) -> None:
        """Refuse a bad combination of the mode's training flags with ``parser.error``."""

    def build_encoders(self, args, train_ds, vae) -> Encoders:
        """tau_theta for training from scratch, from the flags and the training set; the UNet is built around it."""
        return Encoders()

    def pretrained_encoders(self, pipe, args) -> Encoders:
        """The mode's components of a pipeline to continue training from: its modules train with the UNet, the
        rest (tokenizers) stays frozen."""
        parts = Encoders()
        for name in self.components:
            module = getattr(pipe, name, None)
            if module is not None:
                (parts.trainable if isinstance(module, torch.nn.Module) else parts.frozen)[name] = module
        return parts

    def frozen_context(self, frozen: dict):
        """``fn(rows) -> tokens`` where the mode's cross-attention tokens come from a frozen encoder alone, so the
        latent cache may keep them (with ``fn`` of the null input as ``fn(None)``); else None."""
        return None

    def validation_values(self, args) -> dict | None:
        """Call inputs the run's flags fix for its validation grids (e.g. ``--validation_prompts``), or None for
        the first validation rows' inputs."""
        return None

    # -- ldm-diffusers generate ---------------------------------------------------------------------
    def add_generate_arguments(self, parser) -> None:
        """The mode's flags of ``ldm-diffusers generate``."""

    def generate_inputs(self, args) -> dict | None:
        """The call inputs the parsed ``generate`` flags give this mode, None where they do not select it; files are
        read here, and a bad one is a ``ValueError`` naming the flag."""
        return None

    def command_words(self, inputs: dict, folder) -> list[str]:
        """The ``generate`` flags that give ``inputs`` again, writing any input files they name into ``folder``."""
        return []

    # -- web demo -------------------------------------------------------------------------------------
    def demo_inputs(self, gr, pipe) -> tuple[list, object]:
        """(Gradio input components, built inside a Blocks, and ``fn(*their values) -> call inputs``); ``gr`` is the
        gradio module. A missing or bad value raises :class:`InputError` with the message the page shows."""
        return [], lambda *values: {}

    def shown_inputs(self, inputs: dict) -> dict:
        """What the demo lists beside the images for ``inputs`` (text-like inputs; images are files)."""
        return {}

    def finish(self, pipe, values: dict, images: torch.Tensor) -> torch.Tensor:
        """The decoded images [B, 3, H, W] in [-1, 1], finished (inpainting pastes the known pixels back)."""
        return images


class InputError(ValueError):
    """A missing or bad value in a demo widget, with a message for the page."""
