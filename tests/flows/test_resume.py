"""Kill a merge (SIGKILL) at exact points, rerun it, and compare with an uninterrupted run."""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dareflow.flows.merge import run_merge
from tests.flows.conftest import dare_ties_recipe, write_recipe


def _recipe(pico_family, tmp_path: Path) -> Path:
    return dare_ties_recipe(tmp_path / "r.yaml", pico_family["base"], pico_family["a"],
                            pico_family["b"], seed=9)


def _merge_in_subprocess(recipe: Path, out: Path, store: Path, fault: str) -> int:
    """Run `dareflow merge` in its own process group with a fault point armed.

    The killed process leaves its temporary Prefect server behind (it holds no lock on
    the store); the whole group is killed afterwards so no process outlives the test.
    """
    env = {**os.environ, "DAREFLOW_FAULT": fault}
    log = out.parent / "merge.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dareflow.cli", "merge", str(recipe), "--out", str(out),
             "--store", str(store), "--max-workers", "1"],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            code = proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return code


def _sidecars(store: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in store.glob("units/*/*.json")}


def _shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(pico_family, tmp_path_factory):
    """An uninterrupted merge of the same recipe, in its own store."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "out"
    run_merge(str(_recipe(pico_family, tmp)), str(out), store=str(tmp / "store"))
    return _shards(out)


def test_killed_after_two_units_resumes_without_recomputing_them(
        pico_family, tmp_path, reference):
    recipe, out, store = _recipe(pico_family, tmp_path), tmp_path / "out", tmp_path / "store"
    code = _merge_in_subprocess(recipe, out, store, "unit-committed:2")
    assert code == -signal.SIGKILL
    committed = _sidecars(store)
    assert len(committed) == 2
    assert not out.exists()  # nothing published

    result = run_merge(str(recipe), str(out), store=str(store))
    assert sum(result["cached"].values()) == 2
    # the committed units were neither rewritten nor recomputed
    after = _sidecars(store)
    assert {k: after[k] for k in committed} == committed
    assert _shards(out) == reference
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f: s["sha256"] for f, s in manifest["shards"].items()} == reference


def test_killed_during_assembly_publishes_nothing_then_completes(
        pico_family, tmp_path, reference):
    recipe, out, store = _recipe(pico_family, tmp_path), tmp_path / "out", tmp_path / "store"
    assert _merge_in_subprocess(recipe, out, store, "shards-copied:1") == -signal.SIGKILL
    assert not out.exists()
    assert len(_sidecars(store)) == 4

    result = run_merge(str(recipe), str(out), store=str(store))
    assert all(result["cached"].values())
    assert _shards(out) == reference


def test_deleted_unit_is_recomputed_not_reported_cached(pico_family, tmp_path, reference):
    recipe, store = _recipe(pico_family, tmp_path), tmp_path / "store"
    run_merge(str(recipe), str(tmp_path / "first"), store=str(store))
    victim = min(store.glob("units/*/*.safetensors"))
    victim.unlink()
    result = run_merge(str(recipe), str(tmp_path / "second"), store=str(store))
    assert sum(not c for c in result["cached"].values()) == 1
    assert _shards(tmp_path / "second") == reference


def test_changing_one_drop_rate_keeps_nothing_stale(pico_family, tmp_path):
    store = tmp_path / "store"
    recipe = _recipe(pico_family, tmp_path)
    run_merge(str(recipe), str(tmp_path / "first"), store=str(store))
    data = json.loads(recipe.read_text())
    data["models"][1]["parameters"]["drop_rate"] = 0.5
    changed = write_recipe(tmp_path / "changed.yaml", data)
    result = run_merge(str(changed), str(tmp_path / "second"), store=str(store))
    # every unit depends on every model's drop rate, so all are recomputed
    assert not any(result["cached"].values())
    # and the output location is not part of the key: a third output reuses everything
    result = run_merge(str(changed), str(tmp_path / "third"), store=str(store))
    assert all(result["cached"].values())
    assert _shards(tmp_path / "second") == _shards(tmp_path / "third")
