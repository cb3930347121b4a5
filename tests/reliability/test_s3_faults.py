"""Transient object-store errors are retried by dareflow.io.retry with bounded backoff: a
server down for a while, one restarted during a merge, and throttling (503 SlowDown)."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dareflow.flows.merge import run_merge
from dareflow.io import retry, storage
from tests.reliability.conftest import write_recipe
from tests.servers import free_port

# botocore's and s3fs's own retries off, so what is measured is dareflow.io.retry's
NO_CLIENT_RETRIES = {"config_kwargs": {"s3": {"addressing_style": "path"},
                                       "retries": {"max_attempts": 1},
                                       "connect_timeout": 2, "read_timeout": 5},
                     "skip_instance_cache": True}


@pytest.fixture
def fast_retries(monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own loop off too
    monkeypatch.setenv(retry.RETRY_DELAY_ENV, "0.2")
    monkeypatch.setenv(retry.RETRY_ATTEMPTS_ENV, "8")
    monkeypatch.setenv(retry.RETRY_SECONDS_ENV, "30")


def test_policy_comes_from_the_environment_and_is_checked(monkeypatch):
    monkeypatch.setenv(retry.RETRY_ATTEMPTS_ENV, "3")
    monkeypatch.setenv(retry.RETRY_SECONDS_ENV, "7.5")
    monkeypatch.setenv(retry.RETRY_DELAY_ENV, "0.1")
    assert retry.retry_policy() == (3, 7.5, 0.1)
    monkeypatch.setenv(retry.RETRY_ATTEMPTS_ENV, "0")
    with pytest.raises(ValueError) as caught:
        retry.retry_policy()
    assert str(caught.value) == ("DAREFLOW_STORAGE_RETRIES='0' is not a number >= 1; set it "
                                 "to e.g. 6 (or unset it for the default)")


class _Keep(logging.Handler):
    """Keeps the messages of WARNING records; calls ``on_first`` at the first one."""

    def __init__(self, on_first=None):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.on_first = on_first

    def emit(self, record):
        self.lines.append(record.getMessage())
        if len(self.lines) == 1 and self.on_first is not None:
            self.on_first()


def test_read_waits_for_a_server_that_comes_back(nanio_bucket, fast_retries):
    uri, _, server = nanio_bucket
    # The server comes back once the first attempt has failed and its retry is announced (a
    # timer raced the client's set-up: a slow first connection found the server back already)
    kept, logger = _Keep(on_first=server.start), logging.getLogger("dareflow.io.retry")
    # another library's logging.config.dictConfig may have disabled existing loggers
    was_disabled, logger.disabled = logger.disabled, False
    logger.addHandler(kept)
    options = {**server.storage_options(), **NO_CLIENT_RETRIES}
    storage.write_bytes_atomic(f"{uri}/x.bin", b"payload", **options)
    server.stop()  # connection refused from now on
    try:
        assert storage.read_bytes(f"{uri}/x.bin", **options) == b"payload"
    finally:
        logger.removeHandler(kept)
        logger.disabled = was_disabled
        server.start()  # no-op where the retry started it
    assert kept.lines, "no retry was announced"
    assert kept.lines[0].startswith(f"cannot read {uri}/x.bin (attempt 1/8): ")
    assert kept.lines[0].endswith("; retrying in 0.2 s")


def test_retries_are_bounded_and_the_error_says_so(nanio_bucket, fast_retries, monkeypatch):
    uri, _, server = nanio_bucket
    options = {**server.storage_options(), **NO_CLIENT_RETRIES}
    storage.write_bytes_atomic(f"{uri}/x.bin", b"payload", **options)
    monkeypatch.setenv(retry.RETRY_ATTEMPTS_ENV, "3")
    monkeypatch.setenv(retry.RETRY_SECONDS_ENV, "5")
    monkeypatch.setenv(retry.RETRY_DELAY_ENV, "0.1")
    server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(OSError) as caught:
            storage.read_bytes(f"{uri}/x.bin", **options)
        assert time.monotonic() - started < 5
    finally:
        server.start()
    msg = str(caught.value)
    assert msg.startswith(f"cannot read '{uri}/x.bin': ")
    assert "gave up after 3 attempt(s) in " in msg
    assert msg.endswith("(DAREFLOW_STORAGE_RETRIES=3, DAREFLOW_STORAGE_RETRY_SECONDS=5); check "
                        "that the store is up and reachable, or raise these limits")


def test_permission_errors_are_not_retried(nanio_bucket, fast_retries):
    uri, _, server = nanio_bucket
    options = {**server.storage_options(secret="wrong-secret"), **NO_CLIENT_RETRIES}
    started = time.monotonic()
    with pytest.raises(PermissionError):
        storage.read_bytes(f"{uri}/x.bin", **options)
    assert time.monotonic() - started < 2


class _Throttling(BaseHTTPRequestHandler):
    """Forwards to an S3 server, answering the first ``budget`` requests 503 SlowDown."""

    upstream: tuple[str, int]
    budget: list[int]
    throttled: list[str]

    def log_message(self, *args):
        pass

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.budget[0] > 0:
            self.budget[0] -= 1
            self.throttled.append(f"{self.command} {self.path}")
            payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                       b"<Message>Please reduce your request rate.</Message></Error>")
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


def test_throttling_is_retried(nanio_bucket, fast_retries):
    uri, _, server = nanio_bucket
    storage.write_bytes_atomic(f"{uri}/x.bin", b"payload", **server.storage_options())
    handler = type("H", (_Throttling,), {"upstream": (server.host, server.port),
                                         "budget": [3], "throttled": []})
    proxy = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        options = {**server.storage_options(
            endpoint_url=f"http://127.0.0.1:{proxy.server_address[1]}"), **NO_CLIENT_RETRIES}
        assert storage.read_bytes(f"{uri}/x.bin", **options) == b"payload"
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert len(handler.throttled) == 3


def _restart_when_first_unit_commits(server, data_dir: Path, restarted: list[float]):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if list(data_dir.rglob("units/*/*.json")):
            server.restart()  # stop (connections refused), then start on the same port
            restarted.append(time.monotonic())
            return
        time.sleep(0.02)


def test_merge_survives_an_s3_restart_mid_run(pico_family, nanio_bucket, nanio_server,
                                             fast_retries, tmp_path):
    uri, _, server = nanio_bucket
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"])}, {"model": str(pico_family["b"])}],
        "dtype": "float32"})
    data_dir = Path(server.argv[server.argv.index("--data-dir") + 1]) / uri[len("s3://"):]
    restarted: list[float] = []
    watcher = threading.Thread(target=_restart_when_first_unit_commits,
                               args=(server, data_dir, restarted))
    watcher.start()
    try:
        result = run_merge(str(recipe), str(tmp_path / "out"), store=f"{uri}/store",
                           max_workers=1)
    finally:
        watcher.join()
    assert restarted, "the server was not restarted during the run"
    assert not any(result["cached"].values())
    reference = run_merge(str(recipe), str(tmp_path / "ref"), store=str(tmp_path / "store"))
    assert {k: v["sha256"] for k, v in result["shards"].items()} == \
        {k: v["sha256"] for k, v in reference["shards"].items()}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"] == \
        result["shards"]
