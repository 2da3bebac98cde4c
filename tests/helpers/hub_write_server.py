"""A TEST SERVER, not a Hub: the Hugging Face Hub's write API in front of olah, for the push tests.

olah (tests/helpers/local_hub.py) serves git repositories read-only. This server takes the requests that
huggingface_hub's ``create_repo`` / ``upload_folder`` / ``create_commit`` send when hf_xet is off
(``HF_HUB_DISABLE_XET=1``) and writes commits into the git repositories olah serves; every other request
is passed on to olah unchanged, so one endpoint behaves like huggingface.co for a push and the pull after it:

- ``POST /api/repos/create``                       new model or Space (first commit: ``.gitattributes``); 409 if
  it exists
- ``POST /api/{models,spaces}/{repo}/preupload/{revision}``  upload mode per file: "lfs" for binaries and files
  over 10 MB
- ``POST /[spaces/]{repo}.git/info/lfs/objects/batch``  Git LFS batch API (basic transfer): where to PUT each object
- ``PUT  /lfs-objects/{oid}``                        stores an object after checking its sha256 and size
- ``POST /api/{models,spaces}/{repo}/commit/{revision}``  ndjson commit: header, file, lfsFile, deletedFile,
  deletedFolder
- ``POST /api/validate-yaml``                        model-card and Space metadata checked against the Hub's
  published vocabularies (see :func:`hub_vocabulary`)

Write requests need a bearer token (any value, as a logged-in user has one). Simplifications, none visible to
the client: LFS objects are committed as ordinary git blobs (olah serves git blobs, not LFS pointers), there
are no pull requests, users, permissions or visibility, and repositories are models or Spaces (no datasets; a
Space is stored, not built or run).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import subprocess
import tempfile
import threading
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

from .local_hub import _git, free_port

HUB_JS = Path(os.environ.get("LDM_HUB_JS", Path.home() / ".cache" / "ldm_diffusers" / "hub-js"))
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files over 10 MB with LFS whatever their type


def hub_vocabulary() -> dict[str, set[str]]:
    """Pipeline tags and library names from ``@huggingface/tasks``; license ids, Space SDKs and Space colours from
    ``@huggingface/hub``: the Hub's own JavaScript packages (unpacked by scripts/install.sh into ``$LDM_HUB_JS``)."""
    tasks = HUB_JS / "tasks" / "dist" / "commonjs" / "index.js"
    licenses = HUB_JS / "hub" / "dist" / "src" / "types" / "public.d.ts"
    space = HUB_JS / "hub" / "dist" / "src" / "types" / "api" / "api-space.d.ts"
    if not tasks.is_file() or not licenses.is_file() or not space.is_file():
        raise FileNotFoundError(f"The Hub's metadata vocabularies are not in {HUB_JS}; run scripts/install.sh.")
    script = ("const t = require(process.argv[1]); console.log(JSON.stringify("
              "{pipeline_tags: t.PIPELINE_TYPES, libraries: t.ALL_MODEL_LIBRARY_KEYS}))")
    found = json.loads(subprocess.run(["node", "-e", script, str(tasks)], check=True, capture_output=True,
                                      text=True).stdout)
    def union(text: str, pattern: str) -> set[str]:
        return set(re.findall(r'"([^"]+)"', re.search(pattern, text).group(1)))

    colors = union(space.read_text(), r"colorFrom\?: ([^;]+);")
    return {"pipeline_tag": set(found["pipeline_tags"]), "library_name": set(found["libraries"]),
            "license": union(licenses.read_text(), r"export type License = ([^;]+);"),
            "sdk": union(licenses.read_text(), r"export type SpaceSdk = ([^;]+);"), "colorFrom": colors,
            "colorTo": colors}


def _is_repo_id(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", value) is not None


def metadata_errors(card_text: str, vocabulary: dict[str, set[str]], repo_type: str = "model"
                    ) -> tuple[list[str], list[str]]:
    """(errors, warnings): what the Hub would reject, or warn about, in a model card's or (``repo_type``
    "space") a Space README's YAML header; a Space must name its ``sdk``."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", card_text, re.S)
    if match is None:
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        return [f"invalid YAML: {err}"], []
    if not isinstance(meta, dict):
        return ["the metadata must be a mapping"], []
    errors = []
    for key, allowed in vocabulary.items():
        if key in meta and meta[key] not in allowed:
            errors.append(f'"{key}" must be one of the Hub\'s values, got {meta[key]!r}')
    for key in ("tags", "datasets", "language", "metrics"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list) and value
                                                                 and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a non-empty list of strings, got {value!r}')
    for key in ("datasets", "base_model"):
        values = meta.get(key)
        for value in [values] if isinstance(values, str) else values or []:
            if not _is_repo_id(value):
                errors.append(f'"{key}" must hold Hub repository ids, got {value!r}')
    if meta.get("license") == "other" and not meta.get("license_name"):
        errors.append('"license: other" needs "license_name"')
    if repo_type == "space" and "sdk" not in meta:
        errors.append('a Space needs "sdk" (one of ' + ", ".join(sorted(vocabulary["sdk"])) + ")")
    return errors, [] if meta else ["empty or missing yaml metadata in repo card"]


class HubWriteServer:
    """The write API above on a free loopback port, committing into ``hub``'s (a LocalHub) repositories."""

    def __init__(self, hub):
        self.hub = hub
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.objects = Path(hub.root) / "lfs-objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for the tests
        self.validated: list[tuple[list[str], list[str]]] = []  # (errors, warnings) of every card validated
        self.tokens: set[str] = set()  # the bearer tokens write requests came with
        self.fail_uploads = 0  # tests set it to refuse that many LFS uploads (an upload broken off mid-push)
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> HubWriteServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @cached_property
    def vocabulary(self) -> dict[str, set[str]]:
        return hub_vocabulary()

    # -- git -----------------------------------------------------------------------------------------
    def head(self, repo_id: str, branch: str, kind: str = "models") -> str | None:
        repo = self.hub.repo_path(repo_id, kind)
        result = subprocess.run(["git", "rev-parse", "--verify", "-q", f"refs/heads/{branch}"], cwd=repo,
                                capture_output=True, text=True)
        return result.stdout.strip() or None

    def commit(self, repo_id: str, branch: str, message: str, parent: str | None,
               add: dict[str, bytes], delete: list[str], delete_folders: list[str], kind: str = "models") -> str:
        """One commit on ``branch`` built with git plumbing in a private index (the work tree is not touched);
        ``kind``: "models" or "spaces"."""
        repo = self.hub.repo_path(repo_id, kind)
        with tempfile.TemporaryDirectory() as tmp:
            def git(*args, data: bytes | None = None) -> str:
                return _git(repo, *args, data=data, index=Path(tmp) / "index")

            if parent:
                git("read-tree", parent)
            for folder in delete_folders:
                for path in git("ls-files", "--", folder.rstrip("/") + "/").splitlines():
                    git("update-index", "--force-remove", path)
            for path in delete:
                git("update-index", "--force-remove", path)
            for path, data in add.items():
                sha = git("hash-object", "-w", "--stdin", data=data)
                git("update-index", "--add", "--cacheinfo", f"100644,{sha},{path}")
            tree = git("write-tree")
            sha = git("commit-tree", tree, *(["-p", parent] if parent else []), "-m", message)
            git("update-ref", f"refs/heads/{branch}", sha, *([parent] if parent else []))
            return sha

    def create(self, repo_id: str, kind: str = "models") -> bool:
        repo = self.hub.repo_path(repo_id, kind)
        if (repo / ".git").exists():
            return False
        repo.mkdir(parents=True)
        _git(repo, "init", "-q", "-b", "main")
        self.commit(repo_id, "main", "initial commit", None, {".gitattributes": b"*.safetensors filter=lfs "
                    b"diff=lfs merge=lfs -text\n"}, [], [], kind)
        return True


def _handler(server: HubWriteServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest's output clean; requests are recorded instead
            pass

        # -- plumbing --------------------------------------------------------------------------------
        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def reply(self, status: int, payload=None, error_code: str | None = None, text: str | None = None):
            data = text.encode() if text is not None else json.dumps(payload or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if text is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            if error_code:
                self.send_header("X-Error-Code", error_code)
            if status >= 400 and isinstance(payload, dict) and "error" in payload:
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            self.wfile.write(data)

        def authorized(self) -> bool:
            if self.headers.get("Authorization", "").startswith("Bearer "):
                server.tokens.add(self.headers["Authorization"][len("Bearer "):])
                return True
            self.reply(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def repo_or_404(self, repo_id: str, kind: str = "models") -> bool:
            if (server.hub.repo_path(repo_id, kind) / ".git").exists():
                return True
            self.reply(404, {"error": f"Repository {repo_id} not found"}, error_code="RepoNotFound")
            return False

        def proxy(self, body: bytes | None):
            conn = http.client.HTTPConnection("127.0.0.1", urlsplit(server.hub.endpoint).port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding")}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                    self.send_header(key, value)
            # a HEAD answer has no body but announces the length of the GET one
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        # -- routes ----------------------------------------------------------------------------------
        def do_GET(self):
            server.requests.append((self.command, self.path))
            self.proxy(None)

        do_HEAD = do_GET

        def do_PUT(self):
            server.requests.append((self.command, self.path))
            match = re.fullmatch(r"/lfs-objects/([0-9a-f]{64})/(\d+)", urlsplit(self.path).path)
            data = self.body()
            if match is None:
                return self.reply(404, {"error": f"no route {self.path}"})
            oid, size = match.group(1), int(match.group(2))
            with server.lock:
                refuse, server.fail_uploads = server.fail_uploads > 0, max(server.fail_uploads - 1, 0)
            if refuse:
                return self.reply(400, {"error": f"upload of object {oid} broken off"})
            if hashlib.sha256(data).hexdigest() != oid or len(data) != size:
                return self.reply(400, {"error": f"object {oid}: content does not match its sha256 and size"})
            target = server.objects / oid
            with tempfile.NamedTemporaryFile(dir=server.objects, delete=False) as f:
                f.write(data)
            os.replace(f.name, target)
            self.reply(200, {})

        def do_POST(self):
            server.requests.append((self.command, self.path))
            path = unquote(urlsplit(self.path).path)
            data = self.body()
            if path == "/api/validate-yaml":  # ModelCard.validate asks for text, upload_folder for JSON
                payload = json.loads(data)
                errors, warnings = metadata_errors(payload["content"], server.vocabulary,
                                                   payload.get("repoType") or "model")
                server.validated.append((errors, warnings))
                status = 400 if errors else 200
                if self.headers.get("Accept") == "text/plain":
                    return self.reply(status, text="\n".join(errors))
                return self.reply(status, {"errors": [{"message": e} for e in errors],
                                           "warnings": [{"message": w} for w in warnings]})
            if path == "/api/repos/create":
                if not self.authorized():
                    return
                payload = json.loads(data)
                repo_type = payload.get("type") or "model"
                if repo_type not in ("model", "space"):
                    return self.reply(400, {"error": "this test server holds models and Spaces only"})
                if repo_type == "space" and payload.get("sdk") not in server.vocabulary["sdk"]:
                    return self.reply(400, {"error": f"a Space needs an sdk, one of {sorted(server.vocabulary['sdk'])}"})
                repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
                url = f"{server.endpoint}/{'spaces/' if repo_type == 'space' else ''}{repo_id}"
                with server.lock:
                    created = server.create(repo_id, repo_type + "s")
                if not created:
                    return self.reply(409, {"error": f"You already created this {repo_type} repo", "url": url})
                return self.reply(200, {"url": url, "name": repo_id})
            match = re.fullmatch(r"/api/(models|spaces)/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
            if match:
                if not self.authorized():
                    return
                kind, repo_id, action, revision = match.groups()
                if not self.repo_or_404(repo_id, kind):
                    return
                return (self.preupload if action == "preupload" else self.commit)(repo_id, revision, data, kind)
            match = re.fullmatch(r"/(spaces/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if match:
                kind = "spaces" if match.group(1) else "models"
                if not self.authorized() or not self.repo_or_404(match.group(2), kind):
                    return
                return self.lfs_batch(json.loads(data))
            self.proxy(data)

        def preupload(self, repo_id: str, revision: str, data: bytes, kind: str):
            files = []
            for entry in json.loads(data)["files"]:
                sample = base64.b64decode(entry["sample"])
                binary = b"\x00" in sample or entry["size"] > LFS_THRESHOLD
                files.append({"path": entry["path"], "uploadMode": "lfs" if binary else "regular",
                              "shouldIgnore": False})
            self.reply(200, {"files": files, "commitOid": server.head(repo_id, revision, kind)})

        def lfs_batch(self, payload: dict):
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if not (server.objects / obj["oid"]).is_file():
                    entry["actions"] = {"upload": {"href": f"{server.endpoint}/lfs-objects/{obj['oid']}/{obj['size']}",
                                                   "header": {}}}
                objects.append(entry)
            self.reply(200, {"transfer": "basic", "objects": objects})

        def commit(self, repo_id: str, revision: str, data: bytes, kind: str):
            lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            header = next((line["value"] for line in lines if line["key"] == "header"), None)
            if header is None or not header.get("summary"):
                return self.reply(400, {"error": "a commit needs a header with a summary"})
            add, delete, folders = {}, [], []
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    add[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    stored = server.objects / value["oid"]
                    if not stored.is_file():
                        return self.reply(422, {"error": f"LFS object {value['oid']} for {value['path']} was "
                                                         "never uploaded"})
                    add[value["path"]] = stored.read_bytes()
                elif key == "deletedFile":
                    delete.append(value["path"])
                elif key == "deletedFolder":
                    folders.append(value["path"])
                elif key != "header":
                    return self.reply(400, {"error": f"unsupported commit operation {key!r}"})
            message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
            with server.lock:
                head = server.head(repo_id, revision, kind)
                if head is None:
                    return self.reply(404, {"error": f"Invalid rev id: {revision}"}, error_code="RevisionNotFound")
                if header.get("parentCommit") and header["parentCommit"] != head:
                    return self.reply(412, {"error": f"parent commit {header['parentCommit']} is not the head "
                                                     f"of {revision} ({head})"})
                sha = server.commit(repo_id, revision, message, head, add, delete, folders, kind)
            self.reply(200, {"success": True, "commitOid": sha,
                             "commitUrl": f"{server.endpoint}/{repo_id}/commit/{sha}"})

    return Handler
