"""A Hugging Face Hub on loopback, enough for huggingface_hub, transformers and datasets to run against for real.

Repositories live in memory as commits of whole file trees. The server implements the routes the clients call
(repo info, tree, refs, commits, paths-info, preupload, NDJSON commits, branches, resolve with Range) and the
rules the tests exercise: private repos are invisible without the owner's token, gated repos refuse downloads,
pushes outside the token's namespace are forbidden, and a file can be made to drop the connection mid-download.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    pulls: list[str] = field(default_factory=list)
    sdk: str | None = None

    def resolve(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        match = re.fullmatch(r"refs/pr/(\d+)", revision)
        if match and 0 < int(match.group(1)) <= len(self.pulls):
            return self.commits[self.branches[f"refs/pr/{match.group(1)}"]]
        if revision in self.commits:
            return self.commits[revision]
        return None


class HubState:
    """Repositories, tokens and injected faults; thread-safe through one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, str] = {}  # token -> user name
        self.read_only: set[str] = set()  # tokens that may read but not write
        self.drops: dict[str, int] = {}  # "repo_id/path" -> how many GETs still drop mid-body
        self.dead: set[str] = set()  # "repo_id/path" whose downloads always close before any body byte
        self.requests: list[tuple[str, str, str | None, str | None]] = []  # method, path, authorization, range

    def add_token(self, token: str, user: str, *, write: bool = True) -> None:
        self.tokens[token] = user
        if not write:
            self.read_only.add(token)

    def create(
        self,
        repo_id: str,
        repo_type: str = "model",
        *,
        private: bool = False,
        gated: bool = False,
        sdk: str | None = None,
    ) -> Repo:
        with self.lock:
            repo = Repo(repo_type, repo_id, private, gated, sdk=sdk)
            self._commit(
                repo,
                "main",
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                "initial commit",
            )
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def _commit(
        self,
        repo: Repo,
        branch: str,
        files: dict[str, bytes],
        title: str,
        deleted: set[str] | None = None,
        parent: str | None = None,
    ) -> Commit:
        base = repo.commits[parent].files if parent else (repo.resolve(branch).files if branch in repo.branches else {})
        tree = {k: v for k, v in base.items() if not deleted or k not in deleted}
        tree.update(files)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        oid = _sha1(
            f"{parent or repo.branches.get(branch)}{title}{time.time_ns()}".encode()
            + b"".join(k.encode() + _sha1(v).encode() for k, v in sorted(tree.items()))
        )
        commit = Commit(oid, parent or repo.branches.get(branch), tree, title, stamp)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def upload(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        branch: str = "main",
        title: str = "upload",
    ) -> str:
        """Test helper: commit files straight into a repository; returns the commit id."""
        with self.lock:
            return self._commit(self.repos[(repo_type, repo_id)], branch, files, title).oid


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LoopbackHub

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    # helpers --------------------------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _token(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _user(self) -> str | None:
        return self.state.tokens.get(self._token() or "")

    def _can_write(self, namespace: str) -> bool:
        return self._user() == namespace and self._token() not in self.state.read_only

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._json(
            status,
            {"error": message},
            {"X-Error-Code": code, "X-Error-Message": message} if code else {"X-Error-Message": message},
        )

    def _body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> Repo | None:
        """The repo if this caller may see it (and write to it); sends the error otherwise."""
        repo = self.state.repos.get((repo_type, repo_id))
        user = self._user()
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            self._error(401 if user is None else 404, "Repository not found", "RepoNotFound")
            return None
        if write and not self._can_write(repo_id.split("/")[0]):
            self._error(403 if user else 401, "You don't have the rights to create a commit in this repo")
            return None
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit | None:
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _entry(self, path: str, data: bytes) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": _sha1(data), "size": len(data), "path": path}
        if path.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Entries under ``prefix``: its direct children, or everything below with ``recursive``, folders included."""
        base = f"{prefix}/" if prefix else ""
        files, folders = [], set()
        for path, data in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base) :].split("/")
            for depth in range(1, len(rest)):
                if recursive or depth == 1:
                    folders.add(base + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                files.append(self._entry(path, data))
        return [{"type": "directory", "oid": _sha1(f.encode()), "size": 0, "path": f} for f in sorted(folders)] + files

    def _info(self, repo: Repo, commit: Commit, blobs: bool) -> dict[str, Any]:
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update({"size": len(data), "blobId": _sha1(data)})
                if path.endswith(".safetensors"):
                    sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        info = {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "sha": commit.oid,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "siblings": siblings,
            "lastModified": commit.date,
            "createdAt": commit.date,
            "tags": [],
            "downloads": 0,
            "likes": 0,
        }
        if repo.repo_type == "space":
            info.update({"sdk": repo.sdk, "runtime": {"stage": "RUNNING"}})
        return info

    # routing --------------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def do_GET(self) -> None:  # noqa: N802
        self._route()

    def do_POST(self) -> None:  # noqa: N802
        self._route()

    def do_DELETE(self) -> None:  # noqa: N802
        self._route()

    def _route(self) -> None:
        url = urlparse(self.path)
        path, query = url.path, parse_qs(url.query)  # segments are decoded one by one: revisions may hold "%2F"
        with self.state.lock:
            self.state.requests.append(
                (self.command, unquote(path), self.headers.get("authorization"), self.headers.get("range"))
            )
        try:
            if path == "/api/whoami-v2":
                return self._whoami()
            if path == "/api/validate-yaml":
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create" and self.command == "POST":
                return self._create()
            match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?", path)
            if match:
                return self._api(TYPES[match.group(1)], unquote(match.group(2)), match.group(3) or "", query)
            match = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/(.+)", path)
            if match:
                return self._resolve(TYPES.get(f"{match.group(1)}") or "model", unquote(match.group(2)), match.group(3))
            self._error(404, f"no route for {path}")
        except BrokenPipeError:
            pass

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        role = "read" if self._token() in self.state.read_only else "write"
        self._json(
            200,
            {
                "type": "user",
                "id": user,
                "name": user,
                "fullname": user,
                "avatarUrl": f"/avatars/{user}.svg",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            },
        )

    def _create(self) -> None:
        body = json.loads(self._body() or b"{}")
        user = self._user()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or user
        repo_id = f"{namespace}/{body['name']}"
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        if not self._can_write(namespace):
            return self._error(403, f"You don't have the rights to create a repo under {namespace}")
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                return self._json(409, {"error": "You already created this repo", "url": self._url(repo_type, repo_id)})
            private = body.get("visibility") in ("private", "protected") or bool(body.get("private"))
            self.state.create(repo_id, repo_type, private=private, sdk=body.get("sdk"))
        self._json(200, {"url": self._url(repo_type, repo_id), "name": repo_id, "id": repo_id})

    def _url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.server.endpoint}/{PREFIX[repo_type]}{repo_id}"

    def _api(self, repo_type: str, repo_id: str, rest: str, query: dict[str, list[str]]) -> None:
        write = rest.startswith(("preupload/", "commit/", "branch/"))
        repo = self._repo(repo_type, repo_id, write=write)
        if repo is None:
            return
        parts = rest.split("/", 1)
        action, raw_arg = parts[0], parts[1] if len(parts) > 1 else ""
        arg = unquote(raw_arg)
        if action in ("", "revision"):
            commit = self._commit_of(repo, arg or "main")
            if commit:
                self._json(200, self._info(repo, commit, query.get("blobs", ["false"])[0] == "true"))
        elif action == "tree":
            revision, _, prefix = raw_arg.partition("/")
            revision, prefix = unquote(revision), unquote(prefix)
            commit = self._commit_of(repo, revision)
            if commit:
                self._json(200, self._tree(commit, prefix.strip("/"), query.get("recursive", ["false"])[0] == "true"))
        elif action == "refs":
            self._json(
                200,
                {
                    "branches": [
                        {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                        for b, oid in repo.branches.items()
                        if not b.startswith("refs/")
                    ],
                    "tags": [],
                    "converts": [],
                    "pullRequests": [
                        {"name": b, "ref": b, "targetCommit": oid}
                        for b, oid in repo.branches.items()
                        if b.startswith("refs/pr/")
                    ],
                },
            )
        elif action == "commits":
            commit = self._commit_of(repo, arg or "main")
            history = []
            while commit:
                history.append(
                    {
                        "id": commit.oid,
                        "title": commit.title,
                        "message": commit.title,
                        "authors": [],
                        "date": commit.date,
                    }
                )
                commit = repo.commits.get(commit.parent) if commit.parent else None
            self._json(200, history)
        elif action == "paths-info":
            commit = self._commit_of(repo, arg)
            if commit:
                form = parse_qs(self._body().decode())
                paths = form.get("paths", [])
                self._json(200, [self._entry(p, commit.files[p]) for p in paths if p in commit.files])
        elif action == "preupload":
            body = json.loads(self._body() or b"{}")
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body.get("files", [])]
            self._json(200, {"files": files, "commitOid": repo.branches.get(unquote(arg), None)})
        elif action == "commit":
            self._commit_request(repo, unquote(arg), query)
        elif action == "branch":
            self._branch(repo, unquote(arg))
        else:
            self._error(404, f"no route for {action}")

    def _branch(self, repo: Repo, branch: str) -> None:
        if self.command == "DELETE":
            repo.branches.pop(branch, None)
            return self._json(200, {})
        body = json.loads(self._body() or b"{}")
        if branch in repo.branches:
            return self._error(409, f"Reference already exists: refs/heads/{branch}")
        start = repo.resolve(body.get("startingPoint") or "main")
        if start is None:
            return self._error(404, "Invalid starting point", "RevisionNotFound")
        repo.branches[branch] = start.oid
        self._json(200, {})

    def _commit_request(self, repo: Repo, revision: str, query: dict[str, list[str]]) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        files: dict[str, bytes] = {}
        deleted: set[str] = set()
        create_pr = query.get("create_pr", ["0"])[0] in ("1", "true", "True")
        with self.state.lock:
            base = repo.resolve(revision)
            if base is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    deleted.add(value["path"])
                elif item["key"] == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    deleted |= {p for p in base.files if p.startswith(folder)}
                elif item["key"] == "lfsFile":
                    return self._error(400, "this loopback hub only accepts regular uploads")
            branch = revision
            if create_pr:
                repo.pulls.append(revision)
                branch = f"refs/pr/{len(repo.pulls)}"
            commit = self.state._commit(repo, branch, files, header.get("summary", "commit"), deleted, parent=base.oid)
        result = {
            "commitUrl": f"{self._url(repo.repo_type, repo.repo_id)}/commit/{commit.oid}",
            "commitOid": commit.oid,
            "success": True,
        }
        if create_pr:
            result["pullRequestUrl"] = f"{self._url(repo.repo_type, repo.repo_id)}/discussions/{len(repo.pulls)}"
        self._json(200, result)

    def _resolve(self, repo_type: str, repo_id: str, rest: str) -> None:
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return
        commit, filename = None, ""
        parts = [unquote(p) for p in rest.split("/")]
        for split in range(1, len(parts)):  # an encoded revision is one segment; a raw one may span several
            candidate = repo.resolve("/".join(parts[:split]))
            if candidate is not None:
                commit, filename = candidate, "/".join(parts[split:])
                break
        if commit is None:
            return self._error(404, f"Invalid rev id: {rest.split('/')[0]}", "RevisionNotFound")
        if repo.gated and self._user() is None:
            return self._error(401, f"Access to model {repo_id} is restricted. You must be authenticated.", "GatedRepo")
        if repo.gated:
            return self._error(
                403, f"Access to model {repo_id} is restricted and you are not in the authorized list.", "GatedRepo"
            )
        data = commit.files.get(filename)
        if data is None:
            return self._error(404, "Entry not found", "EntryNotFound")
        etag = hashlib.sha256(data).hexdigest() if filename.endswith(".safetensors") else _sha1(data)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        start, end, status = 0, len(data) - 1, 200
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("range", ""))
        if ranged and self.command == "GET":
            start = int(ranged.group(1) or 0)
            end = min(int(ranged.group(2)) if ranged.group(2) else len(data) - 1, len(data) - 1)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start : end + 1]
        key = f"{repo_id}/{filename}"
        header_read = bool(ranged) and start == 0 and end < 100_001
        dead = key in self.state.dead and not header_read
        if self.command == "GET" and (dead or self.state.drops.get(key, 0) > 0):
            if not dead:
                self.state.drops[key] -= 1
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if not dead:
                self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, body, headers, content_type="application/octet-stream")


class LoopbackHub(ThreadingHTTPServer):
    """Serves a :class:`HubState` on 127.0.0.1; ``endpoint`` is the value for ``HF_ENDPOINT``."""

    daemon_threads = True

    def __init__(self, state: HubState | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state or HubState()
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def start(self) -> LoopbackHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
