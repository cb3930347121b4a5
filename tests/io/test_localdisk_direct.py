"""O_DIRECT reads and copies of local files (dareflow.io.localdisk.direct_chunks,
copy_direct): the bytes of every size, and None/False where the filesystem has no direct IO."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from dareflow.io import localdisk


def _direct_io_here(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"x")
    return localdisk.direct_chunks(str(probe)) is not None


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, localdisk.DIRECT_CHUNK,
                                  localdisk.DIRECT_CHUNK + 4096 + 3])
def test_direct_reads_and_copies_give_the_bytes_of_every_size(tmp_path, size):
    if not _direct_io_here(tmp_path):
        pytest.skip(f"no O_DIRECT on the filesystem of {tmp_path}")
    data = os.urandom(size)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    pieces = localdisk.direct_chunks(str(src))
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    dst.write_bytes(b"")
    assert localdisk.copy_direct(str(src), str(dst)) is True
    assert dst.read_bytes() == data


def test_no_direct_io_says_so_and_writes_nothing(tmp_path):
    folder = tmp_path / "ramfs"  # ramfs has no direct IO (tmpfs has since Linux 6.6)
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(folder)], check=False,
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {done.stderr.decode().strip()}")
    try:
        if _direct_io_here(folder):
            pytest.skip("this kernel's ramfs takes O_DIRECT")
        src, dst = folder / "src", folder / "dst"
        src.write_bytes(b"abc")
        dst.write_bytes(b"")
        assert localdisk.direct_chunks(str(src)) is None
        assert localdisk.copy_direct(str(src), str(dst)) is False
        assert dst.read_bytes() == b""
    finally:
        subprocess.run(["umount", str(folder)], check=True)
