"""The Gradio app: the inputs of the pipeline's conditioning mode, the sampling controls every mode has, a
gallery with the parameters of each image, and the ``ldm-diffusers generate`` command that reproduces them.

Requests go through Gradio's queue one at a time (the pipeline and its scheduler are shared), so a second
request waits for the first; bad inputs raise ``gr.Error``, which the page shows as a message.
"""

from __future__ import annotations

import secrets
import tempfile
import uuid
from pathlib import Path

try:
    import gradio as gr
except ImportError as err:  # an optional extra
    raise ImportError("The web demo needs Gradio: pip install 'ldm-diffusers[demo]' (or run scripts/install.sh).") \
        from err

from ..pipelines import LDMPipeline
from ..schedulers import SAMPLERS
from .generation import Settings, caption, generate_command, parameters, run, write_inputs

MAX_SEED = 2**32 - 1  # random seeds; any seed up to 2**53 can be typed (the page's numbers are doubles)


def load_pipeline(model: str, device: str = "cpu"):
    """``LDMPipeline.from_pretrained(model)`` (a folder, Hub id or ``builtin:`` name) on ``device``."""

    return LDMPipeline.from_pretrained(model).to(device)


def build_demo(pipe, model: str) -> gr.Blocks:
    """The app for ``pipe`` (loaded from ``model``, which the reproduce command names), queued one request at a
    time. ``demo.launch()`` serves it."""
    mode = pipe.mode
    guided = mode.can_guide(pipe)
    scheduler = pipe.scheduler  # the model's own; every request switches from it
    device = str(pipe.device)
    files = Path(tempfile.mkdtemp(prefix="ldm-demo-"))  # each request's input files (small), which the page serves

    with gr.Blocks(title=f"ldm-diffusers: {model}", analytics_enabled=False) as demo:
        gr.Markdown(f"## ldm-diffusers · {mode.title} · `{model}`")
        with gr.Row():
            with gr.Column():
                components, to_inputs = mode.demo_inputs(gr, pipe)
                sampler = gr.Dropdown(sorted(SAMPLERS) + ["model"], value="dpm++", label="Sampler",
                                      info="'model': the scheduler saved with the model", elem_id="sampler")
                steps = gr.Slider(1, 250, value=10, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(1.0, 10.0, value=3.0 if guided else 1.0, step=0.5, label="Guidance scale",
                                     interactive=guided, elem_id="guidance",
                                     info=None if guided else "this mode has no unconditional input to guide against")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, maximum=2**53, label="Seed", elem_id="seed")
                    random_seed = gr.Checkbox(True, label="random seed", elem_id="random-seed")
                num_images = gr.Slider(1, 4, value=1, step=1, label="Number of images", elem_id="num-images")
                fast = gr.Checkbox(False, label="fast sampling", elem_id="fast",
                                   info="compile the UNet and decoder first (about a minute on a CPU, then faster "
                                        "steps)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Results", columns=2, format="png", buttons=["download", "fullscreen"],
                                     elem_id="gallery")
                command = gr.Textbox(label="Reproduce with ldm-diffusers generate (in a folder with the input files)",
                                     lines=2, max_lines=6, interactive=False, buttons=["copy"], elem_id="command")
                shown = gr.JSON(label="Generation parameters", elem_id="parameters")
                input_files = gr.File(label="Input files the command reads", file_count="multiple",
                                      visible=False,
                                      elem_id="input-files")

        def generate(sampler_name, n_steps, scale, seed_value, random, n_images, use_fast, *values,
                     progress=gr.Progress()):
            try:
                inputs = to_inputs(*values)
                settings = Settings(sampler_name, int(n_steps), float(scale),
                                    secrets.randbelow(MAX_SEED + 1) if random else int(seed_value or 0),
                                    int(n_images), bool(use_fast))
                progress(0, desc="Denoising")
                images = run(pipe, scheduler, inputs, settings,
                             lambda done, total: progress((done, total), desc="Denoising", unit="steps"))
                folder = files / uuid.uuid4().hex
                folder.mkdir()
                words, written = write_inputs(mode, inputs, folder)
            except (ValueError, FloatingPointError) as err:
                raise gr.Error(str(err)) from None
            return ([(image, caption(settings, i)) for i, image in enumerate(images)],
                    generate_command(model, words, settings, device),
                    parameters(model, mode, inputs, settings, images),
                    gr.File([str(path) for path in written] or None, visible=bool(written)), settings.seed)

        button.click(generate, [sampler, steps, guidance, seed, random_seed, num_images, fast, *components],
                     [gallery, command, shown, input_files, seed], concurrency_limit=1, show_progress_on=gallery)
    return demo.queue(default_concurrency_limit=1)


def launch_demo(model: str, device: str = "cpu", port: int | None = None, share: bool = False) -> None:
    """Load ``model``, build its app and serve it on ``port`` (Gradio's default 7860 when None) until stopped;
    ``share``: also through a public gradio.live link."""
    build_demo(load_pipeline(model, device), model).launch(server_port=port, share=share, ssr_mode=False)
