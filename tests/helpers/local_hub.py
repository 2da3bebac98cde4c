"""A local Hugging Face Hub for the tests: olah serving git repositories over real HTTP on 127.0.0.1.

olah (https://github.com/vtuber-plan/olah) is a Hub-compatible server; in its offline mode it serves the git
repositories under its ``mirrors-path`` (``<root>/models/<org>/<name>``) with the Hub's API and file routes,
so the real huggingface_hub client (``snapshot_download``, ``hf_hub_download``, ``model_info``) talks to it as
to huggingface.co. It pins its own fastapi / pydantic, so ``scripts/install.sh`` installs it into a separate
virtual environment (``$LDM_OLAH_VENV``, default ``~/.cache/ldm_diffusers/olah-venv``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

OLAH_VENV = Path(os.environ.get("LDM_OLAH_VENV", Path.home() / ".cache" / "ldm_diffusers" / "olah-venv"))
OLAH_CLI = OLAH_VENV / "bin" / "olah-cli"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(cwd: Path, *args: str, data: bytes | None = None, index: Path | None = None) -> str:
    """``git *args`` in ``cwd`` as a fixed test identity; ``data`` goes to stdin, ``index`` replaces .git/index."""
    env = dict(os.environ, GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@localhost",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@localhost")
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    return subprocess.run(["git", *args], cwd=cwd, input=data, check=True, capture_output=True,
                          env=env).stdout.decode().strip()


class LocalHub:
    """olah on a free loopback port over temporary folders; ``publish`` commits a folder as a Hub repository."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> LocalHub:
        if not OLAH_CLI.exists():
            raise FileNotFoundError(f"olah is not installed at {OLAH_CLI}; run scripts/install.sh.")
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{self.root / "cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n\n[accessibility]\noffline = true\n'
        )
        self.log = open(self.root / "olah.log", "w")
        self.process = subprocess.Popen([str(OLAH_CLI), "-c", str(config)], cwd=self.root, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with {self.process.returncode}; see {self.root / 'olah.log'}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/api/models/none/none/revision/main", timeout=2)
                return self
            except urllib.error.HTTPError:  # any HTTP answer means it is serving
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"olah did not answer on {self.endpoint} within {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def repo_path(self, repo_id: str, kind: str = "models") -> Path:
        """The git repository of ``repo_id``; ``kind``: "models" or "spaces" (olah's mirror folders)."""
        return self.mirrors / kind / repo_id

    def publish(self, folder: Path, repo_id: str, tag: str | None = None, message: str = "upload") -> str:
        """Replace the repository's tree on ``main`` with ``folder``'s files, commit (and tag); returns the sha."""
        repo = self.repo_path(repo_id)
        if not (repo / ".git").exists():
            repo.mkdir(parents=True, exist_ok=True)
            _git(repo, "init", "-q", "-b", "main")
        for child in repo.iterdir():
            if child.name != ".git":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        shutil.copytree(folder, repo, dirs_exist_ok=True)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "--allow-empty", "-m", message)
        if tag:
            _git(repo, "tag", tag)
        return _git(repo, "rev-parse", "HEAD")


def point_huggingface_hub_at(endpoint, tmp_path, monkeypatch):
    """huggingface_hub's endpoint (HF_ENDPOINT, also for subprocesses), with an empty cache and no hf_xet."""
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # subprocesses too (this conftest sets 1 for every other test)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # create_repo, upload_folder, ... bound at import
