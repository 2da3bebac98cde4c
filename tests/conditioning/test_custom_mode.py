"""A new conditioning mode, defined here and nowhere in the package, is registered and then trains, samples, saves,
loads, shows in ``ldm-diffusers generate --help`` and runs from it, and shows in the web demo: the proof that every
part of the package asks the mode and none branches on it."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_diffusers import LDMPipeline
from ldm_diffusers.cli import main as cli_main
from ldm_diffusers.conditioning import (
    Conditioning,
    ConditioningMode,
    Encoders,
    InputError,
    register_mode,
    unregister_mode,
)
from ldm_diffusers.training.latent_diffusion import main as train_main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class BrightnessMode(ConditioningMode):
    """``brightness`` (a float in [0, 1] or one per image) -> one constant channel of 2 * brightness - 1 at the
    latent size, concatenated to z_t. Trained on each image's own mean brightness."""

    name = "brightness"
    inputs = ("brightness",)
    kind = "concat"
    title = "brightness-conditional"
    conditioned_on = "a brightness in [0, 1]"
    usage = "image = pipe(brightness=0.8).images[0]"

    @staticmethod
    def _values(values) -> torch.Tensor:
        return torch.as_tensor(values["brightness"], dtype=torch.float32).reshape(-1)

    def check_inputs(self, pipe, values):
        b = self._values(values)
        if not ((b >= 0) & (b <= 1)).all():
            raise ValueError(f"brightness must lie in [0, 1], got {b.tolist()}.")

    def batch_size(self, values):
        return self._values(values).shape[0]

    def condition(self, pipe, values, latent_size):
        b = self._values(values).to(pipe._execution_device)
        return Conditioning(concat=(2 * b - 1).view(-1, 1, 1, 1).expand(-1, 1, *latent_size))

    def add_training_arguments(self, group):
        group.add_argument("--brightness_gamma", type=float, default=1.0, help="Brightness mode: b ** gamma.")

    def build_encoders(self, args, train_ds, vae):
        self.gamma = args.brightness_gamma
        return Encoders(concat_channels=1)

    def training_inputs(self, batch, columns, rngs=None):
        mean = ((batch["pixel_values"].float() + 1) / 2).mean(dim=(1, 2, 3))
        return {"brightness": mean.clamp(0, 1) ** getattr(self, "gamma", 1.0)}

    def add_generate_arguments(self, parser):
        parser.add_argument("--brightness", type=float, default=None, help="For a brightness-conditional model.")

    def generate_inputs(self, args):
        return None if args.brightness is None else {"brightness": [args.brightness]}

    def command_words(self, inputs, folder):
        return ["--brightness", repr(float(inputs["brightness"][0]))]

    def demo_inputs(self, gr, pipe):
        def to_inputs(value):
            if value is None:
                raise InputError("Set a brightness first.")
            return {"brightness": [float(value)]}

        return [gr.Slider(0.0, 1.0, value=0.5, label="Brightness", elem_id="brightness")], to_inputs


@pytest.fixture
def brightness_mode():
    mode = register_mode(BrightnessMode())
    yield mode
    unregister_mode(mode.name)


def test_a_mode_defined_outside_the_package_goes_everywhere(brightness_mode, stage1, emoji16, tmp_path, capsys):
    from helpers.training import read_log, stage2_args

    out = tmp_path / "brightness"
    train_main(stage2_args(stage1, emoji16, out, "--conditioning", "brightness", "--brightness_gamma", "0.5",
                         "--max_train_steps", "4"))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert brightness_mode.gamma == 0.5  # its own training flag reached it

    pipe = LDMPipeline.from_pretrained(out)  # saved and loaded: the folder names its mode
    assert pipe.mode is brightness_mode and pipe.config.conditioning_mode == "brightness"
    assert pipe.unet.config.in_channels - pipe.unet.config.out_channels == 1
    pipe.set_progress_bar_config(disable=True)
    dark, bright = pipe(brightness=[0.0, 1.0], num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images
    assert dark.shape == bright.shape == (16, 16, 3) and not np.allclose(dark, bright)
    with pytest.raises(ValueError, match="brightness must lie in"):
        pipe(brightness=2.0, num_inference_steps=2)

    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])
    assert "--brightness BRIGHTNESS" in capsys.readouterr().out
    cli_main(["generate", "--model", str(out), "--brightness", "0.25", "--steps", "2", "--out", str(tmp_path / "b.png")])
    assert Image.open(tmp_path / "b.png").size == (16, 16)

    from ldm_diffusers.demo import generate_command, write_inputs
    from ldm_diffusers.demo.app import build_demo

    demo = build_demo(pipe, str(out))
    ids = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert ids["brightness"].value == 0.5 and not ids["guidance"].interactive
    assert "brightness-conditional" in next(b.value for b in demo.blocks.values() if type(b).__name__ == "Markdown")
    generate = next(f.fn for f in demo.fns.values() if f.name == "generate")
    gallery, command, shown, _, _ = generate("ddim", 2, 1.0, 3, False, 1, False, 0.75)
    assert len(gallery) == 1 and "--brightness 0.75" in command and shown["mode"] == "brightness"
    words, files = write_inputs(brightness_mode, {"brightness": [0.75]}, tmp_path)
    assert files == [] and generate_command(str(out), words, *_settings()).count("--brightness") == 1


def _settings():
    from ldm_diffusers.demo import Settings

    return Settings("ddim", 2, 1.0, 3, 1, False), "cpu"
