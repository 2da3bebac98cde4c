"""argparse types and checks shared by the command line and the training scripts: a bad value is refused by
argparse with a message naming the flag and the allowed values ("argument --steps: must be an integer >= 1,
got '0'")."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..pretrained import MODELS, PREFIX
from .model_files import missing_local_folder


def int_type(low: int | None = None, high: int | None = None):
    """An argparse ``type=``: an integer in [low, high]."""
    if low is not None and high is not None:
        allowed = f"an integer in {low}..{high}"
    else:
        allowed = "an integer" + (f" >= {low}" if low is not None else "") + (f" <= {high}" if high is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def class_label(text: str) -> int | str:
    """An argparse ``type=``: a class id (an integer >= 0) or a class name (any other non-blank text)."""
    value = text.strip()
    if not value:
        raise argparse.ArgumentTypeError(f"must be a class id (an integer >= 0) or a class name, got {text!r}")
    if value.lstrip("+-").isdigit():
        return int_type(0)(value)
    return value


def float_type(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse ``type=``: a finite float in [low, high] (``low_open`` / ``high_open``: excluding that end)."""
    parts = [f"{'>' if low_open else '>='} {low:g}" if low is not None else "",
             f"{'<' if high_open else '<='} {high:g}" if high is not None else ""]
    allowed = "a finite number" + (" " + " and ".join(p for p in parts if p) if any(parts) else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or (
                high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
positive_int = int_type(1)
non_negative_int = int_type(0)
non_negative_float = float_type(0.0)
positive_float = float_type(0.0, low_open=True)
probability = float_type(0.0, 1.0)
beta = float_type(0.0, 1.0, high_open=True)  # Adam's betas
seed_type = int_type(0, 2**32 - 1)  # numpy's seed range (accelerate.set_seed seeds numpy too)


def check_model_path(parser: argparse.ArgumentParser, flag: str, value: str | None) -> None:
    """``parser.error`` when ``value`` can only mean a local folder (see ``missing_local_folder``) that is not there:
    a mistyped model folder fails here, naming the flag and the path, before anything loads. Hub ids ("org/name")
    pass through to the loaders; ``builtin:`` names are checked against the built-in models."""
    if value is None:
        return
    if value.startswith("builtin:"):
        if value[len(PREFIX):] not in MODELS:
            parser.error(f"{flag} {value}: unknown built-in model; built-in models: {', '.join(PREFIX + m for m in MODELS)}.")
        return
    path = Path(value).expanduser()
    if not path.is_dir() and missing_local_folder(value):
        what = "a file, not a folder" if path.is_file() else "no such folder"
        parser.error(f"{flag} {value}: {what}. Pass a saved model folder or a Hub id 'org/name'.")
