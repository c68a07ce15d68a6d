"""A small Hugging Face Hub look-alike on 127.0.0.1, for tests that drive the REAL huggingface_hub client.

Stdlib only: a ``ThreadingHTTPServer`` in a background thread, repos held in memory. It implements what
huggingface_hub 2.4.0 actually calls (read from its source, see the notes below), nothing more:

    GET  /api/whoami-v2
    POST /api/repos/create                                   409 + {"url"} if it exists, 403 for a read-only token
    POST /api/validate-yaml                                  always valid
    GET  /api/{models|datasets}/{repo_id}[/revision/{rev}]   repo info: sha, siblings, lastModified, private, gated
    GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]          ?recursive=true; file/directory entries, lfs info
    POST /api/{type}s/{repo_id}/paths-info/{rev}
    POST /api/{type}s/{repo_id}/preupload/{rev}              uploadMode "lfs" / "regular" (size threshold, patterns)
    POST /api/{type}s/{repo_id}/commit/{rev}                 ndjson: header, file, lfsFile, deletedFile, deletedFolder
    GET  /api/{type}s/{repo_id}/xet-{read|write}-token/...   501: this Hub does not speak Xet (see below)
    POST /[datasets/]{repo_id}.git/info/lfs/objects/batch    LFS upload actions pointing back at this server
    POST /[datasets/]{repo_id}.git/info/lfs/objects/verify
    PUT  /_lfs/upload/{sha256}                               the upload target; blobs stored by sha256
    HEAD/GET /[datasets/]{repo_id}/resolve/{rev}/{path}      X-Repo-Commit, quoted ETag (git sha1, or the sha256 plus
                                                             X-Linked-Etag/X-Linked-Size for LFS files), Range → 206

Anything else is a plain 404 (no branches/tags/PRs, refs or commit listings, Spaces, buckets). Revisions are branch
names or (short) commit shas; commits go to existing branches only. LFS files are served directly (200), not through
a redirect to a CDN. A private repo is readable by its namespace's user only; a gated one lists publicly and serves
files to its namespace's user and to users added with grant(); writes need a can_write token of the namespace's user.

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and ``X-Error-Message``,
which is what makes the client raise RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError and
GatedRepoError. (The client's fallback "401 means repo not found" only matches https:// URLs, so the code header
is required here.) A wrong token gets 401 "Invalid credentials in Authorization header" on every route.

Use::

    hub = start_hub(lfs_threshold=64 * 1024)       # .url, .stop(); tokens: WRITE_TOKEN / READ_TOKEN / OTHER_TOKEN
    hub.add_repo("tester/model", {"config.json": b"{}"})
    ...                                             # drive huggingface_hub at hub.url
    hub.files("tester/out")                         # {path: bytes} of what was pushed
    hub.requests("GET", "/resolve/")                # the request log, for counting

Pointing the client at the server (huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET, HF_HUB_OFFLINE...
once, at import, into ``huggingface_hub.constants``):

* Explicit arguments, in-process (preferred in tests of this server): ``HfApi(endpoint=hub.url, token=...)``,
  ``snapshot_download(..., endpoint=hub.url, cache_dir=...)``, ``hf_hub_download(..., endpoint=hub.url)``.
  Every call used here takes ``endpoint=``.
* A subprocess (the job's own CLI): ``env = {**os.environ, **client_env(hub, hf_home)}``; it sets HF_ENDPOINT,
  HF_HOME, HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=0 and blanks HF_TOKEN.
* In-process code that takes no endpoint (``job.hub`` calls ``snapshot_download(repo_id, ...)``):
  ``point_client(hub, monkeypatch, hf_home)``; ``isolate_client`` does the same minus the endpoint. Setting
  ``constants.ENDPOINT`` alone is NOT enough: ``hf_hub_url`` formats ``constants.HUGGINGFACE_CO_URL_TEMPLATE``
  (built from the endpoint at import) and the module-level functions ``huggingface_hub.upload_folder/create_repo/
  whoami/...`` are bound methods of an ``HfApi`` created at import, so ``point_client`` patches those three things
  (plus the cache/token paths and the Xet and offline switches).
* Explicit ``endpoint=`` is not quite complete: ``create_repo(exist_ok=True)`` answered 403 (read-only token, repo
  exists) builds its RepoUrl without the endpoint and raises HfUriError unless ``constants.ENDPOINT`` is the server.

Xet: with ``hf_xet`` installed and HF_HUB_DISABLE_XET unset, every file the preupload call marks "lfs" is uploaded
through Xet: ``_commit_api._upload_files`` and ``upload_folder``'s pipeline decide that on the client
(``is_xet_available()``) and ask the server nothing, so no answer from this server can route them through the LFS
batch API. Tests that upload must disable Xet: HF_HUB_DISABLE_XET=1 in a subprocess's environment, or
``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` in-process (read at every call; ``point_client`` does it).
If Xet is left on, the client asks this server for a Xet token and gets a 501 saying so. Downloads never use Xet
here: the server sends no X-Xet-Hash header and no ``xetHash`` in tree entries. (The one server-side lever would be
answering "regular" for every file, which skips LFS and Xet alike; ``start_hub(lfs_threshold=None,
lfs_patterns=())`` does that.)

Fault injection (each applies to the next matching requests; ``match`` is a substring of "METHOD /path?query"):
``fail_next(n, status=500)`` answers n requests with that status; ``drop_next(n)`` handles n requests, then cuts the
response (half the body, or nothing for HEAD / empty bodies) and closes the socket, like a lost response: a commit so
cut IS committed; ``stall_after(nbytes)`` sends the first nbytes of the next file body and then sends nothing until
``release()`` (or ``seconds``, or ``stop()``/``down()``), then closes; ``down()`` closes the listening socket and open
connections (the client gets ConnectError), ``up()`` listens again on the same port.

What the 2.4.0 client does with faults (pinned by tests/test_hubserver.py). Retried with backoff (1 s, 2, 4, 8, 8; 5
retries) on 408/429/5xx and connection errors: preupload, LFS batch, LFS PUT and verify, tree listing (paginate), the
upload_folder commit only when Xet is on (its pipeline), and hf_hub_download's HEAD when nothing is cached (a first
try without retries, then a second round with them: a dead Hub costs ~23 s before LocalEntryNotFoundError). NOT
retried: repo_info/model_info (so snapshot_download's first call: 5xx or refused → LocalEntryNotFoundError, a lost
response → raw httpx2.RemoteProtocolError), whoami, create_repo, validate-yaml, create_commit's commit POST, and the
file body GET on 5xx (HfHubHTTPError). A broken or stalled body (RemoteProtocolError, or ReadTimeout after
HF_HUB_DOWNLOAD_TIMEOUT = 10 s) is re-requested up to 5 times after 1 s, resuming with Range only past the
10 MiB chunks already written, so smaller files restart from byte 0.
"""
from __future__ import annotations

import base64
import fnmatch
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

WRITE_TOKEN = "hf_test_write"  # tester, can write to tester/*
READ_TOKEN = "hf_test_read"  # tester, read only
OTHER_TOKEN = "hf_test_other"  # mallory, can write to mallory/* only
DEFAULT_TOKENS = {WRITE_TOKEN: ("tester", True), READ_TOKEN: ("tester", False), OTHER_TOKEN: ("mallory", True)}

# What a new Hub repo's .gitattributes sends to LFS (a subset), plus the Hub's 10 MB rule for everything else.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.npy",
                "*.npz", "*.parquet", "*.arrow", "*.zip", "*.tar", "*.gz", "*.pkl")
LFS_THRESHOLD = 10 * 1024 * 1024

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
API_ACTIONS = {"revision", "tree", "preupload", "commit", "paths-info", "xet-read-token", "xet-write-token"}


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Blob:
    data: bytes
    lfs: bool
    sha256: str = field(init=False)
    oid: str = field(init=False)  # git blob id: of the content, or of the LFS pointer file
    pointer_size: int = field(init=False)

    def __post_init__(self):
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        self.pointer_size = len(pointer)
        self.oid = _git_sha1(pointer.encode() if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    oid: str
    files: dict[str, Blob]
    message: str
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    gated: str | bool = False
    granted: set[str] = field(default_factory=set)
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    created: str = field(default_factory=_now)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        hits = [c for oid, c in self.commits.items() if len(rev) >= 7 and oid.startswith(rev)]
        return hits[0] if len(hits) == 1 else None

    def commit(self, branch: str, files: dict[str, Blob], message: str) -> Commit:
        parent = self.branches.get(branch)
        seed = f"{self.repo_type}/{self.repo_id}\n{parent}\n{message}\n{time.time_ns()}\n{sorted(files)}"
        c = Commit(hashlib.sha1(seed.encode()).hexdigest(), dict(files), message, parent, _now())
        self.commits[c.oid] = c
        self.branches[branch] = c.oid
        return c


@dataclass
class Hit:
    method: str
    path: str  # with the query string
    status: int | None = None  # None: no response was sent (a dropped HEAD, say)
    headers: dict = field(default_factory=dict)  # request headers, lower-case names


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


@dataclass
class _Rule:
    kind: str  # "fail" | "drop"
    left: int
    status: int = 500
    match: str | None = None


class HubServer:
    def __init__(self, tokens: dict[str, tuple[str, bool]] | None = None, *, lfs_threshold: int | None = LFS_THRESHOLD,
                 lfs_patterns: tuple[str, ...] = LFS_PATTERNS, host: str = "127.0.0.1", port: int = 0):
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self.lfs_threshold, self.lfs_patterns = lfs_threshold, tuple(lfs_patterns)
        self.host, self.port = host, port
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 → bytes, shared by all repos
        self.log: list[Hit] = []
        self.errors: list[str] = []  # unexpected exceptions in handlers (answered 500); tests may assert it is empty
        self.lock = threading.RLock()
        self._rules: list[_Rule] = []
        self._stall: tuple[int, str | None, float | None] | None = None
        self._release = threading.Event()
        self.stalled = threading.Event()  # set once a stalled response has sent its bytes
        self._conns: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HubServer:
        return self.up()

    def up(self) -> HubServer:
        with self.lock:
            if self._httpd is None:
                httpd = _Server((self.host, self.port), _Handler)
                httpd.hub = self
                self.port = httpd.server_address[1]
                threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                 name=f"hubserver:{self.port}").start()
                self._httpd = httpd
        return self

    def down(self) -> None:
        """Stop listening and cut every open connection: the client sees connection refused."""
        with self.lock:
            httpd, self._httpd = self._httpd, None
            conns = list(self._conns)
        self.release()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    stop = down

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- repos

    def is_lfs(self, path: str, size: int) -> bool:
        if size == 0:
            return False
        if self.lfs_threshold is not None and size >= self.lfs_threshold:
            return True
        return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in self.lfs_patterns)

    def _blob(self, path: str, data: bytes) -> Blob:
        blob = Blob(bytes(data), self.is_lfs(path, len(data)))
        if blob.lfs:
            self.lfs_objects[blob.sha256] = blob.data
        return blob

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, repo_type: str = "model",
                 private: bool = False, gated: bool | str = False, message: str = "initial commit") -> str:
        """Seed a repo whose main branch holds `files` in one commit; returns the commit sha."""
        with self.lock:
            repo = Repo(repo_id, repo_type, private, "manual" if gated is True else gated)
            self.repos[(repo_type, repo_id)] = repo
            return repo.commit("main", {p: self._blob(p, d) for p, d in (files or {}).items()}, message).oid

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            commit = self.repo(repo_id, repo_type).resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return {p: b.data for p, b in commit.files.items()}

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[Commit]:
        """The history of `revision`, newest first."""
        with self.lock:
            repo, out = self.repo(repo_id, repo_type), []
            c = repo.resolve(revision)
            while c is not None:
                out.append(c)
                c = repo.commits.get(c.parent) if c.parent else None
            return out

    def grant(self, repo_id: str, username: str, repo_type: str = "model") -> None:
        """Let `username` through a gated repo (the accepted-terms list)."""
        self.repo(repo_id, repo_type).granted.add(username)

    # ---------------------------------------------------------------- request log

    def requests(self, method: str | None = None, contains: str | None = None) -> list[Hit]:
        with self.lock:
            return [h for h in self.log if (method is None or h.method == method)
                    and (contains is None or contains in h.path)]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()

    # ---------------------------------------------------------------- faults

    def fail_next(self, n: int = 1, status: int = 500, match: str | None = None) -> None:
        with self.lock:
            self._rules.append(_Rule("fail", n, status, match))

    def drop_next(self, n: int = 1, match: str | None = None) -> None:
        with self.lock:
            self._rules.append(_Rule("drop", n, match=match))

    def stall_after(self, nbytes: int, match: str | None = None, seconds: float | None = None) -> None:
        """The next file body (GET /resolve/) matching `match` stops after `nbytes` until release()."""
        with self.lock:
            self._release.clear()
            self.stalled.clear()
            self._stall = (nbytes, match, seconds)

    def release(self) -> None:
        self._release.set()

    def clear_faults(self) -> None:
        """Forget every pending fail/drop rule (tests that inject many must not leak them to the next)."""
        with self.lock:
            self._rules.clear()

    def _take_rule(self, request_line: str) -> _Rule | None:
        with self.lock:
            for rule in self._rules:
                if rule.left > 0 and (rule.match is None or rule.match in request_line):
                    rule.left -= 1
                    return rule
            return None

    def _take_stall(self, request_line: str) -> tuple[int, float | None] | None:
        with self.lock:
            if self._stall and (self._stall[1] is None or self._stall[1] in request_line):
                nbytes, _, seconds = self._stall
                self._stall = None
                return nbytes, seconds
            return None


def start_hub(**kwargs) -> HubServer:
    """A started HubServer (call .stop() when done). kwargs go to HubServer()."""
    return HubServer(**kwargs).start()


def client_env(hub: HubServer, hf_home: str | os.PathLike) -> dict[str, str]:
    """Environment overrides that point a huggingface_hub in a subprocess at `hub`, with its own HF_HOME."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
            "HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def isolate_client(monkeypatch, hf_home: str | os.PathLike) -> None:
    """Isolate this process's huggingface_hub (undone by pytest's monkeypatch): caches and token file under
    `hf_home`, no HF_TOKEN, offline mode off, Xet off. Endpoint untouched: pass `endpoint=hub.url` to calls."""
    from huggingface_hub import constants

    home = Path(hf_home)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name, value in {
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"), "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True,
    }.items():
        monkeypatch.setattr(constants, name, value)


def point_client(hub: HubServer, monkeypatch, hf_home: str | os.PathLike) -> None:
    """isolate_client(), and point this process's already-imported huggingface_hub at `hub` for calls made without
    `endpoint=` (like job.hub's). Also sets HF_ENDPOINT & co. (client_env) for subprocesses started from the test."""
    from huggingface_hub import constants, hf_api

    isolate_client(monkeypatch, hf_home)
    for name, value in client_env(hub, hf_home).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)  # the HfApi behind huggingface_hub.upload_folder & co.


# -------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    hub: HubServer

    def handle_error(self, request, client_address):  # a client that hung up is not a test failure
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.server.hub.lock:
            self.server.hub._conns.add(self.connection)

    def finish(self):
        with self.server.hub.lock:
            self.server.hub._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = lambda self: self._dispatch()  # noqa: E731

    # ------------------------------------------------------------ plumbing

    def _dispatch(self):
        hub = self.server.hub
        self.close_connection = True
        self.hit = Hit(self.command, self.path, headers={k.lower(): v for k, v in self.headers.items()})
        with hub.lock:
            hub.log.append(self.hit)
        body = self._read_body()
        line = f"{self.command} {self.path}"
        rule = hub._take_rule(line)
        self.drop = rule is not None and rule.kind == "drop"
        if rule is not None and rule.kind == "fail":
            return self._error(HttpError(rule.status, f"injected failure ({rule.status})"))
        try:
            url = urlsplit(self.path)
            self._route(url.path, parse_qs(url.query), body, self._user())
        except HttpError as e:
            self._error(e)
        except (ValueError, KeyError, IndexError) as e:  # includes json.JSONDecodeError
            self._error(HttpError(400, f"bad request: {e!r}"))
        except OSError:  # the client or down() closed the connection
            self._cut()
        except Exception as e:  # a bug in this file: a 500 the test can see, and a note in hub.errors
            with hub.lock:
                hub.errors.append(f"{line}: {e!r}")
            self._error(HttpError(500, f"test hub bug: {e!r}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _user(self) -> tuple[str, bool] | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth
        if token not in self.server.hub.tokens:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return self.server.hub.tokens[token]

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype: str = "application/json",
              stall: tuple[int, float | None] | None = None):
        if self.drop and (not body or self.command == "HEAD"):
            return self._cut()  # a lost response: nothing at all
        self.hit.status = status
        cut_at = len(body) // 2 if self.drop else stall[0] if stall else None
        try:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            if cut_at is None:
                return self.wfile.write(body)
            self.wfile.write(body[:cut_at])  # a lost response (half of it), or a stall
            if stall and not self.drop:
                self.server.hub.stalled.set()
                self.server.hub._release.wait(stall[1])
        except OSError:
            pass
        self._cut()

    def _cut(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, e: HttpError):
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._json({"error": e.message}, e.status, headers)

    # ------------------------------------------------------------ routing

    def _route(self, path: str, query: dict, body: bytes, user):
        hub, segs, method = self.server.hub, path.strip("/").split("/"), self.command
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami(user)
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"), user)
        if path == "/api/validate-yaml" and method == "POST":
            return self._json({"errors": [], "warnings": []})
        if len(segs) >= 3 and segs[0] == "api" and segs[1] in REPO_TYPES:
            return self._api(REPO_TYPES[segs[1]], segs[2:], query, body, user)
        if len(segs) == 3 and segs[:2] == ["_lfs", "upload"] and method == "PUT":
            return self._lfs_put(segs[2], body)
        if "info" in segs and segs[segs.index("info") - 1].endswith(".git") and method == "POST":
            i = segs.index("info")
            repo_type, repo_id = _split_repo(segs[:i])
            repo = hub.repos.get((repo_type, repo_id.removesuffix(".git")))
            return self._lfs_api(repo, segs[i + 1:], json.loads(body or b"{}"), user)
        if "resolve" in segs and method in ("GET", "HEAD"):
            i = segs.index("resolve")
            repo_type, repo_id = _split_repo(segs[:i])
            if len(segs) < i + 3:
                raise HttpError(404, "Not found")
            return self._resolve(hub.repos.get((repo_type, repo_id)), unquote(segs[i + 1]),
                                 unquote("/".join(segs[i + 2:])), user)
        raise HttpError(404, f"Not found: {method} {path}")

    def _api(self, repo_type: str, rest: list[str], query: dict, body: bytes, user):
        i = next((k for k in range(1, len(rest)) if rest[k] in API_ACTIONS), len(rest))
        repo = self.server.hub.repos.get((repo_type, unquote("/".join(rest[:i]))))
        action, args = (rest[i] if i < len(rest) else None), [unquote(s) for s in rest[i + 1:]]
        method = self.command
        if action is None and method == "GET":
            return self._info(repo, "main", user)
        if action == "revision" and method == "GET":
            return self._info(repo, args[0], user)
        if action == "tree" and method == "GET":
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            return self._tree(repo, args[0], "/".join(args[1:]), recursive, user)
        if action == "paths-info" and method == "POST":
            form = parse_qs(body.decode())
            return self._paths_info(repo, args[0], form.get("paths", []), user)
        if action == "preupload" and method == "POST":
            return self._preupload(repo, args[0], json.loads(body), user)
        if action == "commit" and method == "POST":
            return self._commit(repo, args[0], body, query, user)
        if action in ("xet-read-token", "xet-write-token"):
            raise HttpError(501, "This test Hub does not speak Xet: set HF_HUB_DISABLE_XET=1 "
                                 "(or huggingface_hub.constants.HF_HUB_DISABLE_XET = True)")
        raise HttpError(404, f"Not found: {method} {self.path}")

    # ------------------------------------------------------------ access

    def _readable(self, repo: Repo | None, user, content: bool = False) -> Repo:
        name = user[0] if user else None
        if repo is None or (repo.private and name != repo.namespace):
            raise HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if content and repo.gated and name != repo.namespace and name not in repo.granted:
            raise HttpError(401 if user is None else 403,
                            f"Access to {repo.repo_type} {repo.repo_id} is restricted. You must have access to it "
                            "and be authenticated to access it.", "GatedRepo")
        return repo

    def _writable(self, repo: Repo | None, user) -> Repo:
        repo = self._readable(repo, user)
        if user is None:
            raise HttpError(401, "You must be authenticated to write")
        if not user[1] or user[0] != repo.namespace:
            raise HttpError(403, f"You don't have the rights to write to {repo.repo_type} {repo.repo_id}")
        return repo

    def _rev(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.server.hub.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ------------------------------------------------------------ handlers

    def _whoami(self, user):
        if user is None:
            raise HttpError(401, "Unauthorized")
        name, can_write = user
        self._json({"type": "user", "id": name, "name": name, "fullname": name, "email": f"{name}@example.com",
                    "emailVerified": True, "isPro": False, "canPay": False, "orgs": [],
                    "auth": {"type": "access_token",
                             "accessToken": {"displayName": "test", "role": "write" if can_write else "read"}}})

    def _create_repo(self, body: dict, user):
        hub = self.server.hub
        if user is None:
            raise HttpError(401, "You must be authenticated to create a repo")
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or user[0]
        repo_id = f"{namespace}/{body['name']}"
        if not user[1] or namespace != user[0]:
            raise HttpError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        with hub.lock:
            url = f"{hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
            if (repo_type, repo_id) in hub.repos:
                return self._json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            private = body.get("visibility") == "private" or body.get("private") is True
            gitattributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in hub.lfs_patterns)
            hub.add_repo(repo_id, {".gitattributes": gitattributes.encode()}, repo_type, private)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _info(self, repo, rev: str, user):
        repo = self._readable(repo, user)
        with self.server.hub.lock:
            c = self._rev(repo, rev)
            siblings = []
            for path, b in sorted(c.files.items()):
                s = {"rfilename": path, "size": len(b.data), "blobId": b.oid}
                if b.lfs:
                    s["lfs"] = {"size": len(b.data), "sha256": b.sha256, "pointerSize": b.pointer_size}
                siblings.append(s)
        self._json({"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                    "author": repo.namespace, "sha": c.oid, "lastModified": c.date, "createdAt": repo.created,
                    "private": repo.private, "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0,
                    "tags": [], "siblings": siblings, "usedStorage": sum(len(b.data) for b in c.files.values())})

    def _tree(self, repo, rev: str, base: str, recursive: bool, user):
        repo = self._readable(repo, user)
        with self.server.hub.lock:
            c = self._rev(repo, rev)
            entries = _entries(c.files)
        base = base.strip("/")
        if base and base not in entries or (base and entries[base]["type"] != "directory"):
            raise HttpError(404, f"{base} does not exist on {rev}", "EntryNotFound", **{"X-Repo-Commit": c.oid})
        prefix = base + "/" if base else ""
        out = [e for p, e in entries.items() if p.startswith(prefix) and p != base
               and (recursive or "/" not in p[len(prefix):])]
        self._json(sorted(out, key=lambda e: (e["type"] != "directory", e["path"])))

    def _paths_info(self, repo, rev: str, paths: list[str], user):
        repo = self._readable(repo, user)
        with self.server.hub.lock:
            entries = _entries(self._rev(repo, rev).files)
        self._json([entries[p.strip("/")] for p in paths if p.strip("/") in entries])

    def _preupload(self, repo, rev: str, body: dict, user):
        hub = self.server.hub
        repo = self._writable(repo, user)
        with hub.lock:
            c = self._rev(repo, rev)
            out = []
            for f in body["files"]:
                mode = "lfs" if hub.is_lfs(f["path"], int(f["size"])) else "regular"
                old = c.files.get(f["path"])
                oid = None if old is None else (old.sha256 if old.lfs else old.oid)
                out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": out, "commitOid": c.oid})

    def _commit(self, repo, rev: str, body: bytes, query: dict, user):
        hub = self.server.hub
        repo = self._writable(repo, user)
        if query.get("create_pr"):
            raise HttpError(400, "create_pr is not supported by the test Hub")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with hub.lock:
            if rev not in repo.branches:
                raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.resolve(rev)
            files, header = dict(head.files), {}
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    data = hub.lfs_objects.get(value["oid"])
                    if data is None or len(data) != value.get("size", len(data)):
                        raise HttpError(400, f"Your push was rejected: LFS object {value['oid']} was not uploaded")
                    files[value["path"]] = Blob(data, lfs=True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HttpError(404, f"A file with this name doesn't exist: {value['path']}",
                                        "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                else:
                    raise HttpError(400, f"unsupported commit operation {key!r}")
            parent = header.get("parentCommit")
            if parent and parent != head.oid:
                raise HttpError(412, "A commit has happened since. Please refresh and try again.")
            message = "\n\n".join(x for x in (header.get("summary", ""), header.get("description", "")) if x)
            c = repo.commit(rev, files, message)
        self._json({"success": True, "commitOid": c.oid, "commitUrl": f"{self._repo_url(repo)}/commit/{c.oid}",
                    "hookOutput": ""})

    def _lfs_api(self, repo, rest: list[str], body: dict, user):
        hub = self.server.hub
        repo = self._writable(repo, user)
        if rest == ["lfs", "objects", "verify"]:
            data = hub.lfs_objects.get(body.get("oid"))
            if data is None or len(data) != body.get("size"):
                raise HttpError(404, "Object not found")
            return self._json({"message": "ok"})
        if rest != ["lfs", "objects", "batch"] or body.get("operation") != "upload":
            raise HttpError(400, "only LFS batch uploads are supported")
        objects = []
        for obj in body.get("objects", []):
            out = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in hub.lfs_objects:
                out["authenticated"] = True
                out["actions"] = {
                    "upload": {"href": f"{hub.url}/_lfs/upload/{obj['oid']}"},
                    "verify": {"href": f"{self._repo_url(repo)}.git/info/lfs/objects/verify"},
                }
            objects.append(out)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   ctype="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HttpError(400, "sha256 of the uploaded body does not match the object id")
        with self.server.hub.lock:
            self.server.hub.lfs_objects[oid] = body
        self._send(200, headers={"ETag": f'"{oid}"'})

    def _resolve(self, repo, rev: str, path: str, user):
        hub = self.server.hub
        repo = self._readable(repo, user, content=True)
        with hub.lock:
            c = self._rev(repo, rev)
            blob = c.files.get(path)
        headers = {"X-Repo-Commit": c.oid, "Accept-Ranges": "bytes"}
        if blob is None:
            raise HttpError(404, "Entry not found", "EntryNotFound", **headers)
        headers["ETag"] = f'"{blob.etag}"'
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        data, status = blob.data, 200
        if self.headers.get("Range"):
            start, end = _parse_range(self.headers["Range"], len(data))
            if start is None:
                raise HttpError(416, "Range not satisfiable", **{"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(blob.data)}"
            data, status = data[start:end + 1], 206
        stall = hub._take_stall(f"{self.command} {self.path}") if self.command == "GET" else None
        self._send(status, data, headers, "application/octet-stream", stall=stall)


def _split_repo(segs: list[str]) -> tuple[str, str]:
    """['datasets', 'ns', 'name'] → ('dataset', 'ns/name'); ['ns', 'name'] → ('model', 'ns/name')."""
    if len(segs) > 1 and segs[0] in REPO_TYPES and segs[0] != "models":
        return REPO_TYPES[segs[0]], unquote("/".join(segs[1:]))
    return "model", unquote("/".join(segs))


def _entries(files: dict[str, Blob]) -> dict[str, dict]:
    """Tree entries (as the Hub's /tree and /paths-info return them) for every file and folder of a commit."""
    out: dict[str, dict] = {}
    for path, b in files.items():
        entry = {"type": "file", "oid": b.oid, "size": len(b.data), "path": path}
        if b.lfs:
            entry["lfs"] = {"oid": b.sha256, "size": len(b.data), "pointerSize": b.pointer_size}
        out[path] = entry
        parts = path.split("/")
        for k in range(1, len(parts)):
            d = "/".join(parts[:k])
            out.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                               "path": d})
    return out


_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


def _parse_range(value: str, size: int) -> tuple[int | None, int | None]:
    m = _RANGE.match(value)
    if not m or not (m[1] or m[2]):
        return None, None
    if not m[1]:  # suffix: the last n bytes
        start, end = max(size - int(m[2]), 0), size - 1
    else:
        start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    return (start, end) if start <= end and start < size else (None, None)


__all__ = ["HubServer", "start_hub", "client_env", "isolate_client", "point_client", "HttpError", "Hit", "Blob", "Commit", "Repo",
           "WRITE_TOKEN", "READ_TOKEN", "OTHER_TOKEN", "DEFAULT_TOKENS", "LFS_PATTERNS", "LFS_THRESHOLD"]
