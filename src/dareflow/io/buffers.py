"""Tensor bytes between the store and memory buffers, without needless copies.

- :func:`read_into` fills a caller's buffer (a tensor allocated once receives its bytes);
- :func:`read_ranges` reads several byte ranges of one file at once;
- :func:`write_buffer_atomic` writes a buffer atomically, with ``O_DIRECT`` from a
  page-aligned buffer on local disks (``dareflow.io.localdisk.aligned_buffer``);
- :class:`FillingWrite` writes a buffer to one or more files while it is being filled
  (local disks), or once it is full (elsewhere).

URIs are resolved by ``dareflow.io.storage.get_fs``; errors name the URI and transient
remote errors are retried, as for every other storage operation (``dareflow.io.retry``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

from dareflow.io import localdisk, retry, storage
from dareflow.io.retry import storage_errors

logger = logging.getLogger(__name__)


def read_ranges(uri: str, ranges: Sequence[tuple[int, int]], **storage_options: Any) -> list[bytes]:
    """Read several byte ranges ``[start, end)`` of one file.

    Local files are opened once; on object stores the ranges are fetched with
    fsspec's ``cat_ranges`` (concurrent ranged GETs on s3fs). A range past the end of
    the file returns fewer bytes, as ``dareflow.io.storage.read_bytes``.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
        ValueError: a negative offset or ``end < start``.
    """
    for start, end in ranges:
        storage.check_range(uri, start, end)
    fs, path = storage.get_fs(uri, **storage_options)
    if not ranges:
        return []
    if localdisk.is_local(fs):
        with storage_errors(uri, "read"), open(path, "rb") as f:
            out = []
            for start, end in ranges:
                f.seek(start)
                out.append(f.read(end - start))
            return out
    wanted = [r for r in ranges if r[1] > r[0]]  # an empty Range header means "all"
    got = iter(retry.call(uri, "read", lambda: fs.cat_ranges(
        [path] * len(wanted), [r[0] for r in wanted], [r[1] for r in wanted],
        on_error="raise")) if wanted else [])
    return [next(got) if end > start else b"" for start, end in ranges]


def read_into(uri: str, buffer: memoryview, start: int = 0, **storage_options: Any) -> int:
    """Fill ``buffer`` with the bytes of ``uri`` from offset ``start`` on.

    Local files are read straight into the buffer (no intermediate copy), so a tensor
    allocated once receives its bytes; other stores do one ranged read and copy.

    Args:
        uri: The file.
        buffer: A writable, byte-formatted buffer (e.g. ``memoryview(array)``), shape
            ``(n,)``; ``n`` bytes are requested.
        start: Byte offset in the file.

    Returns:
        The number of bytes read: less than ``len(buffer)`` only when the file ends
        first.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
    """
    storage.check_range(uri, start, None)
    view = memoryview(buffer).cast("B")
    fs, path = storage.get_fs(uri, **storage_options)
    with storage_errors(uri, "read"):
        if localdisk.is_local(fs):
            filled = 0
            with open(path, "rb") as f:
                f.seek(start)
                while filled < len(view):
                    n = f.readinto(view[filled:])
                    if not n:
                        break
                    filled += n
            return filled
        if len(view) == 0:
            return 0
    data = retry.call(uri, "read", lambda: fs.cat_file(path, start=start, end=start + len(view)))
    view[: len(data)] = data
    return len(data)


def write_buffer_atomic(uri: str, buffer: memoryview, size: int, *,
                        midway: Callable[[], None] | None = None,
                        **storage_options: Any) -> str:
    """Write ``buffer[:size]`` to ``uri`` atomically, bypassing the page cache locally.

    Local files are written with ``O_DIRECT`` where the filesystem allows it: the data
    goes from ``buffer`` to the disk without first being copied into fresh page-cache
    memory, which on the benchmark VM costs ~10x the disk write itself (every newly
    cached page is memory the guest must take back from the host). The file is
    written in whole ``DIRECT_ALIGN`` blocks (``dareflow.io.localdisk``) and then
    truncated to ``size``, fsynced, and renamed into place like every other write.
    Where ``O_DIRECT`` is refused (tmpfs, some network filesystems, other systems)
    or ``buffer`` is not aligned, the usual buffered write is used; other stores get
    ``buffer[:size]`` through ``dareflow.io.storage.open_write_atomic``. The bytes are
    the same.

    Args:
        uri: Destination.
        buffer: The file's bytes from offset 0; for the direct path its address is
            ``DIRECT_ALIGN``-aligned and it extends to ``size`` rounded up to
            ``DIRECT_ALIGN`` (``dareflow.io.localdisk.aligned_buffer`` gives such
            buffers). Bytes past ``size`` are written to the temporary file and
            truncated away.
        size: Length of the file.
        midway: Called once between the first and second half of the data (a fault
            injection point for tests); nothing is published if it raises.

    Returns:
        How it was written: ``"direct"`` or ``"buffered"``.

    Raises:
        FileNotFoundError, PermissionError, OSError: the store refused the write.
    """
    if not 0 <= size <= len(buffer):
        raise ValueError(f"write of {uri!r}: size {size} is outside the buffer "
                         f"(0..{len(buffer)} bytes)")
    fs, path = storage.get_fs(uri, **storage_options)
    if localdisk.is_local(fs) and localdisk.direct_write(uri, path, buffer, size, midway):
        return "direct"
    half = size // 2
    with storage.open_write_atomic(uri, **storage_options) as f:
        f.write(buffer[:half])
        if midway is not None:
            midway()
        f.write(buffer[half:size])
    return "buffered"


class FillingWrite:
    """Write ``buffer[:size]`` atomically to every URI in ``uris`` while it is filled.

    Use as a context manager: fill the buffer front to back, call :meth:`filled` with
    each new end, then :meth:`finish` (the sha256 of the bytes). A local file that takes
    direct IO receives the bytes on a background thread as they are filled
    (``dareflow.io.localdisk.FilledWrite``), so the writes overlap the computation of
    the rest; others (object stores, tmpfs) are written by :meth:`finish` with
    :func:`write_buffer_atomic`. Leaving the block without :meth:`finish` (an error)
    publishes nothing. ``midway`` is called between the halves of the first URI's data
    (a fault-injection point).

    ``optional`` URIs are extra copies: a failure to write one (a full disk) drops that
    copy, logged, and never fails the write; :attr:`written` lists the URIs written.
    """

    def __init__(self, uris: Sequence[str], buffer: memoryview, size: int, *,
                 optional: Sequence[str] = (),
                 midway: Callable[[], None] | None = None) -> None:
        if not 0 <= size <= len(buffer):
            raise ValueError(f"write of {uris[0]!r}: size {size} is outside the buffer "
                             f"(0..{len(buffer)} bytes)")
        self._buffer, self._size, self._midway = buffer, size, midway
        self._required, self._optional = list(uris), list(optional)
        self.written: list[str] = []
        # per URI its progressive writer, or None: written by finish()
        self._writers: dict[str, localdisk.FilledWrite | None] = {}
        try:
            for uri in self._required + self._optional:
                try:
                    self._writers[uri] = self._start(uri, uri == self._required[0])
                except OSError as e:
                    if uri in self._required:
                        raise
                    logger.info("extra copy %s not written: %s", uri, e)
        except BaseException:
            self._abort()
            raise

    def _start(self, uri: str, first: bool) -> localdisk.FilledWrite | None:
        fs, path = storage.get_fs(uri)
        if not localdisk.is_local(fs):
            return None
        return localdisk.FilledWrite.start(uri, path, self._buffer, self._size, hashed=first,
                                           midway=self._midway if first else None)

    @property
    def direct(self) -> bool:
        """Whether the first URI's bytes go to the disk as they are filled."""
        return self._writers.get(self._required[0]) is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._abort()  # after finish(): nothing left to remove

    def _abort(self) -> None:
        for writer in self._writers.values():
            if writer is not None:
                writer.abort()

    def filled(self, end: int) -> None:
        """Bytes ``[0, end)`` of the buffer are final."""
        for writer in self._writers.values():
            if writer is not None:
                writer.filled(end)

    def finish(self) -> str:
        """Publish every file; returns the sha256 of ``buffer[:size]``.

        Raises:
            FileNotFoundError, PermissionError, OSError: the store refused a required
                write (named after its URI); nothing of that file was published.
        """
        sha256 = None
        for uri in self._required:
            sha256 = self._finish(uri, uri == self._required[0]) or sha256
            self.written.append(uri)
        for uri in self._optional:
            if uri not in self._writers:
                continue  # dropped when it was opened
            try:
                self._finish(uri, False)
            except OSError as e:
                logger.info("extra copy %s not written: %s", uri, e)
                continue
            self.written.append(uri)
        return sha256 or hashlib.sha256(self._buffer[:self._size]).hexdigest()

    def _finish(self, uri: str, first: bool) -> str | None:
        writer = self._writers.get(uri)
        digest = writer.finish() if writer is not None else None
        if digest is None:  # not direct (or refused after all): written now
            write_buffer_atomic(uri, self._buffer, self._size,
                                midway=self._midway if first else None)
        return digest
