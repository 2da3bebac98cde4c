"""One request of the web demo: the pipeline call, and the ``ldm-diffusers generate`` command (plus the input
files it reads) that makes the same images again.

The call is the one ``ldm-diffusers generate`` makes (one CPU generator seeded with the seed for the whole batch,
``num_images_per_prompt`` = the number of images, the mode's eta, the model's default size), so the command reproduces
the demo's images; for inpainting the demo then pastes the unmasked part of the user's image back over the
result, which the command does not (inside the mask both are the same).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..schedulers import switch_sampler

OUTPUT_FILE = "samples.png"


@dataclass
class Settings:
    """The controls every mode has. ``sampler``: a name in ``ldm_diffusers.schedulers.SAMPLERS`` or "model" (the
    scheduler saved with the model); ``seed`` in 0..2**64 - 1; ``fast``: ``pipe.enable_fast_sampling()``."""

    sampler: str = "dpm++"
    steps: int = 10
    guidance_scale: float = 1.0
    seed: int = 0
    num_images: int = 1
    fast: bool = False


def run(pipe, scheduler, inputs: dict, settings: Settings, on_step: Callable[[int, int], None] | None = None):
    """PIL images of ``pipe`` for the pipeline ``inputs`` (as the mode's demo widgets give them; the pipeline pastes
    an inpainting's unmasked pixels back). ``scheduler``: the model's own, which
    ``settings.sampler`` switches from; ``on_step(done, total)`` is called after every denoising step."""
    pipe.scheduler = scheduler if settings.sampler == "model" else switch_sampler(scheduler, settings.sampler)
    if settings.fast and pipe.fast_sampling is None:
        pipe.enable_fast_sampling()
    elif not settings.fast:
        pipe.disable_fast_sampling()

    def step_done(p, i, t, tensors):
        on_step(i + 1, len(p.scheduler.timesteps))

    size, f = pipe.select_mode(inputs).output_size(pipe, inputs), pipe.vae_scale_factor
    trained = pipe.tiling_for(None, None)
    pipe.tiling = None
    if size is not None and not trained.covers(size[0] // f, size[1] // f):
        # a large upload: windows of the trained size, the progress counted in windows x (steps + the decode)
        total, done = trained.count(size[0] // f, size[1] // f) * (settings.steps + 1), [0]

        def window_done(n):
            done[0] += n
            on_step(min(done[0], total), total)

        pipe.tiling = replace(trained, progress=window_done if on_step else None)
        step_done = None

    return pipe(**inputs, num_images_per_prompt=settings.num_images if inputs else 1,
                batch_size=settings.num_images, num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale, eta=None,
                generator=torch.Generator("cpu").manual_seed(settings.seed),
                callback_on_step_end=step_done if on_step and step_done else None).images


def write_inputs(mode, inputs: dict, folder: str | Path) -> tuple[list[str], list[Path]]:
    """(the ``generate`` flags of the mode that give ``inputs`` again, the input files they name), the files
    written into ``folder``."""
    folder = Path(folder)
    before = set(folder.iterdir())
    words = mode.command_words(inputs, folder) if inputs else []
    return words, sorted(set(folder.iterdir()) - before)


def generate_command(model: str, words: list[str], settings: Settings, device: str) -> str:
    """The ``ldm-diffusers generate`` line that samples the same images from the mode's ``words`` (as
    ``write_inputs`` gives them; what follows a "--" among them goes last), run where the input files are (one
    image, or a grid of ``num_images``, in ``OUTPUT_FILE``)."""
    cut = words.index("--") if "--" in words else len(words)
    line = ["ldm-diffusers", "generate", *words[:cut], "--model", model, "--scheduler", settings.sampler,
            "--steps", str(settings.steps), "--guidance_scale", repr(float(settings.guidance_scale)), "--seed",
            str(settings.seed), "--batch", str(settings.num_images), "--device", device, "--out", OUTPUT_FILE]
    return shlex.join(line + (["--fast"] if settings.fast else []) + words[cut:])


def caption(settings: Settings, index: int) -> str:
    """The parameters shown under image ``index`` (0-based) of a request."""
    return (f"image {index + 1} of {settings.num_images} · seed {settings.seed} · {settings.sampler}, "
            f"{settings.steps} steps · guidance {settings.guidance_scale:g}")


def parameters(model: str, mode, inputs: dict, settings: Settings, images) -> dict:
    """What the page shows beside a request's images: the model and mode, the settings, the mode's text-like
    inputs (the image inputs are the files the command reads) and the images' size."""
    shown = {"model": model, "mode": mode.name, **vars(settings), **(mode.shown_inputs(inputs) if inputs else {})}
    return {**shown, "size": f"{images[0].width}x{images[0].height}"}
