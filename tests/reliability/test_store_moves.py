"""A store can be moved and copied: its records (unit sidecars, Prefect cache records of
units and benchmark runs) locate what they describe relative to the store, so a moved
store is reused as it is, and a copy never reads the store it was copied from.

Merges run as real ``python -m dareflow.cli merge`` processes (``cli_runs``); each store
first serves two runs, so it holds the Prefect cache records of its units as well as
their commit records.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dareflow.flows.evaluate import run_evaluate
from tests.reliability.cli_runs import cli_merge, shard_digests
from tests.reliability.conftest import dare_ties_recipe, snapshot

ONE_TASK = """\
name: one_v1
description: one Open LLM Leaderboard v1 task
tasks:
  - name: winogrande
    shots: 5
    metric: acc
"""


def _recipe(pico_family, tmp_path: Path) -> Path:
    return dare_ties_recipe(tmp_path / "r.yaml", pico_family["base"], pico_family["a"],
                            pico_family["b"], seed=5)


def _units(store: Path) -> dict[str, tuple]:
    """Every file under ``{store}/units`` with its bytes' digest, inode and mtime: a
    recomputed or rewritten unit changes one of them."""
    digests = snapshot(store / "units")
    return {name: (digest, (store / "units" / name).stat().st_ino,
                   (store / "units" / name).stat().st_mtime_ns)
            for name, digest in digests.items()}


def _merge(recipe: Path, out: Path, store: Path, tmp_path: Path) -> str:
    code, log = cli_merge(recipe, out, store, tmp_path / f"{out.name}.log")
    assert code == 0, log
    return log


def _model_files(out: Path) -> dict[str, str]:
    """sha256 of every file of a published model but its card and manifest (they name
    the output and the time)."""
    return {k: v for k, v in snapshot(out).items() if k not in ("README.md", "manifest.json")}


def test_moved_and_copied_store(pico_family, tmp_path):
    recipe = _recipe(pico_family, tmp_path)
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    _merge(recipe, tmp_path / "out1", a, tmp_path)
    # the second run reuses every unit and leaves Prefect cache records of them
    assert "merged 0 unit(s), reused 4 committed unit(s)" in _merge(recipe, tmp_path / "out2",
                                                                    a, tmp_path)
    assert len(list((a / "prefect-results").glob("dareflow-unit-*"))) == 4
    reference, files = shard_digests(tmp_path / "out1"), _model_files(tmp_path / "out1")

    # mv: every unit reused where it now lies, nothing recomputed, nothing rewritten
    shutil.move(a, b)
    units = _units(b)
    log = _merge(recipe, tmp_path / "out3", b, tmp_path)
    assert "merged 0 unit(s), reused 4 committed unit(s)" in log
    assert _units(b) == units, "a unit of the moved store was recomputed or rewritten"
    assert shard_digests(tmp_path / "out3") == reference
    assert _model_files(tmp_path / "out3") == files
    assert not a.exists(), "the merge wrote to the store's old location"

    # cp -a, with the original still there: the copy reads only itself. Every shard of
    # the original is poisoned (same sizes): an output read from it would differ.
    shutil.copytree(b, c, symlinks=True)
    for shard in b.glob("units/*/*.safetensors"):
        shard.write_bytes(b"\xff" * shard.stat().st_size)
    original = snapshot(b)
    log = _merge(recipe, tmp_path / "out4", c, tmp_path)
    assert "merged 0 unit(s), reused 4 committed unit(s)" in log
    assert shard_digests(tmp_path / "out4") == reference
    assert snapshot(b) == original, "the merge into the copy touched the original store"

    # the original deleted: the copy works alone, and nothing recreates the original
    shutil.rmtree(b)
    units = _units(c)
    _merge(recipe, tmp_path / "out5", c, tmp_path)
    assert shard_digests(tmp_path / "out5") == reference
    assert _units(c) == units
    assert not b.exists() and not a.exists()


def test_moved_evaluation_store(tmp_path):
    """A benchmark result cached in a store is reused after the store moved (the cached
    record held the result's absolute URI: the rerun read the old location)."""
    from tests.evaluation.conftest import build_tiny_lm

    model = build_tiny_lm(tmp_path / "m")
    suite = tmp_path / "one_v1.yaml"
    suite.write_text(ONE_TASK)
    a, b = tmp_path / "A", tmp_path / "B"
    runs = [run_evaluate({"m": str(model)}, str(suite), limit=2, store=str(a), mirror=True)
            for _ in range(2)]  # the second leaves the Prefect cache record of the run
    assert [r["launched"] for r in runs[1]["runs"]] == [False]
    shutil.move(a, b)
    moved = run_evaluate({"m": str(model)}, str(suite), limit=2, store=str(b), mirror=True)
    assert [r["launched"] for r in moved["runs"]] == [False]
    assert moved["failures"] == []
    assert moved["comparison"] == runs[0]["comparison"]
    assert not a.exists(), "the evaluation wrote to the store's old location"
