"""The package as a wheel installs it, away from this checkout: its data files (model card templates, the built-in
model) come with it, so a pipeline saved and pushed from an installed copy still gets its model card."""

import os
import shutil
import subprocess
import sys

import pytest

from helpers.paths import REPO

CODE = """
import sys, pathlib, torch
import ldm_diffusers
from ldm_diffusers import LDMAutoencoderKL
from ldm_diffusers.utils.model_cards import component_model_card

here = pathlib.Path(ldm_diffusers.__file__).resolve()
assert str(here).startswith(sys.prefix), (here, sys.prefix)  # the installed copy, not the checkout
vae = LDMAutoencoderKL.from_downsampling_factor(4, base_channels=8, channel_multipliers=[1, 1, 1], norm_num_groups=4)
print(component_model_card(vae, "org/tiny-vae").data.to_dict()["library_name"])
print(ldm_diffusers.LDMPipeline.from_pretrained("builtin:emoji-text-to-image").mode.name)
print(ldm_diffusers.LDMPipeline.from_pretrained("builtin:emoji-super-resolution").mode.name)  # the shared vae too
"""


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_writes_model_cards(tmp_path):
    source = tmp_path / "source"  # what the wheel is built from: the package's files, not the checkout's outputs
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(source)], check=True, timeout=600)
    (wheel,) = wheels.glob("ldm_diffusers-*.whl")
    venv = tmp_path / "venv"  # fresh, but seeing this machine's torch and diffusers rather than installing them again
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=600)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", CODE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["diffusers", "text", "super_resolution"]
