"""Downloads from the Hub: a pipeline's snapshot (safetensors and configs only), and errors that say which
repository, revision and server were asked and what to do.

Low level on purpose (it imports nothing else from ldm_diffusers), so that model loading
(:mod:`ldm_diffusers.utils.model_files`) and ``LDMPipeline.from_pretrained`` share it.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


class HubLoadError(OSError):
    """A pipeline could not be fetched from the Hub; the message names the repository and what to do."""


def _hub_error(err: BaseException):
    """The huggingface_hub or network error behind ``err`` (diffusers re-raises them as plain ``OSError``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (type(err).__module__.startswith(("huggingface_hub", "httpx", "httpcore"))
                or isinstance(err, (ConnectionError, TimeoutError))):
            return err
        err = err.__cause__ or err.__context__
    return None


def _missing_file(err: BaseException) -> str:
    match = re.search(r"/resolve/[^/\s]+/(\S+?)\.?(\s|$)", str(err))
    return f"'{match.group(1)}'" if match else "a file it needs"


@contextmanager
def hub_download_errors(repo_id: str, revision: str | None = None, cache_dir=None, subfolder: str | None = None):
    """Around downloads of ``repo_id``: an error says which repository, revision and server were asked and what
    to do (``HubLoadError``), and snapshot folders this download created are removed, so that a half-filled one
    is never taken for the whole model by a later ``HF_HUB_OFFLINE=1`` / ``local_files_only=True`` load."""
    cache = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshots = cache / "snapshots"
    existing = set(snapshots.iterdir()) if snapshots.is_dir() else set()
    where = (f"'{repo_id}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
             + (f" at revision '{revision}'" if revision else "") + f" on {constants.ENDPOINT}")
    try:
        with warnings.catch_warnings():
            # diffusers' ConfigMixin.load_config (under every ModelMixin/SchedulerMixin.from_pretrained of a Hub
            # id) always passes local_dir_use_symlinks="auto" to hf_hub_download, which huggingface_hub
            # deprecated and ignores; no argument of ours avoids it, so only that warning is silenced here.
            warnings.filterwarnings("ignore", message=r"The `local_dir_use_symlinks` argument is deprecated",
                                    category=UserWarning)
            yield where
    except Exception as err:
        for partial in (set(snapshots.iterdir()) if snapshots.is_dir() else set()) - existing:
            shutil.rmtree(partial, ignore_errors=True)
        for leftover in (cache / "blobs").glob("*.incomplete") if (cache / "blobs").is_dir() else []:
            leftover.unlink(missing_ok=True)
        cause = _hub_error(err)
        if isinstance(err, HubLoadError) or cause is None:
            raise
        if isinstance(cause, GatedRepoError):
            message = f"{where} is gated: accept its terms on the Hub and pass token= (or run `hf auth login`)."
        elif isinstance(cause, RevisionNotFoundError):
            message = f"{where}: no such revision. Pass an existing branch, tag or commit sha as revision=."
        elif isinstance(cause, RepositoryNotFoundError):
            message = (f"{where} was not found: check the repository id, the revision"
                       + (" and subfolder=" if subfolder else "")
                       + " (a private repository also needs token= or `hf auth login`).")
        elif isinstance(cause, LocalEntryNotFoundError):
            message = (f"{where} could not be reached and is not in the local cache ({cache}): check the network and "
                       "HF_ENDPOINT, or load it once while online (afterwards HF_HUB_OFFLINE=1 works).")
        elif isinstance(cause, EntryNotFoundError):
            message = (f"{where} has no file {_missing_file(cause)}: check subfolder= and the repository's files "
                       "(a model saved with save_pretrained or pushed with push_to_hub has config.json and "
                       "diffusion_pytorch_model.safetensors).")
        else:
            message = f"Downloading {where} failed ({type(cause).__name__}: {cause}). Nothing partial was kept; try again."
        raise HubLoadError(message) from err


def _incomplete_components(folder: Path) -> list[str]:
    """Components that model_index.json lists but the downloaded folder lacks (or lacks weights for)."""
    index = json.loads((folder / "model_index.json").read_text())
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        component = folder / name
        if not component.is_dir() or not any(component.iterdir()):
            missing.append(f"{name}/")
        elif (component / "config.json").is_file() and not any(component.glob("*.safetensors")):
            missing.append(f"{name}/*.safetensors")
    return missing


def download_pipeline(repo_id: str, ignore_patterns: list[str], revision: str | None = None, **kwargs) -> Path:
    """``snapshot_download`` of a pipeline repository into the Hub cache, returning its folder; errors as in
    :func:`hub_download_errors`, and a repository that lacks a listed component (or its weights) is refused."""
    with hub_download_errors(repo_id, revision, kwargs.get("cache_dir")) as where:
        folder = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=ignore_patterns, **kwargs))
        if not (folder / "model_index.json").is_file():
            raise HubLoadError(
                f"{where} has no model_index.json, so it is not a saved pipeline. Load a single component with its "
                f"class and subfolder (e.g. LDMUNet2DConditionModel.from_pretrained('{repo_id}', subfolder='unet')), "
                "or push a whole pipeline with LDMPipeline.push_to_hub."
            )
        missing = _incomplete_components(folder)
        if missing:
            raise HubLoadError(
                f"{where} is incomplete: model_index.json lists components whose files are not in the repository "
                f"({', '.join(missing)}). Push the whole pipeline again with LDMPipeline.push_to_hub (safetensors "
                "only: pickle weights are not downloaded)."
            )
        return folder


# a transformers model's config, safetensors weights and tokenizer files (no pickles, no other frameworks' weights)
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")


def download_model_files(repo_id: str, subfolders: list[str], revision: str | None = None) -> Path:
    """``snapshot_download`` of the config, safetensors and tokenizer files in ``subfolders`` of ``repo_id`` (``""``:
    the top level), returning the local folder; errors as in :func:`hub_download_errors`."""
    patterns = [f"{sub}/{p}" if sub else p for sub in subfolders for p in MODEL_FILES]
    with hub_download_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
