"""Real servers on 127.0.0.1 for tests: S3-compatible object stores and a fake Hugging Face Hub.

Nothing here patches a client library. Each S3 server is a real subprocess started in its own
process group (``start_new_session=True``) on a free port and always stopped by killing the whole
group and waiting for it, so no orphan outlives a test session. The fake Hub is a real HTTP server
(``http.server`` in a daemon thread of the test process) that answers the endpoints
``huggingface_hub`` 2.x calls for ``HfApi.model_info``, ``hf_hub_download`` and
``snapshot_download``.

Usage::

    with moto_s3_server() as s3:                 # in-memory, no credential checks, ~1-2 s start
        opts = s3.storage_options()              # for s3fs / fsspec
    with nanio_s3_server(tmp_path) as s3:        # disk-backed, checks SigV4, ~0.5 s start
        s3.restart()                             # same port and data dir, e.g. for fault tests
    with fake_hf_hub({"org/tiny": folder}, token="hf_x") as hub:
        HfApi(endpoint=hub.endpoint).model_info("org/tiny", token="hf_x")
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from typing_extensions import Self

__all__ = [
    "REGION",
    "FakeHub",
    "HubRequest",
    "S3Server",
    "ServerStartError",
    "fake_hf_hub",
    "free_port",
    "moto_s3_server",
    "nanio_s3_server",
    "process_group_alive",
    "running",
]

REGION = "us-east-1"


class ServerStartError(RuntimeError):
    """A test server did not become ready; the message carries its command line and stderr."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def process_group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is still in process group ``pgid``.

    Zombies are ignored: an orphan killed after its leader died is reaped by init, which may
    take a moment (or never happen under a minimal container init); it holds no resources.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[3])
        if group == pgid and state not in ("Z", "X"):
            return True
    return False


def _bin(name: str) -> str:
    # Prefer the script next to this interpreter: the venv may not be on PATH.
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


# --------------------------------------------------------------------------------------------
# S3 servers (subprocesses)
# --------------------------------------------------------------------------------------------


@dataclass
class S3Server:
    """An S3-compatible server in a subprocess of its own process group.

    Attributes:
        name: ``"moto"`` or ``"nanio"`` (for messages).
        argv: command line; ``{port}`` is substituted.
        env: extra environment variables for the server process.
        access_key, secret_key: credentials clients must use (moto accepts any).
        port: the TCP port (chosen once, kept across :meth:`restart`).
        start_seconds: how long the last start took until the server answered HTTP.
    """

    name: str
    argv: list[str]
    access_key: str
    secret_key: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    host: str = "127.0.0.1"
    ready_timeout: float = 30.0
    start_seconds: float | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _stderr_path: str | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def credentials(self) -> dict[str, str]:
        """The standard AWS environment variables a client needs for this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
        }

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def storage_options(self, **overrides: object) -> dict:
        """s3fs keyword arguments for this server (path-style, no region_name; see ASSETS.md)."""
        opts: dict = {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
            "config_kwargs": {"s3": {"addressing_style": "path"}},
            # Tests rely on seeing each other's writes at once. (The instance itself is cached
            # by fsspec: a new botocore client costs ~0.5 s of CPU.)
            "use_listings_cache": False,
        }
        opts.update(overrides)
        return opts

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> S3Server:
        if self.running:
            return self
        if not self.port:
            self.port = free_port(self.host)
        argv = [a.format(port=self.port, host=self.host) for a in self.argv]
        fd, self._stderr_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        env = {**os.environ, **self.env}
        t0 = time.monotonic()
        with os.fdopen(fd, "wb") as log:
            self._proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills every descendant
            )
        try:
            self._wait_ready(argv)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, argv: list[str]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.05
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self._proc.returncode} before answering on "
                    f"{self.endpoint_url}.\ncommand: {' '.join(argv)}\noutput:\n{self.log_tail()}"
                )
            if _http_answers(self.host, self.port):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} did not answer HTTP on {self.endpoint_url} within "
                    f"{self.ready_timeout:.0f} s.\ncommand: {' '.join(argv)}\n"
                    f"output:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def log_tail(self, limit: int = 4000) -> str:
        """The last ``limit`` characters of the server's combined stdout/stderr."""
        if not self._stderr_path or not os.path.exists(self._stderr_path):
            return "(no output)"
        with open(self._stderr_path, "rb") as f:
            data = f.read()
        return data[-limit:].decode("utf-8", "replace") or "(no output)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL it if it lingers, and reap the leader."""
        proc, self._proc = self._proc, None
        if proc is not None:
            pgid = proc.pid  # leader of its own session, so pgid == pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=timeout)
            # Children of the leader (uvicorn workers) may outlive it: finish the group off.
            deadline = time.monotonic() + timeout
            while process_group_alive(pgid) and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                time.sleep(0.05)
        if self._stderr_path:
            with contextlib.suppress(OSError):
                os.unlink(self._stderr_path)
            self._stderr_path = None

    def restart(self) -> S3Server:
        """Stop and start again on the same port (and data dir for nanio)."""
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the server's group without cleanup (a crash), leaving it stopped."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _http_answers(host: str, port: int) -> bool:
    """True once something on host:port answers an HTTP request with any status."""
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def moto_s3_server(port: int = 0) -> S3Server:
    """moto's S3 in a ``moto_server`` subprocess: objects in RAM, any credentials accepted.

    Use as a context manager (``with moto_s3_server() as s3:``) or call ``start()``/``stop()``.
    A restart loses every bucket (state lives in the process).
    """
    return S3Server(
        name="moto",
        argv=[_bin("moto_server"), "-H", "{host}", "-p", "{port}"],
        access_key="testing",
        secret_key="testing",
        env={"MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        port=port,
    )


def nanio_s3_server(
    data_dir: str | os.PathLike, access_key: str = "dareflow-key", secret_key: str = "dareflow-secret",
    port: int = 0,
) -> S3Server:
    """nanio in a subprocess: buckets are folders under ``data_dir``; SigV4 is checked.

    Wrong credentials get HTTP 403 (s3fs raises ``PermissionError``). State survives
    :meth:`S3Server.restart` because it lives on disk.
    """
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    return S3Server(
        name="nanio",
        argv=[
            _bin("nanio"), "serve", "--host", "{host}", "--port", "{port}",
            "--data-dir", str(data_dir), "--workers", "1", "--region", REGION,
            "--log-level", "warning", "--no-access-log",
        ],
        access_key=access_key,
        secret_key=secret_key,
        env={"NANIO_ACCESS_KEY": access_key, "NANIO_SECRET_KEY": secret_key},
        port=port,
    )


# --------------------------------------------------------------------------------------------
# Fake Hugging Face Hub (thread)
# --------------------------------------------------------------------------------------------

# Files the real Hub stores in git LFS (their ETag is the sha256 of the content).
_LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.model", "*.gguf", "*.h5")


@dataclass
class HubRequest:
    """One request the fake Hub received (headers lower-cased).

    Recorded before the response is sent, so a client that got its answer always finds its
    request here (``status`` is 0 until the response is written).
    """

    method: str
    path: str
    headers: Mapping[str, str]
    status: int = 0

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def range(self) -> str | None:
        """The ``Range`` header as sent (``bytes=8-2095``), or None for a whole-file GET."""
        return self.headers.get("range")


@dataclass(frozen=True)
class _HubFile:
    path: str
    size: int
    sha256: str
    git_oid: str
    lfs: bool


class FakeHub:
    """A minimal Hugging Face Hub serving local folders as model repos.

    Each repo has exactly one commit; its 40-hex sha is derived from the repo id and the folder's
    contents (so editing the folder yields a new commit). Revision ``main`` and that sha resolve;
    anything else is ``RevisionNotFound``. When ``token`` is set every request must carry
    ``Authorization: Bearer <token>``, as for a private repo; otherwise the Hub answers 401
    ``RepoNotFound``. No ``X-Xet-Hash`` header is ever sent, so clients use plain HTTP downloads.

    File downloads honour ``Range`` (206 with ``Content-Range``, 416 past the end), as the
    Hub's resolve endpoint does, unless ``ignore_range`` is set (then every GET sends the
    whole file with 200, like a server or proxy without range support).

    Attributes:
        requests: every request received, in order (see :meth:`count`).
        ignore_range: answer ranged GETs with the whole file.
    """

    def __init__(self, repos: Mapping[str, str | os.PathLike], token: str | None = None):
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.token = token
        self.ignore_range = False
        self.requests: list[HubRequest] = []
        self._lock = threading.Lock()
        self._hash_cache: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_HubHandler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="fake-hf-hub", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections (clients then see the Hub gone)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection ------------------------------------------------------------------------------

    def count(self, method: str | None = None, contains: str = "") -> int:
        """Number of requests with ``method`` (any if None) whose path contains ``contains``."""
        with self._lock:
            return sum(
                1 for r in self.requests
                if (method is None or r.method == method) and contains in r.path
            )

    def downloads(self) -> list[str]:
        """Paths of the file bodies sent (GET on ``/resolve/``), whole or a byte range
        (:attr:`HubRequest.range`)."""
        with self._lock:
            return [r.path for r in self.requests if r.method == "GET" and "/resolve/" in r.path]

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def commit(self, repo_id: str) -> str:
        """The current 40-hex commit sha of ``repo_id``."""
        files = self.files(repo_id)
        h = hashlib.sha1(repo_id.encode())
        for f in files:
            h.update(f"\0{f.path}\0{f.git_oid}".encode())
        return h.hexdigest()

    def files(self, repo_id: str) -> list[_HubFile]:
        root = self.repos[repo_id]
        out = []
        for p in sorted(root.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(root).as_posix()
            if rel.startswith(".") or "/." in rel:  # .git, .cache from hf_hub_download
                continue
            st = p.stat()
            key = (str(p), st.st_size, st.st_mtime_ns)
            with self._lock:
                cached = self._hash_cache.get(key)
            if cached is None:
                sha256 = hashlib.sha256()
                git = hashlib.sha1(f"blob {st.st_size}\0".encode())
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        sha256.update(chunk)
                        git.update(chunk)
                cached = (sha256.hexdigest(), git.hexdigest())
                with self._lock:
                    self._hash_cache[key] = cached
            lfs = any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pat) for pat in _LFS_PATTERNS)
            out.append(_HubFile(rel, st.st_size, cached[0], cached[1], lfs))
        return out

    def _record(self, req: HubRequest) -> None:
        with self._lock:
            self.requests.append(req)


def fake_hf_hub(
    repos: Mapping[str, str | os.PathLike], token: str | None = None
) -> FakeHub:
    """A started-on-enter :class:`FakeHub` serving ``repos`` (repo id → local folder)."""
    return FakeHub(repos, token=token)


class _HubHandler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean; requests are recorded in FakeHub.requests

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # -- plumbing ----------------------------------------------------------------------------------

    def _dispatch(self, head: bool) -> None:
        record = HubRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        self.fake._record(record)
        self._current = record
        try:
            self._route(head)
        except Exception as exc:  # noqa: BLE001 - a bug in the fake must reach the client
            self._send_json(500, {"error": f"fake hub error: {exc!r}"}, head)

    def send_response(self, code: int, message: str | None = None) -> None:
        # Set before the status line leaves, so the client never sees an unset status.
        current = getattr(self, "_current", None)
        if current is not None:
            current.status = code
        super().send_response(code, message)

    def _send_json(self, status: int, payload: object, head: bool = False,
                   headers: Mapping[str, str] | None = None) -> int:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        return status

    def _error(self, status: int, code: str, message: str, head: bool,
               headers: Mapping[str, str] | None = None) -> int:
        extra = {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}
        return self._send_json(status, {"error": message}, head, extra)

    def _split_repo(self, rest: str) -> tuple[str, str] | None:
        """Split ``{repo_id}{tail}`` against the known repo ids (longest match wins)."""
        for repo_id in sorted(self.fake.repos, key=len, reverse=True):
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return repo_id, rest[len(repo_id):]
        return None

    def _authorized(self) -> bool:
        if self.fake.token is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.fake.token}"

    def _resolve_revision(self, repo_id: str, revision: str) -> str | None:
        commit = self.fake.commit(repo_id)
        return commit if revision in ("main", commit) else None

    def _route(self, head: bool) -> int:
        url = urlsplit(self.path)
        raw = url.path
        query = parse_qs(url.query)
        if raw.startswith("/api/models/"):
            # huggingface_hub puts the repo id in the path unquoted ("org/name").
            split = self._split_repo(raw[len("/api/models/"):])
            if split is None or not self._authorized():
                return self._error(401, "RepoNotFound", "Repository not found", head)
            repo_id, tail = split
            if tail in ("", "/"):
                return self._model_info(repo_id, "main", query, head)
            if tail.startswith("/revision/"):
                return self._model_info(repo_id, unquote(tail[len("/revision/"):]), query, head)
            if tail.startswith("/tree/"):
                rev_and_path = tail[len("/tree/"):]
                rev, _, sub = rev_and_path.partition("/")
                return self._tree(repo_id, unquote(rev), unquote(sub), query, head)
            return self._error(404, "EntryNotFound", f"unknown API route {raw}", head)
        # File download: /{repo_id}/resolve/{revision}/{filename}
        split = self._split_repo(raw.lstrip("/"))
        if split is None or not split[1].startswith("/resolve/"):
            return self._error(404, "RepoNotFound", f"unknown route {raw}", head)
        if not self._authorized():
            return self._error(401, "RepoNotFound", "Repository not found", head)
        repo_id, tail = split
        rev, _, filename = tail[len("/resolve/"):].partition("/")
        return self._resolve(repo_id, unquote(rev), unquote(filename), head)

    def _model_info(self, repo_id: str, revision: str, query: dict, head: bool) -> int:
        commit = self._resolve_revision(repo_id, revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for f in self.fake.files(repo_id):
            sib: dict = {"rfilename": f.path}
            if blobs:
                sib.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sib["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(sib)
        org = repo_id.rpartition("/")[0]
        return self._send_json(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": org or None,
            "sha": commit,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "private": self.fake.token is not None,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": siblings,
        }, head)

    def _tree(self, repo_id: str, revision: str, sub: str, query: dict, head: bool) -> int:
        commit = self._resolve_revision(repo_id, revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries: list[dict] = []
        folders: set[str] = set()
        for f in self.fake.files(repo_id):
            if not f.path.startswith(prefix):
                continue
            rel = f.path[len(prefix):]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
            if len(parts) > 1 and not recursive:
                continue
            entry = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{sub} does not exist", head,
                               {"X-Repo-Commit": commit})
        return self._send_json(200, entries, head)

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> int:
        commit = self._resolve_revision(repo_id, revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        entry = next((f for f in self.fake.files(repo_id) if f.path == filename), None)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", head,
                               {"X-Repo-Commit": commit})
        etag = f'"{entry.sha256 if entry.lfs else entry.git_oid}"'
        path = self.fake.repos[repo_id] / filename
        size = entry.size
        start, end = 0, size - 1
        status = 200
        rng = None if self.fake.ignore_range else self.headers.get("Range")
        if rng and rng.startswith("bytes=") and size > 0:
            first, _, last = rng[len("bytes="):].split(",")[0].partition("-")
            if first:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
            else:  # suffix range: last N bytes
                start = max(size - int(last), 0)
            if start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return 416
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("X-Repo-Commit", commit)
        if entry.lfs:
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(size))
        self.send_header(
            "Content-Disposition", f"inline; filename*=UTF-8''{quote(filename.rsplit('/', 1)[-1])}"
        )
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not head:
            with open(path, "rb") as f:
                f.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = f.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        return status


@contextlib.contextmanager
def running(*servers: S3Server | FakeHub) -> Iterator[tuple]:
    """Start several servers and stop them all, whatever happens."""
    with contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(s) for s in servers)
