"""The conditioning switch, written once.

Every way of conditioning an LDM is a :class:`ConditioningMode`: it names the call arguments it reads,
the pipeline components it needs, and turns the user's input into a :class:`Conditioning` (tokens
for cross-attention and/or channels to concatenate to z_t) plus its "null" version for
classifier-free guidance (None where the paper has none). The pipeline and the training loop only
talk to this interface; each mode lives in its own file.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

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
    """

    context: torch.Tensor | None = None
    concat: torch.Tensor | None = None

    def repeat_interleave(self, n: int) -> "Conditioning":
        return Conditioning(*(None if t is None else t.repeat_interleave(n, dim=0) for t in (self.context, self.concat)))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Batch several conditionings (e.g. [null, cond] for guidance in one forward pass)."""
        def join(tensors):
            return None if tensors[0] is None else torch.cat(tensors)

        return Conditioning(join([c.context for c in items]), join([c.concat for c in items]))

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """z_t with the concatenated channels appended: [B, c_latent + c_concat, h, w]."""
        return latents if self.concat is None else torch.cat([latents, self.concat.to(latents.dtype)], dim=1)


@dataclass
class TrainingColumns:
    """Where a training dataset keeps each mode's input, and what spatial modes need to know."""

    caption_column: str = "text"
    class_column: str = "label"
    layout_column: str = "layout"
    segmentation_column: str = "segmentation"
    downsampling_factor: int = 4


class ConditioningMode:
    """One conditioning mode. Subclasses set ``name``, ``inputs`` (call arguments; the first one
    selects the mode), ``components`` (pipeline components it needs), ``kind`` and implement
    :meth:`condition` (and :meth:`null_values` where the mode has an unconditional input).

    ``pipe`` is anything with the pipeline's attributes (``vae``, ``unet``, the encoders,
    ``_execution_device``): the pipeline when sampling, the training loop's components when training.
    """

    name: str = ""
    inputs: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    kind: str = "context"  # "context": cross-attention tokens; "concat": channels concatenated to z_t
    cacheable: bool = True  # False where every step needs a fresh stage-1 encoding (random inpainting masks)

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
