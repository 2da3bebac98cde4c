"""The conditioning switch, written once.

Every way of conditioning an LDM is a :class:`ConditioningMode`: it names the call arguments it reads,
the pipeline components it needs, and turns the user's input into a :class:`Conditioning` (tokens
for cross-attention and/or channels to concatenate to z_t) plus its "null" version for
classifier-free guidance (None where the paper has none). The pipeline and the training loop only
talk to this interface; each mode lives in its own file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class ConditioningMode:
    """One conditioning mode. Subclasses set ``name``, ``inputs`` (call arguments; the first one
    selects the mode), ``components`` (pipeline components it needs), ``kind`` and implement
    :meth:`encode`."""

    name: str = ""
    inputs: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    kind: str = "context"  # "context": cross-attention tokens; "concat": channels concatenated to z_t

    def is_selected(self, values: dict) -> bool:
        """Whether the call's arguments ask for this mode."""
        return values.get(self.inputs[0]) is not None

    def batch_size(self, values: dict) -> int:
        raise NotImplementedError

    def encode(self, pipe, values: dict, latent_size: tuple[int, int]) -> tuple[Conditioning, Conditioning | None]:
        """(condition, null condition or None) for a batch of ``batch_size(values)`` images."""
        raise NotImplementedError

    def output_size(self, pipe, values: dict) -> tuple[int, int] | None:
        """(height, width) the input fixes, for modes whose input is an image; else None."""
        return None
