"""A Hugging Face Hub-compatible HTTP server for tests (standard library only), on 127.0.0.1.

It implements the part of the Hub API that `huggingface_hub` 2.4 uses to create a model repo, commit to
it (preupload, LFS batch + PUT + verify, NDJSON commit with `parentCommit`), read it (model info, tree,
paths-info, refs, resolve with `X-Repo-Commit`/`ETag`/ranges) and tag it, with errors in `X-Error-Code`.
Everything uploaded is stored, checked (an LFS object must hash to its oid) and served back from the commit
it belongs to; every commit gets its own sha. Faults can be injected: failed or dropped requests, corrupted
downloads, and downloads longer or shorter than the size declared. Point the client at `server.endpoint` with
`HF_HUB_DISABLE_XET=1`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx")
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Blob:
    """A file in a commit: regular content, or an LFS object by sha256."""

    size: int
    content: bytes | None = None
    lfs_oid: str | None = None

    @property
    def oid(self) -> str:
        if self.lfs_oid is not None:
            return git_blob_id(lfs_pointer(self.lfs_oid, self.size))
        assert self.content is not None
        return git_blob_id(self.content)

    @property
    def etag(self) -> str:
        return self.lfs_oid or self.oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        sha = self.branches.get(rev) or self.tags.get(rev)
        if sha is None:
            sha = next((s for s in self.commits if len(rev) >= 7 and s.startswith(rev)), None)
        return self.commits.get(sha) if sha else None


@dataclass
class Fault:
    """Answer the next `times` requests whose method and path match with `status`, or drop them (None)."""

    method: str
    path: str
    status: int | None
    times: int


class HubState:
    """Everything the server stores, plus the faults to inject and a log of requests."""

    def __init__(self, tokens: set[str] | None = None) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.tokens = tokens
        self.faults: list[Fault] = []
        self.corrupt: set[str] = set()
        self.length_lie: dict[str, int] = {}  # path: bytes a GET sends beyond (negative: short of) the declared size
        self.log: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self._counter = itertools.count()

    def new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, Blob]) -> Commit:
        tree = sorted((p, b.oid) for p, b in files.items())
        seed = json.dumps([repo.repo_id, parent, message, tree, next(self._counter)]).encode()
        c = Commit(hashlib.sha1(seed).hexdigest(), parent, message, files, _now())
        repo.commits[c.sha] = c
        return c

    def fail(self, method: str, path: str, status: int | None, times: int = 1) -> None:
        with self.lock:
            self.faults.append(Fault(method, path, status, times))

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and f.path in path and f.times > 0:
                    f.times -= 1
                    return f
        return None


def _last_commit(repo: Repo, commit: Commit, path: str) -> Commit:
    """The oldest ancestor of `commit` since which `path` has not changed."""
    oid = commit.files[path].oid
    while commit.parent is not None:
        parent = repo.commits[commit.parent]
        if path not in parent.files or parent.files[path].oid != oid:
            break
        commit = parent
    return commit


def _file_entry(repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
    """A file as the tree and paths-info APIs describe it."""
    b = commit.files[path]
    e: dict[str, Any] = {"type": "file", "oid": b.oid, "size": b.size, "path": path}
    if expand:
        last = _last_commit(repo, commit, path)
        e["lastCommit"] = {"id": last.sha, "title": last.message, "date": last.date}
    if b.lfs_oid is not None:
        e["lfs"] = {"oid": b.lfs_oid, "size": b.size, "pointerSize": len(lfs_pointer(b.lfs_oid, b.size))}
    return e


def _is_true(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                n = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(n)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}
        state = self.server.state
        with state.lock:
            state.log.append((self.command, path, self.headers.get("Authorization")))
        fault = state.take_fault(self.command, path)
        if fault is not None:
            self._body()
            if fault.status is None:  # a network drop: no answer at all
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(fault.status, json.dumps({"error": "injected fault"}).encode(),
                       {"X-Error-Message": "injected fault"})
            return
        try:
            for method, pattern, fn in ROUTES:
                if method == self.command or (method == "GET" and self.command == "HEAD"):
                    m = re.fullmatch(pattern, path)
                    if m:
                        args = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                        fn(self, query=query, **args)
                        return
            raise HubError(404, f"no route for {self.command} {path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message}, e.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # -- auth and lookups -----------------------------------------------------------------------------
    def _token_ok(self) -> bool:
        tokens = self.server.state.tokens
        auth = self.headers.get("Authorization", "")
        return tokens is None or (auth.startswith("Bearer ") and auth[7:] in tokens)

    def _require_write(self) -> None:
        if not self._token_ok():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._token_ok()):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        c = repo.resolve(rev)
        if c is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return c

    # -- API ------------------------------------------------------------------------------------------
    def create_repo(self, query: dict[str, str]) -> None:
        self._require_write()
        d = json.loads(self._body())
        repo_id = f"{d['organization']}/{d['name']}" if d.get("organization") else d["name"]
        url = f"{self.server.endpoint}/{repo_id}"
        state = self.server.state
        with state.lock:
            if repo_id in state.repos:
                self._json({"error": "You already created this model repo", "url": url}, 409)
                return
            repo = Repo(repo_id, d.get("visibility", "public") == "private" or bool(d.get("private")))
            attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            c = state.new_commit(repo, None, "initial commit", {".gitattributes": Blob(len(attrs), attrs)})
            repo.branches["main"] = c.sha
            state.repos[repo_id] = repo
        self._json({"url": url, "name": repo_id})

    def validate_yaml(self, query: dict[str, str]) -> None:
        content = json.loads(self._body())["content"]
        m = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            if m and not isinstance(yaml.safe_load(m.group(1)) or {}, dict):
                raise yaml.YAMLError("metadata is not a mapping")
        except yaml.YAMLError as e:
            raise HubError(400, f"Invalid YAML in README.md: {e}") from None
        self._json({"errors": [], "warnings": []})

    def model_info(self, query: dict[str, str], repo: str, rev: str | None = None) -> None:
        r = self._repo(repo)
        c = self._commit(r, rev or "main")
        self._json({
            "id": r.repo_id, "modelId": r.repo_id, "author": r.repo_id.split("/")[0], "sha": c.sha,
            "private": r.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": c.date, "createdAt": c.date, "siblings": [{"rfilename": p} for p in sorted(c.files)],
        })

    def preupload(self, query: dict[str, str], repo: str, rev: str) -> None:
        r = self._repo(repo)
        self._require_write()
        c = self._commit(r, rev)
        files = json.loads(self._body())["files"]
        out = []
        for f in files:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= 10 * 1024 * 1024
            existing = c.files.get(f["path"])
            oid = None if existing is None else (existing.lfs_oid if lfs else existing.oid)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._json({"files": out, "commitOid": c.sha})

    def lfs_batch(self, query: dict[str, str], repo: str) -> None:
        self._repo(repo)
        self._require_write()
        d = json.loads(self._body())
        objects = []
        for o in d["objects"]:
            obj: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.server.state.lfs:
                obj["actions"] = {
                    "upload": {"href": f"{self.server.endpoint}/lfs-objects/{o['oid']}", "header": {}},
                    "verify": {"href": f"{self.server.endpoint}/lfs-verify", "header": {}},
                }
            objects.append(obj)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_put(self, query: dict[str, str], oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its oid")
        with self.server.state.lock:
            self.server.state.lfs[oid] = data
        self._send(200)

    def lfs_verify(self, query: dict[str, str]) -> None:
        d = json.loads(self._body())
        data = self.server.state.lfs.get(d["oid"])
        if data is None or len(data) != d["size"]:
            raise HubError(404, f"LFS object {d['oid']} not found")
        self._json({"success": True})

    def commit(self, query: dict[str, str], repo: str, rev: str) -> None:
        r = self._repo(repo)
        self._require_write()
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        state = self.server.state
        with state.lock:
            if rev not in r.branches:
                raise HubError(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
            head = r.commits[r.branches[rev]]
            parent = header.get("parentCommit")
            if parent is not None and not head.sha.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for item in lines:
                key, v = item["key"], item["value"]
                if key == "file":
                    data = base64.b64decode(v["content"])
                    files[v["path"]] = Blob(len(data), content=data)
                elif key == "lfsFile":
                    if v["oid"] not in state.lfs:
                        raise HubError(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                    files[v["path"]] = Blob(len(state.lfs[v["oid"]]), lfs_oid=v["oid"])
                elif key == "deletedFile":
                    if files.pop(v["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(v["path"].rstrip("/") + "/")}
            c = state.new_commit(r, head.sha, header["summary"], files)
            r.branches[rev] = c.sha
        self._json({"success": True, "commitOid": c.sha, "commitUrl": f"{self.server.endpoint}/{repo}/commit/{c.sha}",
                    "commitMessage": header["summary"], "hookOutput": "", "pullRequestUrl": None})

    def tree(self, query: dict[str, str], repo: str, rev: str, path: str | None = None) -> None:
        r = self._repo(repo)
        c = self._commit(r, rev)
        prefix = (path or "").strip("/")
        recursive = _is_true(query.get("recursive"))
        under = {p: b for p, b in c.files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            raise HubError(404, f"{prefix} does not exist at {rev}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for p in sorted(under):
            rest = p[len(prefix) + 1:] if prefix else p
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = "/".join(filter(None, [prefix, *parts[:i]]))
                if recursive or i == 1:
                    entries.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                           "size": 0, "path": d})
            if recursive or len(parts) == 1:
                entries[p] = _file_entry(r, c, p, _is_true(query.get("expand")))
        self._json(list(entries.values()))

    def paths_info(self, query: dict[str, str], repo: str, rev: str) -> None:
        r = self._repo(repo)
        c = self._commit(r, rev)
        form = parse_qs(self._body().decode())
        expand = _is_true(form.get("expand", ["false"])[-1])
        self._json([_file_entry(r, c, p, expand) for p in form.get("paths", []) if p in c.files])

    def refs(self, query: dict[str, str], repo: str) -> None:
        r = self._repo(repo)

        def refs(kind: str, d: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in sorted(d.items())]

        self._json({"branches": refs("heads", r.branches), "tags": refs("tags", r.tags), "converts": []})

    def tag(self, query: dict[str, str], repo: str, rev: str) -> None:
        r = self._repo(repo)
        self._require_write()
        name = json.loads(self._body())["tag"]
        with self.server.state.lock:
            if name in r.tags:
                raise HubError(409, f"Tag {name} already exists")
            r.tags[name] = self._commit(r, rev).sha
        self._json({"success": True})

    def resolve(self, query: dict[str, str], repo: str, rev: str, path: str) -> None:
        c = self._commit(self._repo(repo), rev)
        blob = c.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = blob.content if blob.content is not None else self.server.state.lfs[blob.lfs_oid or ""]
        if path in self.server.state.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        lie = self.server.state.length_lie.get(path, 0) if self.command == "GET" else 0
        data = data + b" " * lie if lie >= 0 else data[:lie]
        headers = {"X-Repo-Commit": c.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng:
            start = int(rng.group(1))
            end = min(int(rng.group(2)) if rng.group(2) else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start:end + 1], headers, "application/octet-stream")
            return
        self._send(200, data, headers, "application/octet-stream")


ROUTES = [
    ("POST", r"/api/repos/create", Handler.create_repo),
    ("POST", r"/api/validate-yaml", Handler.validate_yaml),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", Handler.model_info),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", Handler.commit),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", Handler.tree),
    ("POST", rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)", Handler.paths_info),
    ("GET", rf"/api/models/{_REPO}/refs", Handler.refs),
    ("POST", rf"/api/models/{_REPO}/tag/(?P<rev>[^/]+)", Handler.tag),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
    ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", Handler.lfs_put),
    ("POST", r"/lfs-verify", Handler.lfs_verify),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Handler.resolve),
]


class HubServer(ThreadingHTTPServer):
    """`HubServer(tokens)` listens on 127.0.0.1 at a free port; `start()`, `stop()`, `endpoint`, `state`."""

    daemon_threads = True

    def __init__(self, tokens: set[str] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(tokens)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
