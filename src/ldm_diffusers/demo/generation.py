"""One request of the web demo: the pipeline call, and the ``ldm-diffusers generate`` command (plus the input
files it reads) that makes the same images again.

The call is the one ``ldm-diffusers generate`` makes (one CPU generator seeded with the seed for the whole batch,
``num_images_per_prompt`` = the number of images, eta 0, the model's default size), so the command reproduces
the demo's images; for inpainting the demo then pastes the unmasked part of the user's image back over the
result, which the command does not (inside the mask both are the same).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .inputs import paste_unmasked

# the files the command reads, per pipeline input
INPUT_FILES = {"image": "image.png", "mask_image": "mask.png", "segmentation_map": "segmentation.png",
               "layout": "layout.json"}
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
    """PIL images of ``pipe`` for the pipeline ``inputs`` (as the ``*_inputs`` functions of
    :mod:`ldm_diffusers.demo.inputs` give them). ``scheduler``: the model's own, which ``settings.sampler``
    switches from; ``on_step(done, total)`` is called after every denoising step."""
    from ..schedulers import switch_sampler

    pipe.scheduler = scheduler if settings.sampler == "model" else switch_sampler(scheduler, settings.sampler)
    if settings.fast and pipe.fast_sampling is None:
        pipe.enable_fast_sampling()
    elif not settings.fast:
        pipe.disable_fast_sampling()

    def step_done(p, i, t, tensors):
        on_step(i + 1, len(p.scheduler.timesteps))

    images = pipe(**inputs, num_images_per_prompt=settings.num_images if inputs else 1,
                  batch_size=settings.num_images, num_inference_steps=settings.steps,
                  guidance_scale=settings.guidance_scale, eta=0.0,
                  generator=torch.Generator("cpu").manual_seed(settings.seed),
                  callback_on_step_end=step_done if on_step else None).images
    if "mask_image" in inputs:
        images = [paste_unmasked(image, inputs["image"], inputs["mask_image"]) for image in images]
    return images


def write_inputs(inputs: dict, folder: str | Path) -> list[Path]:
    """The image, mask, segmentation map (an 'L' PNG of class ids) and layout (JSON) in ``inputs`` as the files
    the command names (``INPUT_FILES``) in ``folder``; returns their paths."""
    folder = Path(folder)
    written = []
    for key, name in INPUT_FILES.items():
        value = inputs.get(key)
        if value is None:
            continue
        path = folder / name
        if key == "layout":
            path.write_text(json.dumps(value))
        elif key == "segmentation_map":
            ids = np.asarray(value)
            if ids.max() > 255:
                raise ValueError(f"segmentation_map has class ids up to {ids.max()}; an 'L' PNG holds 0..255.")
            Image.fromarray(ids.astype(np.uint8), mode="L").save(path)
        else:
            value.save(path)
        written.append(path)
    return written


def generate_command(model: str, inputs: dict, settings: Settings, device: str) -> str:
    """The ``ldm-diffusers generate`` line that samples the same images, run where ``write_inputs`` put the
    input files (one image, or a grid of ``num_images``, in ``OUTPUT_FILE``)."""
    words = ["ldm-diffusers", "generate"]
    prompt = inputs.get("prompt")
    if prompt and not prompt[0].startswith("-"):
        words.append(prompt[0])
    words += ["--model", model]
    if inputs.get("negative_prompt"):
        words += ["--negative_prompt", inputs["negative_prompt"][0]]
    if inputs.get("class_labels") is not None:
        words += ["--class_labels", *(str(c) for c in inputs["class_labels"])]
    for key, name in INPUT_FILES.items():
        if inputs.get(key) is not None:
            words += [f"--{key}", name]
    words += ["--scheduler", settings.sampler, "--steps", str(settings.steps), "--guidance_scale",
              repr(float(settings.guidance_scale)), "--seed", str(settings.seed), "--batch", str(settings.num_images),
              "--device", device, "--out", OUTPUT_FILE]
    if settings.fast:
        words.append("--fast")
    if prompt and prompt[0].startswith("-"):  # after "--", argparse reads it as the prompt, not a flag
        words += ["--", prompt[0]]
    return shlex.join(words)


def caption(settings: Settings, index: int) -> str:
    """The parameters shown under image ``index`` (0-based) of a request."""
    return (f"image {index + 1} of {settings.num_images} · seed {settings.seed} · {settings.sampler}, "
            f"{settings.steps} steps · guidance {settings.guidance_scale:g}")


def parameters(model: str, mode: str, inputs: dict, settings: Settings, images) -> dict:
    """What the page shows beside a request's images: the model and mode, the settings, the prompt, class or
    layout (the image inputs are the files the command reads) and the images' size."""
    shown = {"model": model, "mode": mode, **vars(settings)}
    if "prompt" in inputs:
        shown.update(prompt=inputs["prompt"][0], negative_prompt=(inputs["negative_prompt"] or [""])[0])
    if "class_labels" in inputs:
        shown["class_labels"] = inputs["class_labels"]
    if "layout" in inputs:
        shown["layout"] = json.dumps(inputs["layout"])
    return {**shown, "size": f"{images[0].width}x{images[0].height}"}
