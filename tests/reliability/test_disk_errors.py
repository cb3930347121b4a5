"""An output on a read-only or full filesystem: refused before any unit is merged with one
``error:`` line naming the output (not the store), or, when the disk fills during assembly,
reported as the output's; nothing staged is left behind. Real filesystems: tmpfs mounts
(root only; skipped with the reason elsewhere).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dareflow.flows.merge import run_merge
from dareflow.merge.preflight import preflight
from dareflow.recipe import load_recipe
from tests.reliability.cli_runs import assert_complete_model, cli_merge, error_lines
from tests.reliability.conftest import committed_units, write_recipe

PAGE = 4096


def _recipe(pico_family, tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"])}, {"model": str(pico_family["b"])}],
        "dtype": "float32",
    })


@contextlib.contextmanager
def _tmpfs(folder: Path, size: int) -> Iterator[Path]:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          check=False, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def test_read_only_output_is_refused_before_merging(pico_family, tmp_path):
    recipe, store = _recipe(pico_family, tmp_path), tmp_path / "store"
    with _tmpfs(tmp_path / "ro", 1 << 20) as ro:
        (ro / "models").mkdir()
        _remount(ro, "ro")
        out = ro / "models" / "merged"
        code, log = cli_merge(recipe, out, store, tmp_path / "merge.log")
        assert code == 2, log
        assert error_lines(log) == [
            (f"error: cannot write the output '{out}': its filesystem is read-only; choose a "
             "--out on a writable filesystem (nothing was merged)")], log
        assert sorted(p.name for p in ro.rglob("*")) == ["models"]
    assert committed_units(store) == []


def test_full_output_disk_is_refused_before_merging(pico_family, tmp_path):
    recipe, store = _recipe(pico_family, tmp_path), tmp_path / "store"
    with _tmpfs(tmp_path / "small", 4 * PAGE) as small:
        out = small / "merged"
        code, log = cli_merge(recipe, out, store, tmp_path / "merge.log")
        assert code == 2, log
        [line] = error_lines(log)
        assert line.startswith(f"error: the output is full: '{out}' needs about "), line
        assert line.endswith(f"for the merged shards and its filesystem ({small}) has 12.3 kB "
                             "free; free space there or choose another --out (nothing was "
                             "merged)"), line
        assert "store" not in line
        assert list(small.iterdir()) == []  # no lock, no staging folder
    assert committed_units(store) == []


def test_output_disk_filling_during_assembly_is_the_outputs_and_a_rerun_assembles(
        pico_family, tmp_path):
    recipe, store = _recipe(pico_family, tmp_path), tmp_path / "store"
    shards = preflight(load_recipe(str(recipe)), str(store), measure=False).estimate.unit_bytes
    # room for the shards' bytes (the pre-flight passes), not for their pages and the
    # config and tokenizer files on top
    with _tmpfs(tmp_path / "small", -(-shards // PAGE) * PAGE + PAGE) as small:
        out = small / "merged"
        with pytest.raises(OSError) as caught:
            run_merge(str(recipe), str(out), store=str(store), max_workers=1)
        assert str(caught.value) == (
            f"cannot write the output '{out}': the output is full (No space left on device); "
            "free space there or choose another --out, and run again: units already merged "
            "are kept in the store, so the rerun only assembles")
        assert list(small.iterdir()) == []  # the staging folder and the lock are gone
        assert len(committed_units(store)) == 4

        _remount(small, f"size={1 << 20}")
        result = run_merge(str(recipe), str(out), store=str(store), max_workers=1)
        assert all(result["cached"].values())
        assert_complete_model(out)
        assert sorted(p.name for p in small.iterdir()) == ["merged"]


def test_full_store_disk_is_the_stores_not_the_outputs(pico_family, tmp_path):
    recipe, out = _recipe(pico_family, tmp_path), tmp_path / "out"
    with _tmpfs(tmp_path / "store", 8 * PAGE) as store:
        with pytest.raises(OSError) as caught:
            run_merge(str(recipe), str(out), store=str(store), max_workers=1)
        msg = str(caught.value)
        assert "the store is full" in msg and "output" not in msg, msg
        assert f"cannot write '{store}/units/" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "store"]
