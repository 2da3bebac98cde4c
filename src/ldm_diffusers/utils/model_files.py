"""Safe loading of model folders and atomic writes of training state.

diffusers' loaders fall back to pickle ``.bin`` files and surface a corrupt safetensors file as a
bare deserialisation error; these helpers refuse pickles and say what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import nullcontext
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open

from .hub_download import hub_download_errors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A model folder or training checkpoint that cannot be loaded safely."""


def _local_folder(path, subfolder=None) -> Path | None:
    folder = Path(path)
    if subfolder:
        folder = folder / subfolder
    return folder if Path(path).is_dir() else None


def missing_local_folder(name: str) -> bool:
    """Whether ``name`` (not an existing folder) can only mean a local path: it is not a valid Hub id
    ("name" or "org/name"), it exists as a file, or its parent folder exists here (``outputs/ldm`` when
    ``outputs/`` exists: a mistyped or unsaved model folder, not a Hub repository)."""

    path = Path(name).expanduser()
    if path.exists() or (path.parent != Path(".") and path.parent.is_dir()):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def read_config(path, subfolder=None) -> dict:
    folder = _local_folder(path, subfolder)
    if folder is None:
        with hub_download_errors(str(path), subfolder=subfolder):
            return json.loads(Path(hf_hub_download(str(path), "config.json", subfolder=subfolder)).read_text())
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"No config.json in '{folder}'. Save the model with `save_pretrained(folder)` first.")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{config_file}' is not valid JSON ({err}); re-save the model.") from err


def check_safetensors_file(file: Path) -> None:
    """Raise CheckpointError unless ``file`` has a readable safetensors header."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # safetensors raises its own error type for every header problem
        raise CheckpointError(
            f"'{file}' is not a valid safetensors file ({err}). The file is corrupt or truncated; "
            "re-save the model with `save_pretrained` or copy the file again."
        ) from err


def check_model_folder(path, subfolder=None) -> None:
    """For a local folder: config present, weights present as safetensors, headers readable."""
    folder = _local_folder(path, subfolder)
    if folder is None:
        return
    if not folder.is_dir():
        raise CheckpointError(f"'{folder}' does not exist; check the path and `subfolder=`.")
    check_not_being_written(folder)
    read_config(path, subfolder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"'{folder}' holds only pickle checkpoints ({', '.join(pickles)}). ldm-diffusers loads safetensors "
                "only, since unpickling can run arbitrary code. If you trust the file, convert it once: load it with "
                "the stock diffusers class and call `save_pretrained(folder, safe_serialization=True)`."
            )
        raise CheckpointError(
            f"No weights in '{folder}': expected diffusion_pytorch_model.safetensors next to config.json."
        )
    for file in weights:
        check_safetensors_file(file)


def safe_from_pretrained(loader, pretrained_model_name_or_path, **kwargs):
    """Call ``loader.from_pretrained`` (a class or ``super()``) with safetensors only and checked files."""
    check_model_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
    kwargs.setdefault("use_safetensors", True)
    downloads = nullcontext() if _local_folder(pretrained_model_name_or_path) is not None else hub_download_errors(
        str(pretrained_model_name_or_path), kwargs.get("revision"), kwargs.get("cache_dir"), kwargs.get("subfolder"))
    try:
        with downloads:
            return loader.from_pretrained(pretrained_model_name_or_path, **kwargs)
    except Exception as err:
        if "safetensors" in type(err).__module__ or "deserializ" in str(err).lower():
            raise CheckpointError(
                f"Could not read the weights of '{pretrained_model_name_or_path}': {err}. "
                "The safetensors file is corrupt; re-save the model."
            ) from err
        raise


def atomic_directory(final_dir: str | os.PathLike) -> Path:
    """A temporary sibling folder to write into; publish it with :func:`publish_directory`."""
    final_dir = Path(final_dir)
    tmp = final_dir.parent / f".{final_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def publish_directory(tmp_dir: Path, final_dir: str | os.PathLike) -> None:
    """Move a fully written folder into place; an older folder of the same name is replaced whole (a kill
    between the two renames leaves no folder of that name, never a mix of old and new files)."""
    final_dir = Path(final_dir)
    for file in tmp_dir.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if final_dir.exists():
        old = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)


def discard_directory(path: str | os.PathLike) -> None:
    """Delete a folder so that no half-deleted copy is ever seen under its name: rename it away first."""
    path = Path(path)
    trash = path.parent / f".{path.name}.trash-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash)


PUBLISHING_MARKER = ".incomplete-save"


def publish_into(tmp_dir: Path, output_dir: str | os.PathLike) -> None:
    """Move every entry of a fully written ``tmp_dir`` into ``output_dir`` (files with ``os.replace``,
    folders with :func:`publish_directory`), leaving other entries of ``output_dir`` alone.

    Several renames cannot be one atomic step, so ``output_dir`` carries :data:`PUBLISHING_MARKER` while they
    happen: a process killed half-way leaves a folder that the loaders refuse (:func:`check_not_being_written`)
    until a later save, e.g. the one ``--resume_from_checkpoint latest`` ends with, completes it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    marker = output_dir / PUBLISHING_MARKER
    marker.write_text(f"being replaced by {Path(tmp_dir).name}\n")
    for entry in sorted(Path(tmp_dir).iterdir()):
        if entry.is_dir():
            publish_directory(entry, output_dir / entry.name)
        else:
            with open(entry, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(entry, output_dir / entry.name)
    Path(tmp_dir).rmdir()
    marker.unlink()


def check_not_being_written(path: str | os.PathLike) -> None:
    """Refuse a local model folder (or a component folder inside one) whose save was interrupted."""
    folder = Path(path)
    for candidate in (folder, folder.parent):
        if (candidate / PUBLISHING_MARKER).exists():
            raise CheckpointError(
                f"'{candidate}' was being saved when the process writing it stopped ({PUBLISHING_MARKER} is still "
                "there), so its files may mix two versions. If a training run wrote it, run the same command again "
                "with --resume_from_checkpoint latest: it saves the model again. Otherwise save it again."
            )


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporary folders (``.name.tmp-*``, ``.name.old-*``, ``.name.trash-*``) that a killed
    writer left in ``folder``; they are never read, only wasted space. Returns what was removed."""
    folder = Path(folder)
    stale = [p for pattern in (".*.tmp-*", ".*.old-*", ".*.trash-*") for p in folder.glob(pattern)] if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return stale
