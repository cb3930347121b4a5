"""Two runs of one recipe at once: unit leases (src/dareflow/io/leases.py) and the merge flow."""

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dareflow.io import leases, storage
from tests.flows.conftest import dare_ties_recipe

ROOT = Path(__file__).resolve().parents[2]


def _doc(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


# ------------------------------------------------------------------------------- leases


def test_local_lease_is_exclusive_until_released(tmp_path):
    uri = str(tmp_path / "units" / "ab" / "abc.lock")
    first = leases.try_acquire(uri, ttl=60)
    assert first is not None
    assert leases.try_acquire(uri, ttl=60) is None  # held, fresh, holder alive
    assert _doc(uri)["owner"] == first.owner and _doc(uri)["pid"] == os.getpid()
    first.release()
    assert not os.path.exists(uri)
    second = leases.try_acquire(uri, ttl=60)
    assert second is not None and second.owner != first.owner
    second.release()


def test_stale_leases_are_taken_over(tmp_path):
    uri = str(tmp_path / "k.lock")
    # not renewed for longer than the TTL (a holder on another machine that died)
    storage.write_bytes_atomic(uri, json.dumps(
        {"owner": "gone", "host": "other-host", "pid": 1, "renewed": time.time() - 61}).encode())
    lease = leases.try_acquire(uri, ttl=60)
    assert lease is not None and _doc(uri)["owner"] == lease.owner
    lease.release()
    # fresh, but its holder was a process of this host that no longer exists (SIGKILL)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage.write_bytes_atomic(uri, leases._body("killed", 60).replace(
        f'"pid": {os.getpid()}'.encode(), f'"pid": {dead.pid}'.encode()))
    lease = leases.try_acquire(uri, ttl=60)
    assert lease is not None
    lease.release()
    # fresh and held by another machine: respected
    storage.write_bytes_atomic(uri, json.dumps(
        {"owner": "busy", "host": "other-host", "pid": 1, "renewed": time.time()}).encode())
    assert leases.try_acquire(uri, ttl=60) is None
    assert _doc(uri)["owner"] == "busy"


def test_heartbeat_keeps_a_long_hold_fresh(tmp_path):
    uri = str(tmp_path / "k.lock")
    lease = leases.try_acquire(uri, ttl=0.4)
    first = _doc(uri)["renewed"]
    time.sleep(0.7)  # longer than the TTL: only renewals keep it fresh
    assert _doc(uri)["renewed"] > first
    assert not leases.is_stale(_doc(uri), ttl=0.4)
    lease.release()


def test_waiter_gets_the_holders_result_or_gives_up(tmp_path):
    uri = str(tmp_path / "k.lock")
    storage.write_bytes_atomic(uri, json.dumps(
        {"owner": "busy", "host": "other-host", "pid": 1, "renewed": time.time()}).encode())
    result: list[dict] = []
    threading.Timer(0.3, lambda: result.append({"sha256": "x"})).start()
    started = time.monotonic()
    lease, record = leases.acquire_or_wait(uri, lambda: result[0] if result else None,
                                           ttl=60, wait_s=30)
    assert (lease, record) == (None, {"sha256": "x"})
    assert 0.3 <= time.monotonic() - started < 5
    assert leases.acquire_or_wait(uri, lambda: None, ttl=60, wait_s=0.2) == (None, None)


def test_s3_lease_uses_a_conditional_put(s3_bucket):
    uri = f"{s3_bucket.uri}/units/ab/abc.lock"
    assert storage.create_exclusive(uri, b"one") is True
    assert storage.create_exclusive(uri, b"two") is False  # moto honours If-None-Match
    assert storage.read_bytes(uri) == b"one"
    storage.remove(uri)
    lease = leases.try_acquire(uri, ttl=60)
    assert lease is not None and leases.try_acquire(uri, ttl=60) is None
    lease.release()
    assert not storage.exists(uri)


# -------------------------------------------------------------------------- two flow runs


def _start_merge(recipe: Path, out: Path, store: Path, log: Path, env: dict) -> tuple:
    sink = open(log, "wb")  # noqa: SIM115 - closed by _finish
    proc = subprocess.Popen(
        [sys.executable, "-m", "dareflow.cli", "merge", str(recipe), "--out", str(out),
         "--store", str(store), "--max-workers", "2"],
        env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    return proc, sink


def _finish(proc: subprocess.Popen, sink) -> int:
    try:
        return proc.wait(timeout=300)
    finally:
        sink.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.slow  # two processes, each starting its own Prefect server: 25-60 s
def test_two_runs_at_once_compute_each_unit_once(pico_family, tmp_path):
    recipe = dare_ties_recipe(tmp_path / "r.yaml", pico_family["base"], pico_family["a"],
                              pico_family["b"], seed=3)
    store = tmp_path / "store"
    # Both processes reach their units together whatever their Prefect start-up times,
    # and each holds a lease 0.5 s, so the other run finds it held.
    env = {**os.environ, "DAREFLOW_TEST_BARRIER": f"{tmp_path / 'barrier'}:2",
           "DAREFLOW_TEST_LEASE_HOLD": "0.5",
           # two Prefect servers start at once on a shared 2-core machine
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    runs = [_start_merge(recipe, tmp_path / f"out{i}", store, tmp_path / f"run{i}.log", env)
            for i in (1, 2)]
    codes = [_finish(proc, sink) for proc, sink in runs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in (1, 2)]
    assert codes == [0, 0], logs
    computed = [int(re.search(r"merged (\d+) unit\(s\), reused (\d+)", log).group(1))
                for log in logs]
    assert sum(computed) == 4, (computed, logs)  # 4 units, each computed by one run only
    assert _shards(tmp_path / "out1") == _shards(tmp_path / "out2")
    assert len(_shards(tmp_path / "out1")) == 4
    assert not list(store.glob("units/*/*.lock"))  # every lease released
