"""Model fingerprints: a shard edited in place (same size) is a new revision, evaluated again;
an unchanged file is hashed once per machine (stat-keyed cache)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from dareflow.evaluation import fingerprint
from dareflow.evaluation.fingerprint import file_sha256, model_fingerprint
from dareflow.evaluation.runs import evaluate_benchmark
from dareflow.evaluation.suite import load_suite
from dareflow.io import storage

AN_HOUR_AGO = time.time() - 3600


@pytest.fixture(autouse=True)
def _machine_cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("DAREFLOW_CACHE", str(tmp_path / "machine"))
    return tmp_path / "machine"


def _merged_copy(tiny_lm_dir: Path, dest: Path) -> Path:
    """The tiny model as dareflow writes a merge: a manifest with the shard sha256s."""
    shutil.copytree(tiny_lm_dir, dest)
    shard = dest / "model.safetensors"
    (dest / "manifest.json").write_text(json.dumps({"shards": {shard.name: {
        "bytes": shard.stat().st_size, "sha256": storage.sha256_of(str(shard))}}}))
    os.utime(shard, (AN_HOUR_AGO, AN_HOUR_AGO))
    return dest


def _edit_one_byte(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.seek(size - 1)
        last = fh.read(1)
        fh.seek(size - 1)
        fh.write(bytes([last[0] ^ 0x01]))
    assert path.stat().st_size == size


def test_a_shard_edited_in_place_is_a_new_revision(tiny_lm_dir: Path, tmp_path: Path) -> None:
    model = _merged_copy(tiny_lm_dir, tmp_path / "merged")
    before = model_fingerprint(str(model))
    assert before["kind"] == "manifest"  # the manifest matches the content
    _edit_one_byte(model / "model.safetensors")
    after = model_fingerprint(str(model))
    assert after["revision"] != before["revision"]
    assert after["kind"] == "content"  # the manifest no longer describes the shard


def test_edited_model_is_evaluated_again(tiny_lm_dir: Path, mirror_dir: Path,
                                         tmp_path: Path) -> None:
    model = _merged_copy(tiny_lm_dir, tmp_path / "merged")
    entry = load_suite("openllm_v1").task("winogrande").model_dump(mode="json")
    store = str(tmp_path / "store")

    def evaluate() -> dict:
        fp = model_fingerprint(str(model))
        return evaluate_benchmark({"label": "m", **fp}, entry, store=store, limit=2,
                                  backend="hf", mirror_dir=str(mirror_dir))

    first = evaluate()
    assert first["launched"] is True
    assert evaluate()["launched"] is False  # unchanged: the committed result is reused
    _edit_one_byte(model / "model.safetensors")
    third = evaluate()
    assert third["launched"] is True and third["key"] != first["key"]


def test_hashes_are_cached_by_file_state(tmp_path: Path, _machine_cache: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * 1000)
    os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))
    real = file_sha256(path)
    entries = [p for p in (_machine_cache / fingerprint.HASH_CACHE).rglob("*") if p.is_file()]
    assert len(entries) == 1 and entries[0].read_text() == real
    # an unchanged file is not read again: a planted value is believed...
    entries[0].write_text("f" * 64)
    assert file_sha256(path) == "f" * 64
    # ...until the file changes, even to the same size and with its mtime put back
    stat = path.stat()
    path.write_bytes(b"y" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns  # only ctime tells
    assert file_sha256(path) == storage.sha256_of(str(path)) != real


def test_a_file_written_just_now_is_not_cached(tmp_path: Path, _machine_cache: Path) -> None:
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"z" * 10)
    assert file_sha256(path) == storage.sha256_of(str(path))
    assert not (_machine_cache / fingerprint.HASH_CACHE).exists()
