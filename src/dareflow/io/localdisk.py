"""Local-disk specifics: atomic renames, ``O_DIRECT`` writes, exclusive creation.

``dareflow.io.storage`` and ``dareflow.io.buffers`` resolve URIs with fsspec and hand
the paths of local files here:

- atomic writes (:func:`atomic_file`): a temporary sibling ``<name>.tmp-<uuid>`` is
  written, fsynced, then ``os.replace``-d onto the final name (atomic on POSIX), and the
  folder is fsynced;
- ``O_DIRECT`` writes from page-aligned buffers (:func:`direct_write`,
  :func:`aligned_buffer`, ``DIRECT_ALIGN``), which bypass the page cache;
- exclusive creation (:func:`create_exclusive`): ``os.link`` of a complete temporary
  file onto the name.

:func:`is_local` tells which filesystems these apply to. Storage errors are named after
the URI by ``dareflow.io.retry.storage_errors``; local operations are never retried.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dareflow.io.retry import storage_errors

#: Marker in the name of a temporary sibling written before an atomic commit.
TMP_MARKER = ".tmp-"

#: Alignment of buffers, file offsets and lengths for ``O_DIRECT`` writes: the page
#: size, a multiple of every common disk's logical block size.
DIRECT_ALIGN = 4096


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk (plain paths and ``file://`` URIs)."""
    return isinstance(fs, LocalFileSystem)


def tmp_sibling(path: str) -> str:
    """A fresh temporary name next to ``path`` (``<path>.tmp-<uuid>``)."""
    return f"{path}{TMP_MARKER}{uuid.uuid4().hex}"


def fsync_dir(path: str) -> None:
    """fsync the folder ``path``: makes a rename in it durable. Not possible on every
    platform, so best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(uri: str, path: str) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` (the local path of ``uri``) only when the
    ``with`` body completes: temporary sibling, fsync, ``os.replace``, folder fsync."""
    parent = os.path.dirname(path) or "."
    tmp = tmp_sibling(path)
    with storage_errors(uri, "write"):
        os.makedirs(parent, exist_ok=True)
        f = open(tmp, "wb")  # noqa: SIM115 - closed below, before the rename
    try:
        yield f
        with storage_errors(uri, "write"):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException as e:
        # close() flushes, and fails again on a full disk: the temporary file must go
        # whatever happens, or every failed write leaks one.
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            with storage_errors(uri, "write"):
                raise  # the body's own write hit the full disk: name the URI
        raise


def aligned_buffer(nbytes: int) -> memoryview:
    """A writable, zeroed, page-aligned anonymous buffer of ``nbytes`` bytes, as
    ``dareflow.io.buffers.write_buffer_atomic`` wants (its pages are released when the
    view is freed)."""
    return memoryview(mmap.mmap(-1, max(nbytes, 1)))[:nbytes]


def direct_write(uri: str, path: str, buffer: memoryview, size: int,
                 midway: Callable[[], None] | None) -> bool:
    """The ``O_DIRECT`` path of ``dareflow.io.buffers.write_buffer_atomic``: write
    ``buffer[:size]`` to ``path`` in whole ``DIRECT_ALIGN`` blocks, truncate, fsync and
    rename into place; False: not possible here (nothing was published)."""
    flag = getattr(os, "O_DIRECT", 0)
    padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    if not flag or size == 0 or len(buffer) < padded or not buffer.contiguous \
            or _address(buffer) % DIRECT_ALIGN:
        return False
    parent = os.path.dirname(path) or "."
    tmp = tmp_sibling(path)
    with storage_errors(uri, "write"):
        os.makedirs(parent, exist_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:  # the filesystem has no direct IO (e.g. tmpfs)
            return False
        with storage_errors(uri, "write"):
            raise
    published = False
    try:
        half = (padded // 2) // DIRECT_ALIGN * DIRECT_ALIGN
        try:
            _write_all(fd, buffer[:half] if half else buffer[:padded])
        except OSError as e:
            if e.errno == errno.EINVAL:  # refused by this device's alignment rules
                return False  # (the temporary file goes below) buffered write instead
            raise
        if midway is not None:
            midway()
        if half:
            _write_all(fd, buffer[half:padded])
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        published = True
    except OSError:
        with storage_errors(uri, "write"):
            raise
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if not published:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    fsync_dir(parent)
    return True


#: Bytes per write of :class:`FilledWrite` (a multiple of ``DIRECT_ALIGN``).
FILLED_CHUNK = 8 << 20


class FilledWrite:
    """Write a buffer to a local file with ``O_DIRECT`` while it is still being filled.

    The caller fills ``buffer[:size]`` front to back and calls :meth:`filled` with each
    new end; a background thread writes every whole :data:`FILLED_CHUNK` filled so far
    to the file's temporary sibling (and hashes the bytes, sha256, when asked), so the
    disk works while the rest of the buffer is computed. :meth:`finish` writes the rest,
    truncates, fsyncs and renames the file into place; :meth:`abort` publishes nothing.
    ``midway`` is called once, between the first and the second half of the data (a
    fault-injection point: nothing is published if it raises).

    :meth:`start` returns None where direct IO is impossible (no ``O_DIRECT``, an
    unaligned buffer, a filesystem that refuses it): the caller writes the usual way.
    """

    def __init__(self, uri: str, path: str, fd: int, tmp: str, buffer: memoryview, size: int,
                 midway: Callable[[], None] | None, hashed: bool) -> None:
        self._uri, self._path, self._fd, self._tmp = uri, path, fd, tmp
        self._buffer, self._size = buffer, size
        self._padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
        self._midway = midway
        self._sha = hashlib.sha256() if hashed else None
        self._cond = threading.Condition()
        self._ready = self._written = self._hashed = 0
        self._done = self._closing = False
        self._refused = False  # the first write was refused (EINVAL): write buffered
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="filled-write", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, uri: str, path: str, buffer: memoryview, size: int, *,
              midway: Callable[[], None] | None = None, hashed: bool = False,
              ) -> FilledWrite | None:
        """Open the temporary sibling of ``path`` (the file at ``uri``) and start
        writing; None where direct IO is impossible (nothing created).

        Raises:
            FileNotFoundError, PermissionError, OSError: the folder refused the file
                (named after ``uri``).
        """
        flag = getattr(os, "O_DIRECT", 0)
        padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
        if not flag or size == 0 or len(buffer) < padded or not buffer.contiguous \
                or _address(buffer) % DIRECT_ALIGN:
            return None
        with storage_errors(uri, "write"):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = tmp_sibling(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o644)
        except OSError as e:
            if e.errno == errno.EINVAL:  # no direct IO on this filesystem
                return None
            with storage_errors(uri, "write"):
                raise
        return cls(uri, path, fd, tmp, buffer, size, midway, hashed)

    def filled(self, end: int) -> None:
        """Bytes ``[0, end)`` of the buffer are final."""
        with self._cond:
            self._ready = max(self._ready, min(end, self._size))
            if self._ready - self._written >= FILLED_CHUNK:
                self._cond.notify()

    def finish(self) -> str | None:
        """Write the rest and publish the file; its sha256 (``""`` when not hashed), or
        None if the filesystem refused direct writes after all (nothing published).

        Raises:
            OSError: a write failed (named after the URI); nothing was published.
        """
        with self._cond:
            self._ready, self._done = self._size, True
            self._cond.notify()
        self._thread.join()
        if self._error is not None or self._refused:
            self.abort()
            if self._error is not None:
                raise self._error
            return None
        try:
            with storage_errors(self._uri, "write"):
                os.ftruncate(self._fd, self._size)
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
                os.replace(self._tmp, self._path)
                self._tmp = ""
        except BaseException:
            self.abort()
            raise
        fsync_dir(os.path.dirname(self._path) or ".")
        return self._sha.hexdigest() if self._sha is not None else ""

    def abort(self) -> None:
        """Stop writing and remove the temporary file (idempotent)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._tmp:
            with contextlib.suppress(OSError):
                os.remove(self._tmp)
            self._tmp = ""

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._closing or self._done
                               or self._ready - self._written >= FILLED_CHUNK):
                        self._cond.wait()
                    if self._closing:
                        return
                    ready, done = self._ready, self._done
                if self._sha is not None and ready > self._hashed:
                    self._sha.update(self._buffer[self._hashed:ready])
                    self._hashed = ready
                end = self._padded if done else ready // FILLED_CHUNK * FILLED_CHUNK
                if end > self._written and not self._write(self._written, end):
                    return
                if done:
                    return
        except BaseException as e:  # noqa: BLE001 (handed to finish(), which re-raises it)
            self._error = e

    def _write(self, start: int, end: int) -> bool:
        """Write ``[start, end)``; False if the device refused direct IO at once."""
        half = (self._padded // 2) // DIRECT_ALIGN * DIRECT_ALIGN
        pieces = [(start, end)]
        if self._midway is not None and start < half < end:
            pieces = [(start, half), (half, end)]  # midway between the two halves
        for a, b in pieces:
            if self._midway is not None and a == half:
                self._midway()
            try:
                _write_all(self._fd, self._buffer[a:b])
            except OSError as e:
                if e.errno == errno.EINVAL and self._written == 0:
                    self._refused = True  # this device's alignment rules
                    return False
                with storage_errors(self._uri, "write"):
                    raise
            self._written = b
        return True


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


def _address(buffer: memoryview) -> int:
    """The memory address of ``buffer``'s first byte."""
    if buffer.readonly or len(buffer) == 0:
        return 1  # never aligned for our purpose: use the buffered path
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def create_exclusive(uri: str, path: str, data: bytes) -> bool:
    """Create the local file ``path`` (of ``uri``) holding ``data`` unless it exists.

    The data is written to a temporary sibling, then ``os.link``-ed onto the name, which
    fails if the name exists: exclusive, and a reader never sees the file empty or
    partial.

    Returns:
        True when this call created the file, False when something was already there.
    """
    parent = os.path.dirname(path) or "."
    tmp = tmp_sibling(path)
    with storage_errors(uri, "create"):
        os.makedirs(parent, exist_ok=True)
        try:  # the temporary file goes even when writing it fails (a full disk)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    fsync_dir(parent)
    return True


# -- reading without the page cache: unit shards were written with O_DIRECT, and filling
# fresh page cache to read them once costs more than the disk read (README "Performance")

#: Bytes per ``O_DIRECT`` read (a multiple of ``DIRECT_ALIGN``).
DIRECT_CHUNK = 8 << 20
_DIRECT_BUFFERS = threading.local()


def direct_chunks(path: str) -> Iterator[memoryview] | None:
    """The bytes of the local file ``path`` in ``DIRECT_CHUNK`` pieces read with
    ``O_DIRECT``, or None where the filesystem has no direct IO (e.g. tmpfs).

    Each piece is a view of one page-aligned buffer per thread, valid until the next
    piece: use it before asking for the next one.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    return _direct_pieces(fd)


def _direct_pieces(fd: int) -> Iterator[memoryview]:
    buffer = getattr(_DIRECT_BUFFERS, "buffer", None)
    if buffer is None:
        _DIRECT_BUFFERS.buffer = buffer = aligned_buffer(DIRECT_CHUNK)
    try:
        while True:
            n = os.readv(fd, [buffer])
            if n:
                yield buffer[:n]
            if n < DIRECT_CHUNK:  # a direct read is short only at the end of the file
                return
    finally:
        os.close(fd)


def copy_direct(src: str, dst: str) -> bool:
    """Copy the local file ``src`` over the existing empty file ``dst`` with ``O_DIRECT``
    reads and writes (whole ``DIRECT_ALIGN`` blocks, then truncated to size), the page
    cache untouched; False where either filesystem has no direct IO (nothing written).
    The caller fsyncs ``dst``."""
    flag = getattr(os, "O_DIRECT", 0)
    pieces = direct_chunks(src)
    if pieces is None:
        return False
    try:
        fd = os.open(dst, os.O_WRONLY | flag)
    except OSError as e:
        pieces.close()
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        size = 0
        for piece in pieces:
            n = len(piece)
            padded = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN
            if padded > n:  # the last piece: zero the buffer up to a whole block
                piece = _DIRECT_BUFFERS.buffer[:padded]  # (piece is a view of it)
                piece[n:] = bytes(padded - n)
            _write_all(fd, piece)
            size += n
        os.ftruncate(fd, size)
    finally:
        pieces.close()
        os.close(fd)
    return True
