"""SIGKILL a merge at exact points (before, during and after a unit commit, during
assembly), rerun it, and compare with an uninterrupted run; a full local store.

The killed merges run in a subprocess in its own process group (killed as a group
afterwards). They use this test process's temporary Prefect server through
PREFECT_API_URL instead of starting their own (~20 s each on 2 cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dareflow.flows.merge import run_merge
from tests.reliability.conftest import committed_units, dare_ties_recipe, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _recipe(pico_family, tmp_path: Path) -> Path:
    return dare_ties_recipe(tmp_path / "r.yaml", pico_family["base"], pico_family["a"],
                            pico_family["b"], seed=5)


def _shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*.safetensors"))}


def _prefect_api_url() -> str:
    """The API of this process's temporary Prefect server (started if needed)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def _killed_merge(recipe: Path, out: Path, store: Path, fault: str, *,
                  overwrite: bool = False) -> int:
    env = {**os.environ, "DAREFLOW_FAULT": fault, "PREFECT_API_URL": _prefect_api_url()}
    argv = [sys.executable, "-m", "dareflow.cli", "merge", str(recipe), "--out", str(out),
            "--store", str(store), "--max-workers", "1"]
    with open(out.parent / f"merge-{fault.replace(':', '-')}.log", "wb") as log:
        proc = subprocess.Popen(argv + (["--overwrite"] if overwrite else []), env=env,
                                stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
        try:
            return proc.wait(timeout=240)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(pico_family, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    run_merge(str(_recipe(pico_family, tmp)), str(tmp / "out"), store=str(tmp / "store"))
    return _shards(tmp / "out")


# units run largest first: layer_000, layer_001, final (norm + head), embeddings
@pytest.mark.parametrize("fault, committed", [
    ("shard-written:1", []),               # before the first commit: shard, no record
    ("shard-half-written:2", ["layer_000"]),  # during a unit's shard write
    ("unit-committed:3", ["final", "layer_000", "layer_001"]),  # right after a commit
])
def test_killed_merge_resumes_to_identical_bytes(pico_family, tmp_path, reference,
                                                 fault, committed):
    recipe, out, store = _recipe(pico_family, tmp_path), tmp_path / "out", tmp_path / "store"
    assert _killed_merge(recipe, out, store, fault) == -signal.SIGKILL
    assert not out.exists()  # nothing published
    assert committed_units(store) == committed
    before = {p: d for p, d in snapshot(store / "units").items() if p.endswith(".json")}

    result = run_merge(str(recipe), str(out), store=str(store), max_workers=1)
    assert sorted(u for u, c in result["cached"].items() if c) == committed
    after = snapshot(store / "units")
    assert {p: after[p] for p in before} == before  # commit records untouched
    assert _shards(out) == reference
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f: s["sha256"] for f, s in manifest["shards"].items()} == reference


def test_killed_during_assembly_keeps_the_previous_output(pico_family, tmp_path, reference):
    recipe, out, store = _recipe(pico_family, tmp_path), tmp_path / "out", tmp_path / "store"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous model")
    before = snapshot(out)
    assert _killed_merge(recipe, out, store, "shards-copied:1", overwrite=True) == -signal.SIGKILL
    assert snapshot(out) == before  # the old model is intact until the new one is complete
    assert len(committed_units(store)) == 4

    result = run_merge(str(recipe), str(out), store=str(store), overwrite=True)
    assert all(result["cached"].values())
    assert _shards(out) == reference
    assert not (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out"]


@pytest.fixture
def tiny_store(tmp_path):
    """A 40 KiB tmpfs as the store: the first units fit, the rest do not."""
    store = tmp_path / "store"
    store.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(store)],
                          check=False, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield store
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_full_store_fails_clearly_and_marks_no_half_written_unit_done(
        pico_family, tmp_path, tiny_store):
    recipe, out = _recipe(pico_family, tmp_path), tmp_path / "out"
    with pytest.raises(OSError) as caught:
        run_merge(str(recipe), str(out), store=str(tiny_store), max_workers=1)
    msg = str(caught.value)
    assert "the store is full (OSError: [Errno 28] No space left on device); free space " \
           "there, or point the store elsewhere (--store or DAREFLOW_STORE) and run " \
           "again: committed units are kept" in msg, msg
    # the flow raises the failure of one of the units that did not fit: whether it failed
    # creating its lock file or writing its shard depends on which unit it is
    assert re.search(rf"cannot (write|create) '{re.escape(str(tiny_store))}/", msg), msg
    assert not out.exists() and not list(tmp_path.glob("out.partial*"))
    # every commit record points at a complete shard; no temporary file is left behind
    for sidecar in tiny_store.glob("units/*/*.json"):
        record = json.loads(sidecar.read_text())
        shard = sidecar.with_suffix(".safetensors")
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == record["sha256"]
    assert 0 < len(committed_units(tiny_store)) < 4  # some fit, the failed one is not done
    assert not [p for p in tiny_store.rglob("*") if ".tmp-" in p.name]
