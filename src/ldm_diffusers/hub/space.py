"""A Hugging Face Space (Gradio SDK) that serves the web demo for a model: ``app.py``, ``requirements.txt`` and
a README with the Space's metadata. ``examples/app.py`` is the app written for the built-in model.

    pipe.push_to_hub("org/my-ldm")                  # the model first
    push_space("org/my-ldm-demo", "org/my-ldm")   # then its Space; or: ldm-diffusers demo --model org/my-ldm --push_space org/my-ldm-demo
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path

from huggingface_hub import create_repo, upload_folder

from .cards import hub_base_model

SDK_VERSION = "6.31.0"  # the Gradio version the demo is tested with (setup.cfg's `demo` extra)

APP = '''"""A Hugging Face Space: the ldm-diffusers web demo for {model}.

Written by ldm_diffusers.hub.space_files; run it anywhere with `python app.py` (pip install 'ldm-diffusers[demo]').
"""

import torch

from ldm_diffusers.demo.app import build_demo, load_pipeline

MODEL = {model_literal}

demo = build_demo(load_pipeline(MODEL, "cuda" if torch.cuda.is_available() else "cpu"), MODEL)

if __name__ == "__main__":
    demo.launch()
'''

README = """---
title: {title}
emoji: 🎨
colorFrom: indigo
colorTo: pink
sdk: gradio
sdk_version: {sdk_version}
app_file: app.py
pinned: false
license: apache-2.0
{models}tags:
- ldm-diffusers
- latent-diffusion
---

# {title}

The ldm-diffusers web demo for `{model}`: the inputs of the model's
conditioning mode, sampler, steps, guidance, seed and number of images, and under the results the
`ldm-diffusers generate` command that makes the same images on your machine.
"""


def check_space_model(model: str) -> None:
    """A Space can load a Hub id or a built-in model, not a folder on this machine."""
    if not model.startswith("builtin:") and hub_base_model(model) is None:
        raise ValueError(f"A Space cannot load '{model}' (a local folder or not a Hub id 'org/name'): push the "
                         "model first (LDMPipeline.push_to_hub) and give its Hub id, or a builtin: model.")


def space_files(model: str, requirement: str | None = None) -> dict[str, str]:
    """{file name: text} of the Space for ``model`` (a Hub id or ``builtin:`` name). ``requirement``: the
    requirements.txt line that installs ldm-diffusers there (default: this version from PyPI with the demo extra;
    e.g. ``ldm-diffusers[demo] @ git+https://...`` for an unreleased one)."""
    check_space_model(model)
    hub = not model.startswith("builtin:")
    return {
        "app.py": APP.format(model=model, model_literal=json.dumps(model)),
        "requirements.txt": (requirement or f"ldm-diffusers[demo]=={version('ldm-diffusers')}") + "\n",
        "README.md": README.format(title=f"{model.split('/')[-1].split(':')[-1]} demo", sdk_version=SDK_VERSION,
                                   model=model, models=f"models:\n- {model}\n" if hub else ""),
    }


def push_space(space_id: str, model: str, token: str | None = None, private: bool | None = None,
               requirement: str | None = None):
    """Create the Space ``space_id`` (Gradio SDK) if needed and upload :func:`space_files` for ``model``.
    Returns huggingface_hub's ``CommitInfo``."""
    files = space_files(model, requirement)
    space_id = create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, token=token,
                           exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        return upload_folder(repo_id=space_id, repo_type="space", folder_path=tmp, token=token,
                             commit_message=f"Web demo for {model}")
