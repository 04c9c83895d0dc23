"""A loopback Hugging Face Hub for tests: the part of the Hub HTTP API that the real
`huggingface_hub` (LFS upload protocol, i.e. `HF_HUB_DISABLE_XET=1`) and `datasets`
(streaming Parquet through `HfFileSystem`) clients use, served on 127.0.0.1 only.

Repos live in memory as commits (path -> blob); blob bytes live in a temp dir, keyed by
sha256. Supported: whoami, create repo, repo/revision info, refs, branches, tags, commit
listing, preupload, LFS batch + PUT, ndjson commit (with `parentCommit`), validate-yaml,
tree and paths-info listings, and `resolve` with HEAD and Range. Faults (status codes,
dropped connections, bodies cut short, slow responses) are injected per test with `add_fault`,
at named points: the Nth request of a method and path (`ranged=True`: counting only requests
with a Range header, i.e. a streaming reader's reads of a data file); `conflict_next_commits`
answers commits as the Hub answers concurrent ones (409/412).

Not a Hub: no pagination (one page holds everything), no Xet, no PRs, no rate limits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_loopback_token"
READ_TOKEN = "hf_loopback_read_token"  # a read-only token of the same user: reads all it does, writes nothing
USER = "tester"
LFS_SUFFIXES = (".parquet", ".safetensors", ".png", ".arrow", ".bin", ".pt", ".gz", ".zip")
LFS_MIN_SIZE = 10 << 20  # the Hub stores files larger than this in LFS whatever their type
# What the Hub answers a commit that races another on the same branch
CONFLICTS = {
    409: "Another commit is in progress on this repo; please try again later.",
    412: "A commit has happened since. Please refresh and try again.",
}
PREFIXES = {"datasets": "dataset", "spaces": "space", "models": "model"}


@dataclass(frozen=True)
class Entry:
    sha256: str
    size: int
    git_oid: str
    lfs: bool


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # LFS storage is per repo, as on the Hub

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in self.commits:
            return revision
        return None


@dataclass
class Fault:
    """One injected failure. `path` is a regex searched in the request path (`ranged`: only
    requests with a Range header count); `skip` matching requests pass first; then `times`
    requests fail (None: every one until removed).

    action: "status" (answer `status`, with `headers`), "drop" (close the socket without an
    answer, after reading half of any body), "drop_after" (do the work, then close without
    answering: a lost response), "truncate" (send the headers and half of the body, then close),
    "delay" (sleep `delay` seconds, then answer normally). `message`: the error text of a "status"
    answer."""

    method: str
    path: str
    action: str = "status"
    status: int = 503
    delay: float = 0.0
    times: int | None = 1
    skip: int = 0
    ranged: bool = False
    headers: dict = field(default_factory=dict)
    message: str | None = None
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str, ranged: bool = False) -> bool:
        if method != self.method or not re.search(self.path, path) or (self.ranged and not ranged):
            return False
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers, extra


class _Drop(Exception):
    """Close the connection without an answer."""


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubState:
    def __init__(self, root: Path):
        self.blobs = Path(root) / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.bytes_served: dict[str, int] = {}  # path in repo -> bytes sent by resolve
        self.bytes_uploaded = 0  # LFS PUT bodies stored
        self.server_errors: list[str] = []
        self.private_by_default: set[str] = set()  # namespaces (orgs) whose new repos are private unless told otherwise
        self._counter = 0
        self._salt = os.urandom(8).hex()  # commit ids never repeat across servers (clients cache by commit)

    # ---- blobs --------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def store_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.exists():
            tmp = path.with_suffix(f".tmp-{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    # ---- repos --------------------------------------------------------------------------

    def create_repo(self, repo_type: str, repo_id: str, private: bool, url: str) -> Repo:
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo", None, url=url)  # the Hub sends the url too
            repo = Repo(repo_type, repo_id, private)
            attributes = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            entry = Entry(self.store_blob(attributes), len(attributes), git_blob_oid(attributes), False)
            commit = self._new_commit(repo, None, {".gitattributes": entry}, "initial commit")
            repo.branches["main"] = commit.oid
            self.repos[key] = repo
            return repo

    def _new_commit(self, repo: Repo, parent: str | None, files: dict, title: str) -> Commit:
        self._counter += 1
        oid = hashlib.sha1(f"{self._salt}|{repo.repo_id}|{parent}|{title}|{self._counter}|{sorted(files)}".encode()).hexdigest()
        commit = Commit(oid, parent, dict(files), title, now())
        repo.commits[oid] = commit
        return commit

    def repo(self, repo_type: str, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and token not in (TOKEN, READ_TOKEN)):
            raise HubError(404 if token else 401, "Repository not found", "RepoNotFound")
        return repo

    def commit_at(self, repo: Repo, revision: str) -> Commit:
        oid = repo.resolve(unquote(revision))
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1"
    # No idle timeout: closing a kept-alive connection races with a slow client reusing it (daemon
    # threads never delay the server's shutdown).
    timeout = None

    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, *args):  # quiet: the request log is in `state.log`
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ---- plumbing -----------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self._body: bytes | None = None
        fault = self._fault(method, url.path, "Range" in self.headers)
        self._mute = fault is not None and fault.action == "drop_after"  # do the work, lose the answer
        self._truncate = fault is not None and fault.action == "truncate"  # send half of the body
        status = 0
        try:
            if fault is not None:
                self._apply_fault_before(fault)
            status = self._route(method, url.path, fault)
        except _Drop:
            status = -1
            self._drop()
        except HubError as err:
            status, self._mute = err.status, False
            self._send_json(
                {"error": err.message, **err.extra}, err.status, error_code=err.code, error_message=err.message, headers=err.headers
            )
        except (BrokenPipeError, ConnectionResetError):
            status = -2
        except Exception as err:  # a bug of this server: recorded, and the `hub` fixture fails the test
            status = 500
            with self.state.lock:
                self.state.server_errors.append(f"{method} {self.path}: {type(err).__name__}: {err}")
            self._mute = False
            self._send_json({"error": f"loopback hub bug: {err}"}, 500)
        finally:
            with self.state.lock:
                self.state.log.append((method, url.path, status))

    def _fault(self, method: str, path: str, ranged: bool) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults:
                if fault.matches(method, path, ranged):
                    return fault
        return None

    def _apply_fault_before(self, fault: Fault) -> None:
        if fault.action == "delay":
            time.sleep(fault.delay)
        elif fault.action == "status":
            self.body()
            raise HubError(fault.status, fault.message or f"injected fault {fault.status}", headers=fault.headers)
        elif fault.action == "drop":
            self.body(partial=True)
            raise _Drop()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def body(self, partial: bool = False) -> bytes:
        """The request body (Content-Length or chunked); `partial`: read about half, as a drop midway would."""
        if self._body is not None:
            return self._body
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if partial:
                    break
            self._body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(length // 2 if partial else length)
        return self._body

    def json_body(self):
        return json.loads(self.body() or b"{}")

    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def require_write(self) -> None:
        if self.token() == READ_TOKEN:
            raise HubError(403, "You don't have the rights to create or modify this repository with a read token", None)
        if self.token() != TOKEN:
            raise HubError(401, "Invalid credentials in Authorization header" if self.token() else "You must be authenticated", None)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        if self._mute:
            return
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self, data, status: int = 200, error_code: str | None = None, error_message: str | None = None, headers: dict | None = None
    ) -> None:
        headers = dict(headers or {})
        if error_code:
            headers["X-Error-Code"] = error_code
        if error_message:
            headers["X-Error-Message"] = error_message
        self._send(status, json.dumps(data).encode(), "application/json", headers)

    # ---- routes -------------------------------------------------------------------------

    def _route(self, method: str, path: str, fault: Fault | None) -> int:
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", r"/lfs-upload/(datasets|models|spaces)/([^/]+/[^/]+)/([0-9a-f]{64})", self.lfs_put),
            ("GET", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)(?:/revision/([^/]+))?", self.info),
            ("GET", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/refs", self.refs),
            ("GET", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/commits/([^/]+)", self.commits),
            ("POST", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/preupload/([^/]+)", self.preupload),
            ("POST", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/commit/([^/]+)", self.commit),
            ("POST", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/branch/([^/]+)", self.create_branch),
            ("DELETE", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/branch/([^/]+)", self.delete_branch),
            ("POST", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/tag/([^/]+)", self.create_tag),
            ("DELETE", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/tag/([^/]+)", self.delete_tag),
            ("GET", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", self.tree),
            ("POST", r"/api/(datasets|models|spaces)/([^/]+/[^/]+)/paths-info/([^/]+)", self.paths_info),
            ("GET", r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.resolve),
            ("HEAD", r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.resolve),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                status = handler(*match.groups())
                if fault is not None and fault.action == "drop_after":
                    raise _Drop()
                return status
        raise HubError(404, f"no route for {method} {path}")

    def _repo(self, kind: str | None, repo_id: str) -> Repo:
        repo_type = PREFIXES.get(kind or "models", "model")
        return self.state.repo(repo_type, unquote(repo_id), self.token())

    def whoami(self) -> int:
        if self.token() != READ_TOKEN:
            self.require_write()
        role = "read" if self.token() == READ_TOKEN else "write"
        auth = {"type": "access_token", "accessToken": {"displayName": "loopback", "role": role}}
        self._send_json({"type": "user", "name": USER, "fullname": USER, "orgs": [], "auth": auth})
        return 200

    def create_repo(self) -> int:
        self.require_write()
        payload = self.json_body()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        told = payload.get("visibility") or ({True: "private", False: "public"}.get(payload.get("private")))
        private = told == "private" if told else repo_id.split("/")[0] in self.state.private_by_default
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.server.url}/{prefix}{repo_id}"  # type: ignore[attr-defined]
        self.state.create_repo(repo_type, repo_id, private, url)
        self._send_json({"url": url, "name": repo_id})
        return 200

    def validate_yaml(self) -> int:
        content = self.json_body().get("content", "")
        errors = []
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if match:
            try:
                data = yaml.safe_load(match.group(1))
                if not isinstance(data, dict):
                    errors.append("metadata must be a YAML mapping")
                for config in (data or {}).get("configs", []):
                    if "config_name" not in config or "data_files" not in config:
                        errors.append(f"configs entry needs config_name and data_files: {config}")
            except yaml.YAMLError as err:
                errors.append(f"invalid YAML: {err}")
        self._send_json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)
        return 400 if errors else 200

    def info(self, kind: str, repo_id: str, revision: str | None) -> int:
        repo = self._repo(kind, repo_id)
        commit = self.state.commit_at(repo, revision or "main")
        card = self._card_data(commit)
        data = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "lastModified": commit.date,
            "createdAt": commit.date,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [self._sibling(path, e) for path, e in sorted(commit.files.items())],
        }
        if card is not None:
            data["cardData"] = card
        self._send_json(data)
        return 200

    def _card_data(self, commit: Commit):
        entry = commit.files.get("README.md")
        if entry is None:
            return None
        match = re.match(r"^---\n(.*?)\n---\n", self.state.blob_path(entry.sha256).read_text(), re.S)
        return yaml.safe_load(match.group(1)) if match else None

    @staticmethod
    def _sibling(path: str, e: Entry) -> dict:
        out = {"rfilename": path, "size": e.size, "blobId": e.git_oid}
        if e.lfs:
            out["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": 134}
        return out

    def refs(self, kind: str, repo_id: str) -> int:
        repo = self._repo(kind, repo_id)

        def refs_of(items, prefix):
            return [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": oid} for n, oid in sorted(items.items())]

        self._send_json(
            {"branches": refs_of(repo.branches, "heads"), "tags": refs_of(repo.tags, "tags"), "converts": [], "pullRequests": []}
        )
        return 200

    def commits(self, kind: str, repo_id: str, revision: str) -> int:
        repo = self._repo(kind, repo_id)
        commit, out = self.state.commit_at(repo, revision), []
        while commit is not None:
            out.append({"id": commit.oid, "title": commit.title, "message": "", "date": commit.date, "authors": [{"user": USER}]})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send_json(out)
        return 200

    def preupload(self, kind: str, repo_id: str, revision: str) -> int:
        self.require_write()
        repo = self._repo(kind, repo_id)
        commit = self.state.commit_at(repo, revision)
        files = []
        for f in self.json_body()["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            remote = commit.files.get(f["path"])
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.git_oid)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": files, "commitOid": commit.oid})
        return 200

    def lfs_batch(self, kind: str | None, repo_id: str) -> int:
        self.require_write()
        repo = self._repo(kind, repo_id)
        payload = self.json_body()
        objects = []
        for obj in payload["objects"]:
            if obj["oid"] in repo.lfs_objects:
                objects.append({"oid": obj["oid"], "size": obj["size"]})  # already stored: no actions
            else:
                href = f"{self.server.url}/lfs-upload/{repo.repo_type}s/{repo.repo_id}/{obj['oid']}"  # type: ignore[attr-defined]
                objects.append(
                    {"oid": obj["oid"], "size": obj["size"], "authenticated": True, "actions": {"upload": {"href": href, "header": {}}}}
                )
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})
        return 200

    def lfs_put(self, kind: str, repo_id: str, sha256: str) -> int:
        repo = self.state.repos[(PREFIXES[kind], repo_id)]  # a presigned URL: no token needed
        data = self.body()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HubError(400, f"content does not match its oid {sha256} ({len(data)} bytes received)")
        self.state.store_blob(data)
        with self.state.lock:
            repo.lfs_objects.add(sha256)
            self.state.bytes_uploaded += len(data)
        self._send(200, b"", "text/plain", {"ETag": f'"{sha256}"'})
        return 200

    def commit(self, kind: str, repo_id: str, revision: str) -> int:
        self.require_write()
        repo = self._repo(kind, repo_id)
        branch = unquote(revision)
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        with self.state.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            parent = header.get("parentCommit")
            if parent is not None and not head.oid.startswith(parent):
                raise HubError(412, f"A commit has happened since. Please refresh and try again. (parent {parent}, head {head.oid})")
            files = dict(head.files)
            for line in lines:
                self._apply_operation(repo, files, line["key"], line["value"])
            commit = self.state._new_commit(repo, head.oid, files, header.get("summary", ""))
            repo.branches[branch] = commit.oid
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self._send_json(
            {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.server.url}/{prefix}{repo.repo_id}/commit/{commit.oid}"}
        )  # type: ignore[attr-defined]
        return 200

    def _apply_operation(self, repo: Repo, files: dict, key: str, value: dict) -> None:
        if key == "file":
            data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
            files[value["path"]] = Entry(self.state.store_blob(data), len(data), git_blob_oid(data), False)
        elif key == "lfsFile":
            path = self.state.blob_path(value["oid"])
            if value["oid"] not in repo.lfs_objects:
                raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
            size = path.stat().st_size
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {size}\n".encode()
            files[value["path"]] = Entry(value["oid"], size, git_blob_oid(pointer), True)
        elif key == "deletedFile":
            if files.pop(value["path"], None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in files if p.startswith(prefix)]:
                del files[path]

    def create_branch(self, kind: str, repo_id: str, branch: str) -> int:
        self.require_write()
        repo = self._repo(kind, repo_id)
        branch = unquote(branch)
        start = self.json_body().get("startingPoint") or "main"
        with self.state.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self.state.commit_at(repo, start).oid
        self._send_json({})
        return 200

    def delete_branch(self, kind: str, repo_id: str, branch: str) -> int:
        self.require_write()
        repo = self._repo(kind, repo_id)
        if repo.branches.pop(unquote(branch), None) is None:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        self._send_json({})
        return 200

    def create_tag(self, kind: str, repo_id: str, revision: str) -> int:
        self.require_write()
        repo = self._repo(kind, repo_id)
        tag = self.json_body()["tag"]
        with self.state.lock:
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self.state.commit_at(repo, revision).oid
        self._send_json({})
        return 200

    def delete_tag(self, kind: str, repo_id: str, tag: str) -> int:
        self.require_write()
        repo = self._repo(kind, repo_id)
        if repo.tags.pop(unquote(tag), None) is None:
            raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        self._send_json({})
        return 200

    def _listing(self, commit: Commit, path: str, recursive: bool) -> list[dict] | None:
        """Tree entries under `path` (None when it is neither a file's folder nor the root)."""
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        files = {p: e for p, e in commit.files.items() if p.startswith(prefix)}
        if prefix and not files:
            return None
        out, folders = [], set()
        for p, e in sorted(files.items()):
            rest = p[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            parts = rest.split("/")[:-1]
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            out.append(self._tree_entry(p, e))
        out += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f} for f in sorted(folders)]
        return out

    @staticmethod
    def _tree_entry(path: str, e: Entry) -> dict:
        out = {"type": "file", "oid": e.git_oid, "size": e.size, "path": path}
        if e.lfs:
            out["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
        return out

    def tree(self, kind: str, repo_id: str, revision: str, path: str | None) -> int:
        repo = self._repo(kind, repo_id)
        commit = self.state.commit_at(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        entries = self._listing(commit, unquote(path or ""), recursive)
        if entries is None:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        self._send_json(entries)
        return 200

    def paths_info(self, kind: str, repo_id: str, revision: str) -> int:
        repo = self._repo(kind, repo_id)
        commit = self.state.commit_at(repo, revision)
        form = parse_qs(self.body().decode())
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(self._tree_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path})
        self._send_json(out)
        return 200

    def resolve(self, kind: str | None, repo_id: str, revision: str, path: str) -> int:
        repo = self._repo(kind, repo_id)
        commit = self.state.commit_at(repo, revision)
        path = unquote(path)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size, 200
        spec = self.headers.get("Range")
        if spec:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
            if not match:
                raise HubError(400, f"bad Range {spec}")
            first, last = match.groups()
            if first == "":  # suffix range: the last N bytes
                start, end = max(0, entry.size - int(last)), entry.size
            else:
                start, end = int(first), min(entry.size, int(last) + 1 if last else entry.size)
            if start >= entry.size:
                self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{entry.size}"})
                return 416
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        self._send_file(status, entry, start, end, headers, path)
        return status

    def _send_file(self, status: int, entry: Entry, start: int, end: int, headers: dict, path: str) -> None:
        if self._mute:
            return
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if self._truncate:  # the connection breaks midway through the body
            end = start + (end - start) // 2
            self.close_connection = True
        with open(self.state.blob_path(entry.sha256), "rb") as f:
            self.wfile.flush()
            self.connection.sendfile(f, start, end - start)  # zero-copy: the server is not what the benchmark measures
        if self._truncate:
            self._drop()
        with self.state.lock:
            self.state.bytes_served[path] = self.state.bytes_served.get(path, 0) + end - start


class LoopbackHub:
    """The server, on 127.0.0.1 and a free port, in a daemon thread (it ends with the process).
    A standalone server (`main`) stops itself after `max_lifetime_s`; tests' servers have no
    lifetime, so a slow machine never stops one in the middle of a test module."""

    def __init__(self, root: Path, max_lifetime_s: float | None = None):
        self.state = HubState(root)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self.state  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.url = self.url  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._watchdog = threading.Timer(max_lifetime_s, self.stop) if max_lifetime_s is not None else None
        if self._watchdog is not None:
            self._watchdog.daemon = True

    def start(self) -> LoopbackHub:
        self._thread.start()
        if self._watchdog is not None:
            self._watchdog.start()
        return self

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_fault(self, method: str, path: str, **kwargs) -> Fault:
        fault = Fault(method, path, **kwargs)
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def conflict_next_commits(self, times: int, status: int = 409, skip: int = 0) -> Fault:
        """Answer the next `times` commits (after `skip` that pass) as the Hub answers a commit racing
        another on its branch: 409 while that one is in progress, 412 when it just landed."""
        return self.add_fault("POST", r"/commit/", status=status, times=times, skip=skip, message=CONFLICTS[status])

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def requests(self, method: str | None = None, pattern: str = "") -> list[tuple[str, str, int]]:
        with self.state.lock:
            return [r for r in self.state.log if (method is None or r[0] == method) and re.search(pattern, r[1])]

    def reset_counters(self) -> None:
        with self.state.lock:
            self.state.log.clear()
            self.state.bytes_served.clear()
            self.state.bytes_uploaded = 0

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.state.repos[(repo_type, repo_id)]

    def files_at(self, repo_id: str, revision: str, repo_type: str = "dataset") -> dict[str, Entry]:
        repo = self.repo(repo_id, repo_type)
        return dict(repo.commits[repo.resolve(revision)].files)


# ---- pointing the real clients at it ------------------------------------------------------


def point_clients_at(url: str, monkeypatch) -> None:
    """Make `huggingface_hub` and `datasets`, already imported with HF_HUB_OFFLINE=1 (conftest),
    talk to `url` for the rest of the test: the environment for code that reads it at call time,
    and the module constants both libraries computed from it at import time."""
    import datasets.config
    from huggingface_hub import constants

    for key, value in {"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # LFS protocol: Xet needs a CAS server
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(os.environ.get("HF_HOME", "/tmp")) / "loopback-hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", url)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


def hub_fixtures():
    """`hub_server` (one per test module) and `hub` (per test: clients pointed at it, faults and
    counters reset). Import both into a test module or conftest: `hub_server, hub = hub_fixtures()`."""
    import pytest

    @pytest.fixture(scope="module")
    def hub_server(tmp_path_factory):
        server = LoopbackHub(tmp_path_factory.mktemp("loopback_hub")).start()
        yield server
        server.stop()

    @pytest.fixture
    def hub(hub_server, monkeypatch):
        hub_server.clear_faults()
        hub_server.reset_counters()
        point_clients_at(hub_server.url, monkeypatch)
        yield hub_server
        hub_server.clear_faults()
        errors, hub_server.state.server_errors = hub_server.state.server_errors, []
        assert not errors, f"the loopback hub failed on requests it should handle: {errors}"

    return hub_server, hub


def main() -> None:
    """`python tests/hub_server.py ROOT`: serve in this process (for benchmarks); prints the URL,
    stops when stdin closes or after the lifetime."""
    import sys

    hub = LoopbackHub(Path(sys.argv[1]), max_lifetime_s=float(sys.argv[2]) if len(sys.argv) > 2 else 900).start()
    print(hub.url, flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), hub.stop()), daemon=True).start()
    hub._thread.join()  # ends on stdin EOF or when the watchdog stops the server


if __name__ == "__main__":
    main()
