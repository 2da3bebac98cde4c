"""Noise schedules and samplers of the paper, as presets over diffusers' schedulers.

CompVis' "linear" schedule is linear in sqrt(beta), which is diffusers' ``scaled_linear``:

* unconditional and class-conditional LDMs: beta from 0.0015 to 0.0195 over 1000 steps;
* text-to-image LDMs: beta from 0.00085 to 0.012 over 1000 steps.

Samplers: DDPM, DDIM (with eta), PLMS (PNDM with ``skip_prk_steps``) and DPM-Solver++ (multistep).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

SCHEDULE_PRESETS = {
    "unconditional": {"beta_start": 0.0015, "beta_end": 0.0195},
    "class": {"beta_start": 0.0015, "beta_end": 0.0195},
    "text": {"beta_start": 0.00085, "beta_end": 0.012},
}

SAMPLERS = {
    "ddpm": (DDPMScheduler, {"clip_sample": False, "variance_type": "fixed_small"}),
    # CompVis' DDIM uses alpha_bar of the first step (not 1) as the final "previous" value
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def ldm_scheduler(
    sampler: str = "ddim", preset: str = "text", prediction_type: str = "epsilon", num_train_timesteps: int = 1000
):
    """A diffusers scheduler with the paper's schedule. ``sampler``: ddpm, ddim, plms or dpm++;
    ``preset``: unconditional, class or text; ``prediction_type``: epsilon or v_prediction."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler '{sampler}': choose one of {sorted(SAMPLERS)}.")
    if preset not in SCHEDULE_PRESETS:
        raise ValueError(f"Unknown schedule preset '{preset}': choose one of {sorted(SCHEDULE_PRESETS)}.")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got '{prediction_type}'.")
    cls, extra = SAMPLERS[sampler]
    return cls(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        **SCHEDULE_PRESETS[preset],
        **extra,
    )


def switch_sampler(scheduler, sampler: str):
    """The same noise schedule (betas, prediction type) with another sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler '{sampler}': choose one of {sorted(SAMPLERS)}.")
    cls, extra = SAMPLERS[sampler]
    return cls.from_config(scheduler.config, **extra)


class CompVisDDIMScheduler(DDIMScheduler):
    """diffusers' ``DDIMScheduler`` with CompVis' timestep table (``make_ddim_timesteps("uniform")``): the steps
    ``range(0, T, T // S) + steps_offset`` from high to low. When S divides T this is diffusers' "leading" spacing;
    when it does not, CompVis runs more than S steps (S=7 of 1000: 8 steps 995, 853, ..., 1), and converted
    models are sampled the way their authors sampled them."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        super().set_timesteps(num_inference_steps, device)
        total = self.config.num_train_timesteps
        table = np.arange(0, total, total // num_inference_steps)[::-1].copy() + self.config.steps_offset
        self.timesteps = torch.from_numpy(table).to(device)


def compvis_ddim_scheduler(linear_start: float, linear_end: float, num_train_timesteps: int = 1000):
    """DDIM exactly as CompVis samples: their "linear" schedule (linear in sqrt(beta)), no clipping of the
    predicted z_0, alpha_bar_0 (not 1) as the last step's previous value, timesteps 1 + k * (T // S)."""
    return CompVisDDIMScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=linear_start, beta_end=linear_end,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )
