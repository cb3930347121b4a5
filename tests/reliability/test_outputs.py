"""Where a merge publishes (dareflow.merge.publish, dareflow.merge.output): runs at once into
one --out, atomic publication, the output lock and its takeover, outputs that share no
bytes with the store, corrupted units, and outputs that would destroy inputs or the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dareflow.flows.merge import run_merge
from dareflow.io import leases
from dareflow.merge import publish
from tests.reliability.cli_runs import (
    ROOT,
    assert_complete_model,
    error_lines,
    finish,
    shard_digests,
    start_merge,
)
from tests.reliability.conftest import committed_units, dare_ties_recipe, snapshot


def _recipe(family: dict[str, Path], tmp_path: Path) -> Path:
    return dare_ties_recipe(tmp_path / "r.yaml", family["base"], family["a"],
                            family["b"], seed=5)


@pytest.fixture(scope="module")
def reference(pico_family, tmp_path_factory) -> dict[str, str]:
    """Shard digests of an uninterrupted merge of ``_recipe`` into a fresh store."""
    tmp = tmp_path_factory.mktemp("reference")
    run_merge(str(_recipe(pico_family, tmp)), str(tmp / "out"), store=str(tmp / "store"))
    return shard_digests(tmp / "out")


def _outs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("out"))


def _model(folder: Path, tag: str) -> Path:
    """A small complete-looking model folder whose files all say ``tag``."""
    folder.mkdir()
    (folder / "model.safetensors").write_text(tag)
    (folder / "manifest.json").write_text(json.dumps({"tag": tag}))
    return folder


# ----------------------------------------------------------------- several runs, one --out


@pytest.mark.slow  # 2 x 4 real merge processes on 2 cores: ~60 s
@pytest.mark.parametrize("overwrite", [False, True])
def test_runs_at_once_into_one_out_publish_one_complete_model(pico_family, tmp_path,
                                                              reference, overwrite):
    recipe, out, store = _recipe(pico_family, tmp_path), tmp_path / "out", tmp_path / "store"
    user = tmp_path / "out.partial"  # a user's folder that looks like old staging
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    if overwrite:
        _model(out, "previous")
    # each unit's lease held 1 s: the first run still merges when the others start
    runs = [start_merge(recipe, out, store, tmp_path / f"run{i}.log", overwrite=overwrite,
                        env={"DAREFLOW_TEST_LEASE_HOLD": "1"}) for i in range(4)]
    codes = [finish(proc, sink) for proc, sink in runs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(4)]
    for code, log in zip(codes, logs):
        assert code == 0 or (code == 2 and error_lines(log)), log
        for line in error_lines(log):
            assert ("another merge is writing to" in line
                    or "already exists and is not empty" in line), line
    assert codes.count(0) >= 1, logs
    if not overwrite:
        assert codes.count(0) == 1, logs  # the others refused, nothing replaced
    assert_complete_model(out)
    assert shard_digests(out) == reference
    assert _outs(tmp_path) == ["out", "out.partial"]  # no staging, lock or aside left
    assert (user / "notes.txt").read_text() == "mine" and len(list(user.iterdir())) == 1
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------------------- publishing


def _staged(tmp_path: Path, out: Path, tag: str) -> Path:
    return _model(Path(f"{out}{publish.STAGING_MARK}{tag}"), tag)


def test_publish_without_overwrite_replaces_nothing_even_when_runs_race(tmp_path):
    out = tmp_path / "out"
    stagings = [_staged(tmp_path, out, f"{i:016x}") for i in range(8)]
    outcomes: list[str] = []

    def run(staging: Path) -> None:
        try:
            publish.publish(str(staging), str(out), overwrite=False)
            outcomes.append("published")
        except FileExistsError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=run, args=(s,)) for s in stagings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("published") == 1, outcomes
    tag = json.loads((out / "manifest.json").read_text())["tag"]
    assert (out / "model.safetensors").read_text() == tag  # one whole model, not a mix
    refusal = next(o for o in outcomes if o != "published")
    assert refusal == (
        f"output '{out}' appeared while this run was merging (written by another process); "
        "nothing was replaced. Run again with --overwrite to replace it, or choose another "
        "--out: the merged units are kept, so the rerun only assembles")


@pytest.mark.skipif(publish._renameat2() is None, reason="no renameat2 (not Linux/glibc)")
def test_overwrite_swaps_folders_so_readers_always_see_a_whole_model(tmp_path):
    out = _model(tmp_path / "out", "v0")
    seen: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if not (out / "manifest.json").is_file():  # never a moment without a model
                seen.append("missing")
            try:  # one folder read through its handle: one model, never a mix of two
                fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                seen.append("missing")
                continue
            try:
                tag = json.loads(_read_at(fd, "manifest.json"))["tag"]
                weights = _read_at(fd, "model.safetensors")
            except FileNotFoundError:
                continue  # the replaced folder, deleted while it was read: not a torn read
            finally:
                os.close(fd)
            if weights != tag:
                seen.append(f"torn {tag}/{weights}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 60):
            staging = _staged(tmp_path, out, f"{i:016x}")
            publish.publish(str(staging), str(out), overwrite=True)
            assert not staging.exists()  # the previous model, deleted
    finally:
        stop.set()
        thread.join()
    assert seen == []
    assert (out / "model.safetensors").read_text() == f"{59:016x}"
    assert _outs(tmp_path) == ["out"]


def _read_at(folder_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY, dir_fd=folder_fd)
    with os.fdopen(fd) as f:
        return f.read()


def test_reserve_refuses_a_live_holder_and_cleans_up_its_own_staging(tmp_path):
    out = tmp_path / "out"
    with publish.reserve(str(out)) as target:
        staging = Path(target.staging_uri)
        assert staging.is_dir() and staging.name == f"out.partial-{target.run_id}"
        doc = leases.read_lease(publish.lock_uri(str(out)))
        assert doc["owner"] == target.run_id and doc["pid"] == os.getpid()
        with pytest.raises(FileExistsError) as caught, publish.reserve(str(out), wait_s=0.3):
            pass
        msg = str(caught.value)
        assert msg.startswith(
            f"another merge is writing to '{out}' (run {target.run_id}, pid {os.getpid()} on "
            f"{doc['host']}; its lock '{out}.dareflow-lock' was renewed "), msg
        assert msg.endswith("wait for it to finish and run again, or choose another --out. "
                            "A lock whose run died is taken over (at once on this host, else "
                            "after 120 s without renewal: DAREFLOW_LEASE_TTL)"), msg
        assert staging.is_dir()  # the refused run did not touch the holder's folder
    assert _outs(tmp_path) == []  # failed or not, this run's staging and lock are gone

    with pytest.raises(RuntimeError), publish.reserve(str(out)) as target:
        (Path(target.staging_uri) / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("the merge failed")
    assert _outs(tmp_path) == []


def test_a_file_under_the_lock_name_is_never_taken_over(tmp_path):
    out, lock = tmp_path / "out", tmp_path / "out.dareflow-lock"
    lock.write_text("my notes")
    with pytest.raises(FileExistsError) as caught, publish.reserve(str(out)):
        pass
    assert str(caught.value) == (
        f"'{lock}' exists and is not a dareflow lock (dareflow locks the output '{out}' "
        "under that name); move that file away or choose another --out")
    assert lock.read_text() == "my notes" and _outs(tmp_path) == ["out.dareflow-lock"]


_KILLED_PUBLISH = """
import sys
from dareflow.merge import publish
publish._exchange = lambda a, b: False  # the fallback: old folder aside, new one in
out = sys.argv[1]
with publish.reserve(out) as target:
    open(target.staging_uri + "/model.safetensors", "w").write("new")
    open(target.staging_uri + "/manifest.json", "w").write('{"tag": "new"}')
    print(target.run_id, flush=True)
    publish.publish(target.staging_uri, out, overwrite=True)
"""


def test_a_dead_runs_lock_is_taken_over_and_its_leftovers_undone(tmp_path):
    out = _model(tmp_path / "out", "previous")
    user = _model(tmp_path / "out.partial", "user")  # not ours: must survive
    other = _model(tmp_path / f"out.partial-{'e' * 16}", "another")  # no dead lock names it
    # killed between moving the previous model aside and moving the new one in
    done = subprocess.run([sys.executable, "-c", _KILLED_PUBLISH, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "DAREFLOW_FAULT": "output-moved-aside:1"})
    assert done.returncode == -9, done.stderr
    run_id = done.stdout.strip()
    assert not out.exists() and (tmp_path / f"out.old-{run_id}").is_dir()
    assert (tmp_path / f"out.partial-{run_id}").is_dir()

    with publish.reserve(str(out)):  # the holder's pid is gone: taken over at once
        assert (out / "model.safetensors").read_text() == "previous"  # put back
        assert not (tmp_path / f"out.old-{run_id}").exists()
        assert not (tmp_path / f"out.partial-{run_id}").exists()
    assert snapshot(user) == {"manifest.json": hashlib.sha256(b'{"tag": "user"}').hexdigest(),
                              "model.safetensors": hashlib.sha256(b"user").hexdigest()}
    assert other.is_dir() and _outs(tmp_path) == ["out", "out.partial", other.name]


# --------------------------------------------------------------- the store is not the output


def test_editing_the_output_in_place_leaves_the_store_intact(pico_family, tmp_path, reference):
    recipe, store = _recipe(pico_family, tmp_path), tmp_path / "store"
    run_merge(str(recipe), str(tmp_path / "out"), store=str(store))
    units = snapshot(store / "units")
    shard = tmp_path / "out" / "model-layer_000.safetensors"
    assert shard.stat().st_nlink == 1  # a copy: no inode shared with the store
    with open(shard, "r+b") as f:  # a user "fixes" a tensor of their merged model in place
        f.seek(-64, os.SEEK_END)
        f.write(b"\xff\x7f" * 32)
    assert snapshot(store / "units") == units

    result = run_merge(str(recipe), str(tmp_path / "again"), store=str(store))
    assert all(result["cached"].values())
    assert shard_digests(tmp_path / "again") == reference
    assert_complete_model(tmp_path / "again")


def test_a_unit_corrupted_in_the_store_is_merged_again_with_a_warning(
        pico_family, tmp_path, reference, caplog):
    recipe, store = _recipe(pico_family, tmp_path), tmp_path / "store"
    run_merge(str(recipe), str(tmp_path / "out"), store=str(store))
    [sidecar] = [p for p in store.glob("units/*/*.json")
                 if json.loads(p.read_text())["unit"] == "layer_001"]
    shard = sidecar.with_suffix(".safetensors")
    record = sidecar.read_bytes()
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # same size, other bytes (bit rot, or a stray write)
        f.seek(-64, os.SEEK_END)
        f.write(b"\xff\x7f" * 32)
    assert shard.stat().st_size == size

    with caplog.at_level(logging.WARNING, logger="dareflow.merge.units"):
        result = run_merge(str(recipe), str(tmp_path / "again"), store=str(store))
    assert result["cached"] == {"embeddings": True, "layer_000": True, "layer_001": False,
                                "final": True}
    warnings = [r.getMessage() for r in caplog.records if r.name == "dareflow.merge.units"]
    sha = json.loads(record)["sha256"]
    assert warnings == [
        (f"unit layer_001: its shard {shard} no longer matches its commit record (sha256 "
         f"{sha[:12]}...): it was changed outside dareflow; merging the unit again")]
    assert shard_digests(tmp_path / "again") == reference
    assert_complete_model(tmp_path / "again")
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == sha  # the store is repaired
    assert sidecar.read_bytes() == record


# ------------------------------------------------------------- inputs and store never lost


@pytest.fixture
def own_family(pico_family, tmp_path) -> dict[str, Path]:
    """A copy of the pico family under ``tmp_path/models``: a bug here must not destroy
    the session's family."""
    root = tmp_path / "models"
    return {k: Path(shutil.copytree(v, root / v.name)) for k, v in pico_family.items()}


@pytest.mark.parametrize("case, relation, target", [
    ("the base", "is", "base"),
    ("a folder holding the inputs", "contains", "base"),
    ("a folder inside an input", "is inside", "ft-a"),
    ("a symlink to an input", "is", "ft-b"),
])
def test_out_over_an_input_is_refused_even_with_overwrite(own_family, tmp_path, case,
                                                          relation, target):
    models = tmp_path / "models"
    out = {"the base": models / "base", "a folder holding the inputs": models,
           "a folder inside an input": models / "ft-a" / "merged",
           "a symlink to an input": tmp_path / "link"}[case]
    if case == "a symlink to an input":
        out.symlink_to(models / "ft-b", target_is_directory=True)
    recipe = _recipe(own_family, tmp_path)
    before = snapshot(models)
    with pytest.raises(ValueError) as caught:
        run_merge(str(recipe), str(out), store=str(tmp_path / "store"), overwrite=True)
    assert str(caught.value) == (
        f"--out '{out}' {relation} the input model folder '{models / target}': a merge must "
        "never write into, or replace, its inputs (--overwrite would delete them); choose "
        "an --out outside every input folder")
    assert snapshot(models) == before
    assert not (tmp_path / "store").exists()  # refused before any work


@pytest.mark.parametrize("where, relation", [
    ("store", "is"), ("store/units", "is inside"), ("store/merged", "is inside"),
    ("store/models", "is inside"), (".", "contains")])
def test_out_over_the_store_is_refused_even_with_overwrite(own_family, tmp_path, where,
                                                           relation):
    work = tmp_path / "work"
    work.mkdir()
    recipe, store = _recipe(own_family, tmp_path), work / "store"
    run_merge(str(recipe), str(work / "first"), store=str(store))
    before = snapshot(store)
    out = work / where
    with pytest.raises(ValueError) as caught:
        run_merge(str(recipe), str(out), store=str(store), overwrite=True)
    assert str(caught.value) == (
        f"--out '{out}' {relation} the artifact store '{store}' (merged units, mirrored "
        "models and caches; --overwrite would delete them); choose an --out outside the "
        f"store, or a folder under '{store}/models/' (the store's place for published "
        "models), or another --store")
    assert snapshot(store) == before and len(committed_units(store)) == 4


def test_out_under_the_stores_models_folder_is_allowed(own_family, tmp_path, reference):
    recipe, store = _recipe(own_family, tmp_path), tmp_path / "store"
    run_merge(str(recipe), str(tmp_path / "first"), store=str(store))
    units = snapshot(store / "units")
    out = store / "models" / "pico"  # where the nightly deployments publish
    for _ in range(2):  # published, then replaced with --overwrite
        run_merge(str(recipe), str(out), store=str(store), overwrite=True)
        assert shard_digests(out) == reference
    assert snapshot(store / "units") == units


def test_shards_are_copied_byte_for_byte_without_direct_io(tmp_path):
    from dareflow.merge.output import copy_shard

    folder = tmp_path / "ramfs"  # no O_DIRECT there: the copy_file_range path
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(folder)], check=False,
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {done.stderr.decode().strip()}")
    try:
        data = os.urandom((9 << 20) + 5)
        (folder / "unit.safetensors").write_bytes(data)
        copy_shard(str(folder / "unit.safetensors"), str(folder / "out" / "shard"), len(data))
        assert (folder / "out" / "shard").read_bytes() == data
        assert (folder / "out" / "shard").stat().st_nlink == 1
        with pytest.raises(OSError) as caught:  # the record says another size
            copy_shard(str(folder / "unit.safetensors"), str(folder / "out" / "x"), 7)
        assert str(caught.value) == (
            f"unit shard '{folder}/unit.safetensors' has {len(data)} bytes, its commit record "
            "says 7: it changed while being copied; run again")
    finally:
        subprocess.run(["umount", str(folder)], check=True)
