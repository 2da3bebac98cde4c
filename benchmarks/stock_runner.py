"""Runs diffusers' ``train_text_to_image.py`` (the first argument; the rest are its own) unchanged, with the PIL
stand-ins of ``torchvision.transforms`` in ``stock_shims/``. transformers and diffusers are imported first, so that they
record torchvision as absent (it is) and never reach for the parts of torchvision the stand-ins do not have."""

import runpy
import sys
from pathlib import Path

import diffusers  # noqa: F401
import transformers
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401  (their lazy modules resolved now)

assert not transformers.utils.import_utils.is_torchvision_available()  # cached: the stand-in stays invisible to it
sys.path.insert(0, str(Path(__file__).resolve().parent / "stock_shims"))
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
