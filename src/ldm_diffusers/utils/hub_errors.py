"""Errors of downloads from the Hub that say which repository, revision and server were asked and what to do.

Low level on purpose (it imports nothing else from ldm_diffusers), so that model loading
(:mod:`ldm_diffusers.utils.checkpoints`) and the pipeline downloads in :mod:`ldm_diffusers.hub` share it.
"""

from __future__ import annotations

import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path


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
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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
