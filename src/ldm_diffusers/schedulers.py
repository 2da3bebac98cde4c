"""Noise schedules and samplers of the paper, as presets over diffusers' schedulers.

CompVis' "linear" schedule is linear in sqrt(beta), which is diffusers' ``scaled_linear``:

* unconditional and class-conditional LDMs: beta from 0.0015 to 0.0195 over 1000 steps;
* text-to-image LDMs: beta from 0.00085 to 0.012 over 1000 steps.

Samplers: DDPM, DDIM (with eta), PLMS (PNDM with ``skip_prk_steps``) and DPM-Solver++ (multistep).
"""

from __future__ import annotations

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
