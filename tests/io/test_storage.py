"""src/dareflow/io/storage.py, buffers.py and localdisk.py on the local disk, fsspec's memory
store and a real S3 server (moto)."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from dareflow.io import buffers, localdisk, storage

# --------------------------------------------------------------------------- URIs


def test_get_fs_local_forms_resolve_to_same_path(tmp_path):
    fs1, p1 = storage.get_fs(str(tmp_path / "a"))
    fs2, p2 = storage.get_fs(f"file://{tmp_path}/a")
    assert isinstance(fs1, LocalFileSystem) and isinstance(fs2, LocalFileSystem)
    assert p1 == p2 == f"{tmp_path}/a"


def test_get_fs_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    _, path = storage.get_fs("~/x")
    assert path == f"{tmp_path}/x"


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_get_fs_rejects_empty(bad):
    with pytest.raises(ValueError, match="expected a URI"):
        storage.get_fs(bad)


def test_get_fs_unknown_protocol_names_uri():
    with pytest.raises(ValueError, match="nosuchproto://x"):
        storage.get_fs("nosuchproto://x/y")


@pytest.mark.parametrize(
    ("uri", "parts", "expected"),
    [
        ("s3://b/runs", ("r1", "units/x.safetensors"), "s3://b/runs/r1/units/x.safetensors"),
        ("s3://b/runs/", ("/r1/",), "s3://b/runs/r1"),
        ("/tmp/a", ("b", "", "c"), "/tmp/a/b/c"),
        ("file:///tmp/a", ("b",), "file:///tmp/a/b"),
        ("s3://", ("bucket", "k"), "s3://bucket/k"),
    ],
)
def test_join(uri, parts, expected):
    assert storage.join(uri, *parts) == expected


def test_join_refuses_parent_components():
    with pytest.raises(ValueError, match=r"'\.\.'"):
        storage.join("s3://b/runs", "../secrets")


# --------------------------------------------------------------------------- local files


def test_write_read_roundtrip_and_ranges(tmp_path):
    uri = str(tmp_path / "deep" / "er" / "f.bin")
    data = bytes(range(256)) * 4
    storage.write_bytes_atomic(uri, data)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == data
    assert storage.read_bytes(uri, 10, 20) == data[10:20]
    assert storage.read_bytes(uri, 1000, 2000) == data[1000:]  # short read past the end
    assert storage.size(uri) == len(data)
    assert storage.sha256_of(uri) == hashlib.sha256(data).hexdigest()
    assert storage.listdir(str(tmp_path / "deep" / "er")) == ["f.bin"]


def test_read_into_fills_buffer(tmp_path):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes_atomic(uri, b"0123456789")
    buf = bytearray(4)
    assert buffers.read_into(uri, memoryview(buf), start=3) == 4
    assert bytes(buf) == b"3456"
    buf = bytearray(8)
    assert buffers.read_into(uri, memoryview(buf), start=6) == 4  # file ends first


def test_read_ranges_reads_each_range_in_order(tmp_path):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes_atomic(uri, b"0123456789")
    assert buffers.read_ranges(uri, [(6, 8), (0, 3), (8, 20), (4, 4)]) == [
        b"67", b"012", b"89", b""]
    assert buffers.read_ranges(uri, []) == []
    with pytest.raises(ValueError, match="f.bin"):
        buffers.read_ranges(uri, [(0, 3), (5, 2)])
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        buffers.read_ranges(str(tmp_path / "missing.bin"), [(0, 1)])


@pytest.mark.parametrize(("start", "end"), [(-1, None), (5, 2), (1.5, None)])
def test_read_bytes_rejects_bad_ranges(tmp_path, start, end):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes_atomic(uri, b"abc")
    with pytest.raises(ValueError, match="f.bin"):
        storage.read_bytes(uri, start, end)


def test_open_write_atomic_publishes_only_on_success(tmp_path):
    uri = str(tmp_path / "out.safetensors")
    storage.write_bytes_atomic(uri, b"old")
    with storage.open_write_atomic(uri) as f:
        f.write(b"new ")
        # While writing, the final name still holds the old content and the new bytes go
        # to a temporary sibling.
        assert storage.read_bytes(uri) == b"old"
        siblings = [n for n in storage.listdir(str(tmp_path)) if storage.is_temporary(n)]
        assert len(siblings) == 1 and siblings[0].startswith("out.safetensors.tmp-")
        f.write(b"content")
    assert storage.read_bytes(uri) == b"new content"
    assert storage.listdir(str(tmp_path)) == ["out.safetensors"]


def test_open_write_atomic_failure_leaves_old_file_and_no_temporary(tmp_path):
    uri = str(tmp_path / "out.bin")
    storage.write_bytes_atomic(uri, b"old")
    with pytest.raises(RuntimeError, match="boom"), storage.open_write_atomic(uri) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert storage.read_bytes(uri) == b"old"
    assert storage.listdir(str(tmp_path)) == ["out.bin"]


def test_failed_first_write_publishes_nothing(tmp_path):
    uri = str(tmp_path / "never.bin")
    with pytest.raises(KeyboardInterrupt), storage.open_write_atomic(uri) as f:
        f.write(b"x")
        raise KeyboardInterrupt
    assert not storage.exists(uri)
    assert storage.listdir(str(tmp_path)) == []


def test_copy_file_local_and_to_memory(tmp_path):
    src = str(tmp_path / "a.json")
    storage.write_bytes_atomic(src, b'{"a": 1}')
    dst = str(tmp_path / "sub" / "b.json")
    storage.copy_file(src, dst)
    assert storage.read_bytes(dst) == b'{"a": 1}'
    mem = f"memory://dareflow-{uuid.uuid4().hex}/c.json"
    storage.copy_file(src, mem)
    assert storage.read_bytes(mem) == b'{"a": 1}'
    assert not any(storage.is_temporary(n) for n in storage.listdir(mem.rsplit("/", 1)[0]))


def test_memory_store_atomic_write_failure(tmp_path):
    root = f"memory://dareflow-{uuid.uuid4().hex}"
    uri = storage.join(root, "x.bin")
    with pytest.raises(RuntimeError), storage.open_write_atomic(uri) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert not storage.exists(uri)
    storage.write_bytes_atomic(uri, b"done")
    assert storage.listdir(root) == ["x.bin"]


def test_listdir_sorted_names_and_file_error(tmp_path):
    for name in ("b", "a", "c"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d").mkdir()
    assert storage.listdir(str(tmp_path)) == ["a", "b", "c", "d"]
    assert storage.isdir(str(tmp_path / "d")) and not storage.isdir(str(tmp_path / "a"))
    with pytest.raises(NotADirectoryError, match="is a file"):
        storage.listdir(str(tmp_path / "a"))


def test_remove(tmp_path):
    uri = str(tmp_path / "x")
    storage.write_bytes_atomic(uri, b"1")
    storage.remove(uri)
    assert not storage.exists(uri)
    storage.remove(uri, missing_ok=True)
    with pytest.raises(FileNotFoundError, match="x"):
        storage.remove(uri)


@pytest.mark.parametrize(
    "call",
    [
        lambda u: storage.read_bytes(u),
        lambda u: storage.read_bytes(u, 0, 8),
        lambda u: buffers.read_into(u, memoryview(bytearray(4))),
        lambda u: storage.open_read(u),
        lambda u: storage.sha256_of(u),
        lambda u: storage.listdir(u),
        lambda u: storage.info(u),
        lambda u: storage.copy_file(u, u + ".copy"),
    ],
)
def test_missing_file_errors_name_the_uri(tmp_path, call):
    uri = str(tmp_path / "missing" / "model.safetensors")
    with pytest.raises(FileNotFoundError) as err:
        call(uri)
    assert repr(uri) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_error_names_uri(tmp_path):
    uri = str(tmp_path / "secret.bin")
    storage.write_bytes_atomic(uri, b"x")
    os.chmod(uri, 0)
    with pytest.raises(PermissionError, match="secret.bin"):
        storage.read_bytes(uri)


# --------------------------------------------------------------------------- S3 (moto)


def test_s3_roundtrip_ranges_listing_hash(s3_store):
    bucket, opts = s3_store
    prefix = storage.join(bucket, f"t-{uuid.uuid4().hex}")
    uri = storage.join(prefix, "units", "layer_000.safetensors")
    data = os.urandom(3000)
    storage.write_bytes_atomic(uri, data, **opts)
    assert storage.exists(uri, **opts)
    assert storage.read_bytes(uri, 100, 200, **opts) == data[100:200]
    assert buffers.read_ranges(uri, [(0, 5), (2990, 3100), (7, 7), (100, 200)], **opts) == [
        data[:5], data[2990:], b"", data[100:200]]
    buf = bytearray(50)
    assert buffers.read_into(uri, memoryview(buf), 2990, **opts) == 10
    assert bytes(buf[:10]) == data[2990:]
    assert storage.sha256_of(uri, **opts) == hashlib.sha256(data).hexdigest()
    assert storage.listdir(prefix, **opts) == ["units"]
    assert storage.listdir(storage.join(prefix, "units"), **opts) == ["layer_000.safetensors"]
    assert "ETag" in storage.info(uri, **opts)


def test_s3_open_write_atomic_publishes_nothing_on_failure(s3_store):
    bucket, opts = s3_store
    uri = storage.join(bucket, f"t-{uuid.uuid4().hex}", "shard.safetensors")
    with pytest.raises(RuntimeError), storage.open_write_atomic(uri, **opts) as f:
        f.write(b"x" * 1000)
        raise RuntimeError("killed mid-write")
    assert not storage.exists(uri, **opts)
    with storage.open_write_atomic(uri, **opts) as f:
        f.write(b"complete")
        assert not storage.exists(uri, **opts)  # nothing visible until the put
    assert storage.read_bytes(uri, **opts) == b"complete"


def test_s3_copy_between_stores(s3_store, tmp_path):
    bucket, opts = s3_store
    prefix = storage.join(bucket, f"t-{uuid.uuid4().hex}")
    local = str(tmp_path / "a.bin")
    storage.write_bytes_atomic(local, b"payload")
    storage.copy_file(local, storage.join(prefix, "a.bin"), **opts)  # local -> s3
    storage.copy_file(storage.join(prefix, "a.bin"), storage.join(prefix, "b.bin"), **opts)
    storage.copy_file(storage.join(prefix, "b.bin"), str(tmp_path / "b.bin"), **opts)
    assert (tmp_path / "b.bin").read_bytes() == b"payload"
    assert storage.listdir(prefix, **opts) == ["a.bin", "b.bin"]


def test_s3_missing_key_error_names_uri(s3_store):
    bucket, opts = s3_store
    uri = storage.join(bucket, "no", "such", "key.safetensors")
    with pytest.raises(FileNotFoundError) as err:
        storage.read_bytes(uri, 0, 8, **opts)
    assert "'s3://dareflow-test/no/such/key.safetensors'" in str(err.value)
    assert not storage.exists(uri, **opts)


# ---------------------------------------------------------------- direct (O_DIRECT) writes


def _direct_io_possible(folder) -> bool:
    """Whether this folder's filesystem accepts O_DIRECT (ext4/xfs do, tmpfs does not)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = os.path.join(folder, f"probe-{uuid.uuid4().hex}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o644)
    except OSError:
        return False
    try:
        os.write(fd, localdisk.aligned_buffer(localdisk.DIRECT_ALIGN))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.remove(probe)


@pytest.mark.parametrize("size", [0, 1, 7, 4095, 4096, 4097, 3 * 4096 + 5, 1 << 20])
def test_write_buffer_atomic_exact_bytes_any_size(tmp_path, size):
    buffer = localdisk.aligned_buffer(-(-size // localdisk.DIRECT_ALIGN) * localdisk.DIRECT_ALIGN)
    buffer[:size] = os.urandom(size)
    buffer[size:] = b"\xff" * (len(buffer) - size)  # padding must not reach the file
    uri = str(tmp_path / "sub" / "shard.bin")
    how = buffers.write_buffer_atomic(uri, buffer, size)
    assert (tmp_path / "sub" / "shard.bin").read_bytes() == bytes(buffer[:size])
    assert os.listdir(tmp_path / "sub") == ["shard.bin"]  # no temporary left
    expected = "direct" if size and _direct_io_possible(tmp_path) else "buffered"
    assert how == expected


def test_write_buffer_atomic_unaligned_buffer_falls_back(tmp_path):
    # a view one byte into an aligned buffer: O_DIRECT would refuse it
    base = localdisk.aligned_buffer(3 * localdisk.DIRECT_ALIGN)
    base[:] = os.urandom(len(base))
    view = base[1:]
    uri = str(tmp_path / "x.bin")
    assert buffers.write_buffer_atomic(uri, view, 5000) == "buffered"
    assert (tmp_path / "x.bin").read_bytes() == bytes(base[1:5001])


def test_write_buffer_atomic_failure_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "shard.bin"
    target.write_bytes(b"old contents")
    buffer = localdisk.aligned_buffer(4 * localdisk.DIRECT_ALIGN)
    buffer[:] = os.urandom(len(buffer))

    def fail():
        raise RuntimeError("killed between the halves")

    with pytest.raises(RuntimeError, match="killed between the halves"):
        buffers.write_buffer_atomic(str(target), buffer, 10_000, midway=fail)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["shard.bin"]


def test_write_buffer_atomic_rejects_a_size_outside_the_buffer(tmp_path):
    buffer = localdisk.aligned_buffer(100)
    with pytest.raises(ValueError, match=r"size 101 is outside the buffer \(0\.\.100 bytes\)"):
        buffers.write_buffer_atomic(str(tmp_path / "a"), buffer, 101)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("size", [1, 4097, 3 * localdisk.FILLED_CHUNK + 5000])
def test_filling_write_writes_every_target_as_the_buffer_fills(tmp_path, size):
    buffer = localdisk.aligned_buffer(-(-size // localdisk.DIRECT_ALIGN) * localdisk.DIRECT_ALIGN)
    data = os.urandom(size)
    buffer[size:] = b"\xff" * (len(buffer) - size)  # padding must not reach the files
    targets = [str(tmp_path / "store" / "u.bin"), str(tmp_path / "staging" / "u.bin")]
    halves = []
    with buffers.FillingWrite(targets, buffer, size, midway=lambda: halves.append(1)) as write:
        assert write.direct == _direct_io_possible(tmp_path)
        end = 0
        for step in (1, localdisk.FILLED_CHUNK + 3, 2 * localdisk.FILLED_CHUNK, size):
            step = min(step, size)  # filled front to back, in pieces of any length
            buffer[end:step] = data[end:step]
            write.filled(step)
            end = step
        assert write.finish() == hashlib.sha256(data).hexdigest()
    for target in targets:
        assert Path(target).read_bytes() == data
    assert os.listdir(tmp_path / "store") == ["u.bin"]  # no temporary left
    assert halves == [1]


def test_filling_write_left_with_an_error_publishes_nothing(tmp_path):
    buffer = localdisk.aligned_buffer(2 * localdisk.FILLED_CHUNK)
    buffer[:] = b"\x01" * len(buffer)
    target = tmp_path / "u.bin"
    target.write_bytes(b"old contents")
    with pytest.raises(ValueError, match="merge failed"), \
            buffers.FillingWrite([str(target)], buffer, len(buffer)) as write:
        write.filled(localdisk.FILLED_CHUNK + 1)  # one chunk on its way to the disk
        raise ValueError("merge failed")
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["u.bin"]


def test_filling_write_failure_midway_publishes_nothing(tmp_path):
    buffer = localdisk.aligned_buffer(4 * localdisk.DIRECT_ALIGN)
    buffer[:] = os.urandom(len(buffer))

    def fail():
        raise RuntimeError("killed between the halves")

    targets = [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    with pytest.raises(RuntimeError, match="killed between the halves"), \
            buffers.FillingWrite(targets, buffer, 10_000, midway=fail) as write:
        write.filled(10_000)
        write.finish()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("direct", [True, False])
def test_filling_write_drops_an_optional_copy_it_cannot_write(tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.setattr(localdisk.FilledWrite, "start", classmethod(lambda cls, *a, **k: None))
    (tmp_path / "blocked").write_text("a file where the copy's folder would be")
    buffer = localdisk.aligned_buffer(2 * localdisk.DIRECT_ALIGN)
    buffer[:] = os.urandom(len(buffer))
    store, copy = str(tmp_path / "store" / "u.bin"), str(tmp_path / "blocked" / "u.bin")
    with buffers.FillingWrite([store], buffer, 5000, optional=[copy]) as write:
        write.filled(5000)
        assert write.finish() == hashlib.sha256(bytes(buffer[:5000])).hexdigest()
    assert write.written == [store]
    assert Path(store).read_bytes() == bytes(buffer[:5000])
    assert os.listdir(tmp_path / "store") == ["u.bin"]


def test_filling_write_where_direct_io_is_refused_writes_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(localdisk.FilledWrite, "start", classmethod(lambda cls, *a, **k: None))
    buffer = localdisk.aligned_buffer(2 * localdisk.DIRECT_ALIGN)
    buffer[:] = os.urandom(len(buffer))
    with buffers.FillingWrite([str(tmp_path / "u.bin")], buffer, 5000) as write:
        assert not write.direct
        write.filled(5000)
        assert write.finish() == hashlib.sha256(bytes(buffer[:5000])).hexdigest()
    assert (tmp_path / "u.bin").read_bytes() == bytes(buffer[:5000])


def test_filling_write_to_s3_writes_at_the_end(s3_server, s3_store, monkeypatch):
    bucket, options = s3_store
    for name, value in s3_server.credentials.items():  # as a worker finds the store
        monkeypatch.setenv(name, value)
    buffer = localdisk.aligned_buffer(2 * localdisk.DIRECT_ALIGN)
    buffer[:] = os.urandom(len(buffer))
    uri = f"{bucket}/filled/{uuid.uuid4().hex}.bin"
    with buffers.FillingWrite([uri], buffer, 5000) as write:
        assert not write.direct
        write.filled(5000)
        write.finish()
    assert storage.read_bytes(uri, **options) == bytes(buffer[:5000])


def test_write_buffer_atomic_to_s3(s3_store):
    bucket, options = s3_store
    buffer = localdisk.aligned_buffer(2 * localdisk.DIRECT_ALIGN)
    buffer[:] = os.urandom(len(buffer))
    uri = f"{bucket}/direct/{uuid.uuid4().hex}.bin"
    assert buffers.write_buffer_atomic(uri, buffer, 5000, **options) == "buffered"
    assert storage.read_bytes(uri, **options) == bytes(buffer[:5000])
