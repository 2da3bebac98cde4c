"""Sampling that stops at the first NaN or inf, naming the step, instead of decoding a black image."""

from __future__ import annotations

import torch


class NonFiniteWatch:
    """Raises ``FloatingPointError`` naming the sampler step (1-based) and timestep at which the latents first
    held a NaN or inf (from the UNet, the scheduler step or a callback), instead of a black image at the end.

    One ``isfinite().all()`` reduction per step, which never touches the latents (outputs stay bit-identical).
    On the CPU the result is read at once (no device queue to stall). On an accelerator reading it every step
    would be a host sync per step, so ``deferred`` keeps the first bad step in a device tensor and reads it once
    in :meth:`finish`, after the loop (the remaining steps then run on NaN; nothing is decoded)."""

    def __init__(self, timesteps, deferred: bool):
        self.timesteps, self.deferred, self.first_bad = timesteps, deferred, None

    def check(self, latents: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(latents).all()
        if not self.deferred:
            if not finite:
                self._raise(step, "NaN" if torch.isnan(latents).any() else "inf")
        elif self.first_bad is None:
            self.first_bad = torch.where(finite, -1, step)
        else:
            self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)

    def finish(self) -> None:
        if self.first_bad is not None and (step := int(self.first_bad.item())) >= 0:
            self._raise(step, "NaN or inf")

    def _raise(self, step: int, what: str):
        raise FloatingPointError(
            f"latents became {what} at step {step + 1} of {len(self.timesteps)} (timestep {int(self.timesteps[step])}): "
            "the UNet output, the scheduler step or callback_on_step_end produced a non-finite value (check the "
            "model's weights, the dtype (float16 overflows) and guidance_scale); sampling stopped."
        )
