"""Storage: the one module that talks to fsspec.

Every byte dareflow reads or writes goes through here, addressed by a URI: a plain
local path, ``file://...``, ``s3://bucket/key`` (through s3fs) or any other fsspec
protocol. The rest of the code passes URIs and calls these functions, so a worker on
another machine reads inputs and writes outputs in the shared store without shipping
tensors between processes.

Writes are atomic: a reader (or a resumed run) sees either the previous object or the
complete new one, never a partial one.

- Local files: write a temporary sibling ``<name>.tmp-<uuid>``, fsync it, then
  ``os.replace`` it onto the final name (atomic on POSIX) and fsync the folder.
- Object stores (s3, gcs, azure): one put of the complete object. An object store
  never shows a partial object for a single put (a multipart upload becomes visible
  only when it completes), so no temporary key is needed. Streams are spooled to a
  local temporary file first (``tempfile.gettempdir()``, i.e. ``$TMPDIR``) because an
  fsspec file that is closed after an error would publish what was written so far.
- Other fsspec filesystems (memory, sftp, ...): temporary sibling then ``fs.mv``.

Storage errors become built-in exceptions (``FileNotFoundError``, ``PermissionError``,
``OSError``) whose message names the URI, what failed and what to check.

Credentials and endpoints: pass fsspec storage options as keyword arguments
(``endpoint_url=..., key=..., secret=...``) or configure them once for the process
through fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL`` and friends, or
``fsspec.config.conf["s3"]``) and the standard ``AWS_*`` variables.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from dareflow.errors import is_transient
from dareflow.io.s3 import is_s3_uri, storage_options_for

#: Marker in the name of a temporary sibling written before an atomic commit.
TMP_MARKER = ".tmp-"

#: Protocols of object stores, where one put is atomic and renames are copies.
OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
)

_CHUNK = 8 * 1024 * 1024

# Exceptions of object-store client libraries that are not OSError subclasses
# (botocore's NoCredentialsError, EndpointConnectionError, ...): turned into OSError.
_BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "google", "azure")


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _storage_errors(uri: str, action: str) -> Iterator[None]:
    """Re-raise storage errors as built-in exceptions whose message names ``uri``."""
    try:
        yield
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"cannot {action} {uri!r}: no such file, folder or object ({_reason(e)}); "
            "check the path (bucket, prefix and key for object stores)"
        ) from e
    except IsADirectoryError as e:
        raise IsADirectoryError(
            f"cannot {action} {uri!r}: it is a folder, not a file ({_reason(e)}); "
            "pass the URI of a file inside it"
        ) from e
    except NotADirectoryError as e:
        raise NotADirectoryError(
            f"cannot {action} {uri!r}: a parent is a file, not a folder ({_reason(e)})"
        ) from e
    except PermissionError as e:
        raise PermissionError(
            f"cannot {action} {uri!r}: permission denied ({_reason(e)}); check the "
            "credentials (for s3:// the AWS_* variables or the key/secret storage "
            "options) and the access rights on the path"
        ) from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC, f"cannot {action} {uri!r}: the store is full ({_reason(e)}); "
                "free space there, or point the store elsewhere (--store or "
                "DAREFLOW_STORE) and run again: committed units are kept"
            ) from e
        raise OSError(f"cannot {action} {uri!r}: {_reason(e)}") from e
    except Exception as e:  # only client-library errors are translated, others re-raised
        if type(e).__module__.split(".")[0] not in _BACKEND_MODULES:
            raise
        raise OSError(
            f"cannot {action} {uri!r}: {type(e).__name__}: {e}; check the endpoint, "
            "network and credentials of the store"
        ) from e


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------- retries
# Remote stores fail transiently (a restarted server, a dropped connection, 5xx,
# throttling). botocore and s3fs retry a little on their own; on top of that every
# remote read/write/listing here is retried with exponential backoff, bounded both in
# attempts and in total time. Local files are never retried (ENOSPC does not heal).

#: Environment variables: attempts (>= 1), total seconds, first delay in seconds.
RETRY_ATTEMPTS_ENV = "DAREFLOW_STORAGE_RETRIES"
RETRY_SECONDS_ENV = "DAREFLOW_STORAGE_RETRY_SECONDS"
RETRY_DELAY_ENV = "DAREFLOW_STORAGE_RETRY_DELAY"
RETRY_DEFAULTS = {RETRY_ATTEMPTS_ENV: 6.0, RETRY_SECONDS_ENV: 60.0, RETRY_DELAY_ENV: 0.5}

_log = logging.getLogger(__name__)

def retry_policy() -> tuple[int, float, float]:
    """``(attempts, total_seconds, first_delay)`` from the environment (see RETRY_*).

    Raises:
        ValueError: a variable is not a number in its range (the message names it).
    """
    values = {}
    for var, default in RETRY_DEFAULTS.items():
        raw = os.environ.get(var, "")
        try:
            value = float(raw) if raw.strip() else default
        except ValueError:
            value = -1.0
        low = 1.0 if var == RETRY_ATTEMPTS_ENV else 0.0
        if not value >= low:
            raise ValueError(
                f"{var}={raw!r} is not a number >= {low:g}; set it to e.g. "
                f"{default:g} (or unset it for the default)"
            )
        values[var] = value
    return (int(values[RETRY_ATTEMPTS_ENV]), values[RETRY_SECONDS_ENV],
            values[RETRY_DELAY_ENV])


def _call(fs: fsspec.AbstractFileSystem, uri: str, action: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` with storage errors named after ``uri``; transient remote errors are
    retried with exponential backoff (see ``retry_policy``)."""
    if _is_local(fs):
        with _storage_errors(uri, action):
            return fn()
    attempts, budget, delay = retry_policy()
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            with _storage_errors(uri, action):
                return fn()
        except OSError as e:
            elapsed = time.monotonic() - started
            if not is_transient(e):
                raise
            if attempt == attempts or elapsed + delay > budget:
                raise OSError(
                    f"{e}; gave up after {attempt} attempt(s) in {elapsed:.1f} s "
                    f"({RETRY_ATTEMPTS_ENV}={attempts}, {RETRY_SECONDS_ENV}={budget:g}); "
                    "check that the store is up and reachable, or raise these limits"
                ) from e
            _log.warning("cannot %s %s (attempt %d/%d): %s; retrying in %.1f s",
                         action, uri, attempt, attempts, _reason(e.__cause__ or e), delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return any(p in OBJECT_STORE_PROTOCOLS for p in _protocols(fs))


def _refresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    # s3fs caches listings; another worker may have written since, so ask again.
    if not _is_local(fs):
        fs.invalidate_cache(path)


def _tmp_sibling(path: str) -> str:
    return f"{path}{TMP_MARKER}{uuid.uuid4().hex}"


def _check_range(uri: str, start: int | None, end: int | None) -> None:
    for label, value in (("start", start), ("end", end)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(
                f"read of {uri!r}: {label} must be a non-negative integer byte offset, "
                f"got {value!r}"
            )
    if start is not None and end is not None and end < start:
        raise ValueError(
            f"read of {uri!r}: end ({end}) is before start ({start}); pass the byte "
            "range as start <= end (end exclusive)"
        )


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable; not possible on every platform, so best effort.
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


# --------------------------------------------------------------------------- public API


def get_fs(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URI to its fsspec filesystem and the path inside it.

    Args:
        uri: A local path (``~`` is expanded), ``file://...``, ``s3://bucket/key`` or
            any fsspec URL (chained URLs such as ``simplecache::s3://...`` work too).
        **storage_options: Options for the filesystem (e.g. ``endpoint_url``, ``key``,
            ``secret`` for s3fs). fsspec caches one instance per set of options. For
            ``s3://`` URIs they are laid over ``dareflow.io.s3.storage_options_for(uri)``
            (the standard ``AWS_*`` variables), so every caller reaches the same store.

    Returns:
        ``(fs, path)``: local paths and ``file://`` URIs give a ``LocalFileSystem`` and
        an absolute path.

    Raises:
        ValueError: ``uri`` is empty or not a string, or its protocol is unknown.
        ImportError: the protocol needs a package that is not installed (e.g. s3fs).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(
            f"expected a URI (a local path, file://..., s3://bucket/key), got {uri!r}"
        )
    if "://" not in uri and "::" not in uri:
        uri = os.path.expanduser(uri)
    if is_s3_uri(uri):
        # The AWS_* environment (endpoint, path-style addressing, region kept out of
        # client_kwargs) applies to every s3:// URI; explicit options override it.
        storage_options = {**storage_options_for(uri), **storage_options}
    try:
        return url_to_fs(uri, **storage_options)
    except ValueError as e:
        raise ValueError(
            f"cannot resolve {uri!r}: {e}; use a local path or a URL whose protocol "
            f"fsspec knows (file://, s3://, gs://, memory://, ...)"
        ) from e


def join(uri: str, *parts: str) -> str:
    """Append path components to a URI with ``/``, keeping its protocol.

    Args:
        uri: The base URI (a folder).
        *parts: Components; each may itself contain ``/``. Empty parts are skipped.

    Returns:
        The joined URI, e.g. ``join("s3://b/runs", "r1", "units/x.safetensors")`` is
        ``"s3://b/runs/r1/units/x.safetensors"``.

    Raises:
        ValueError: a part contains ``..`` (escaping the base is never intended here).
    """
    out = uri
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        if ".." in part.split("/"):
            raise ValueError(
                f"cannot join {part!r} to {uri!r}: '..' components are not allowed; "
                "pass a path inside the base URI"
            )
        out = (out if out.endswith("/") else out + "/") + part
    return out


def exists(uri: str, **storage_options: Any) -> bool:
    """Whether a file, folder or object prefix exists at ``uri``."""
    fs, path = get_fs(uri, **storage_options)
    return _call(fs, uri, "check whether it exists",
                 lambda: _refresh(fs, path) or bool(fs.exists(path)))


def isdir(uri: str, **storage_options: Any) -> bool:
    """Whether ``uri`` is a folder (a prefix with objects under it on object stores)."""
    fs, path = get_fs(uri, **storage_options)
    return _call(fs, uri, "check whether it is a folder",
                 lambda: _refresh(fs, path) or bool(fs.isdir(path)))


def info(uri: str, **storage_options: Any) -> dict[str, Any]:
    """fsspec's description of a file: at least ``size`` (bytes) and ``type``.

    Local files add ``mtime``; s3 objects add ``ETag`` and ``LastModified``.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
    """
    fs, path = get_fs(uri, **storage_options)
    return _call(fs, uri, "get information on",
                 lambda: _refresh(fs, path) or dict(fs.info(path)))


def size(uri: str, **storage_options: Any) -> int:
    """Size of the file at ``uri`` in bytes.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
    """
    return int(info(uri, **storage_options)["size"])


def listdir(uri: str, **storage_options: Any) -> list[str]:
    """Names (not URIs) of the entries directly inside a folder, sorted.

    Temporary siblings of writes in progress (``*.tmp-<uuid>``) are listed too; see
    ``is_temporary``.

    Raises:
        FileNotFoundError: the folder does not exist.
        NotADirectoryError: ``uri`` is a file.
    """
    fs, path = get_fs(uri, **storage_options)
    entries = _call(fs, uri, "list", lambda: _refresh(fs, path) or fs.ls(path, detail=True))
    own = path.rstrip("/")
    names: set[str] = set()
    for entry in entries:
        name = entry["name"].rstrip("/")
        if name == own:
            # A file lists as itself; an object store may list a folder marker.
            if entry.get("type") == "file":
                raise NotADirectoryError(
                    f"cannot list {uri!r}: it is a file, not a folder; pass its parent"
                )
            continue
        base = posixpath.basename(name)
        if base:
            names.add(base)
    return sorted(names)


def is_temporary(name: str) -> bool:
    """Whether a file name is the temporary sibling of an unfinished atomic write."""
    return TMP_MARKER in posixpath.basename(name)


def read_bytes(
    uri: str, start: int | None = None, end: int | None = None, **storage_options: Any
) -> bytes:
    """Read a file, or the byte range ``[start, end)`` of it.

    A range past the end of the file returns fewer bytes (callers that need an exact
    length check it). On object stores a range is one ranged GET.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
        ValueError: a negative offset or ``end < start``.
    """
    _check_range(uri, start, end)
    fs, path = get_fs(uri, **storage_options)
    return _call(fs, uri, "read", lambda: fs.cat_file(path, start=start, end=end))


def read_ranges(uri: str, ranges: Sequence[tuple[int, int]], **storage_options: Any) -> list[bytes]:
    """Read several byte ranges ``[start, end)`` of one file.

    Local files are opened once; on object stores the ranges are fetched with
    fsspec's ``cat_ranges`` (concurrent ranged GETs on s3fs). A range past the end of
    the file returns fewer bytes, as :func:`read_bytes`.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
        ValueError: a negative offset or ``end < start``.
    """
    for start, end in ranges:
        _check_range(uri, start, end)
    fs, path = get_fs(uri, **storage_options)
    if not ranges:
        return []
    if _is_local(fs):
        with _storage_errors(uri, "read"), open(path, "rb") as f:
            out = []
            for start, end in ranges:
                f.seek(start)
                out.append(f.read(end - start))
            return out
    wanted = [r for r in ranges if r[1] > r[0]]  # an empty Range header means "all"
    got = iter(_call(fs, uri, "read", lambda: fs.cat_ranges(
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
    _check_range(uri, start, None)
    view = memoryview(buffer).cast("B")
    fs, path = get_fs(uri, **storage_options)
    with _storage_errors(uri, "read"):
        if _is_local(fs):
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
    data = _call(fs, uri, "read", lambda: fs.cat_file(path, start=start, end=start + len(view)))
    view[: len(data)] = data
    return len(data)


def open_read(uri: str, **storage_options: Any) -> IO[bytes]:
    """Open a file for binary reading (use as a context manager).

    Only opening is translated into URI-naming errors; errors while reading come from
    the filesystem as they are.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
    """
    fs, path = get_fs(uri, **storage_options)
    with _storage_errors(uri, "open for reading"):
        if _is_local(fs):
            return open(path, "rb")
        return fs.open(path, "rb")


@contextlib.contextmanager
def open_write_atomic(uri: str, **storage_options: Any) -> Iterator[IO[bytes]]:
    """Open a binary file for writing that appears at ``uri`` only when complete.

    Parent folders are created. If the ``with`` body raises, nothing is published and
    the temporary data is removed; an existing file at ``uri`` stays as it was.

    Example:
        >>> with open_write_atomic("s3://bucket/runs/r1/units/layer_000.safetensors") as f:
        ...     f.write(header)
        ...     f.write(data)

    Yields:
        A writable binary file object.

    Raises:
        FileNotFoundError, PermissionError, OSError: the store refused the write (the
        message names ``uri``).
    """
    fs, path = get_fs(uri, **storage_options)
    if _is_local(fs):
        with _local_atomic(uri, path) as f:
            yield f
    elif _is_object_store(fs):
        with _object_store_atomic(uri, fs, path) as f:
            yield f
    else:
        with _rename_atomic(uri, fs, path) as f:
            yield f


@contextlib.contextmanager
def _local_atomic(uri: str, path: str) -> Iterator[IO[bytes]]:
    parent = os.path.dirname(path) or "."
    tmp = _tmp_sibling(path)
    with _storage_errors(uri, "write"):
        os.makedirs(parent, exist_ok=True)
        f = open(tmp, "wb")  # noqa: SIM115 - closed below, before the rename
    try:
        yield f
        with _storage_errors(uri, "write"):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException as e:
        # close() flushes, and fails again on a full disk: the temporary file must go
        # whatever happens, or every failed write leaks one.
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            with _storage_errors(uri, "write"):
                raise  # the body's own write hit the full disk: name the URI
        raise


@contextlib.contextmanager
def _object_store_atomic(
    uri: str, fs: fsspec.AbstractFileSystem, path: str
) -> Iterator[IO[bytes]]:
    # Spool locally, then one put: the object never exists in a partial state.
    spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed before the put
        prefix="dareflow-upload-", delete=False
    )
    try:
        yield spool
        spool.flush()
        spool.close()
        _call(fs, uri, "write", lambda: fs.put_file(spool.name, path))
    finally:
        spool.close()
        with contextlib.suppress(OSError):
            os.remove(spool.name)


@contextlib.contextmanager
def _rename_atomic(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    tmp = _tmp_sibling(path)
    with _storage_errors(uri, "write"):
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        f = fs.open(tmp, "wb")
    try:
        yield f
        with _storage_errors(uri, "write"):
            f.close()
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_bytes_atomic(uri: str, data: bytes, **storage_options: Any) -> None:
    """Write ``data`` to ``uri`` atomically (see ``open_write_atomic``).

    On object stores this is a single put of the complete object.

    Raises:
        FileNotFoundError, PermissionError, OSError: the store refused the write.
    """
    fs, path = get_fs(uri, **storage_options)
    if _is_object_store(fs):
        _call(fs, uri, "write", lambda: fs.pipe_file(path, bytes(data)))
        return
    with open_write_atomic(uri, **storage_options) as f:
        f.write(data)


#: Alignment of buffers, file offsets and lengths for ``O_DIRECT`` writes: the page
#: size, a multiple of every common disk's logical block size.
DIRECT_ALIGN = 4096


def aligned_buffer(nbytes: int) -> memoryview:
    """A writable, zeroed, page-aligned anonymous buffer of ``nbytes`` bytes, as
    :func:`write_buffer_atomic` wants (its pages are released when the view is freed)."""
    return memoryview(mmap.mmap(-1, max(nbytes, 1)))[:nbytes]


def write_buffer_atomic(uri: str, buffer: memoryview, size: int, *,
                        midway: Callable[[], None] | None = None,
                        **storage_options: Any) -> str:
    """Write ``buffer[:size]`` to ``uri`` atomically, bypassing the page cache locally.

    Local files are written with ``O_DIRECT`` where the filesystem allows it: the data
    goes from ``buffer`` to the disk without first being copied into fresh page-cache
    memory, which on the benchmark VM costs ~10x the disk write itself (every newly
    cached page is memory the guest must take back from the host). The file is
    written in whole ``DIRECT_ALIGN`` blocks and then truncated to ``size``, fsynced,
    and renamed into place like every other write (see the module docstring).
    Where ``O_DIRECT`` is refused (tmpfs, some network filesystems, other systems)
    or ``buffer`` is not aligned, the usual buffered write is used; other stores get
    ``buffer[:size]`` through :func:`open_write_atomic`. The bytes are the same.

    Args:
        uri: Destination.
        buffer: The file's bytes from offset 0; for the direct path its address is
            ``DIRECT_ALIGN``-aligned and it extends to ``size`` rounded up to
            ``DIRECT_ALIGN`` (:func:`aligned_buffer` gives such buffers). Bytes past
            ``size`` are written to the temporary file and truncated away.
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
    fs, path = get_fs(uri, **storage_options)
    if _is_local(fs) and _direct_write(uri, path, buffer, size, midway):
        return "direct"
    half = size // 2
    with open_write_atomic(uri, **storage_options) as f:
        f.write(buffer[:half])
        if midway is not None:
            midway()
        f.write(buffer[half:size])
    return "buffered"


def _direct_write(uri: str, path: str, buffer: memoryview, size: int,
                  midway: Callable[[], None] | None) -> bool:
    """The ``O_DIRECT`` path of :func:`write_buffer_atomic`; False: not possible here."""
    flag = getattr(os, "O_DIRECT", 0)
    padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    if not flag or size == 0 or len(buffer) < padded or not buffer.contiguous \
            or _address(buffer) % DIRECT_ALIGN:
        return False
    parent = os.path.dirname(path) or "."
    tmp = _tmp_sibling(path)
    with _storage_errors(uri, "write"):
        os.makedirs(parent, exist_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:  # the filesystem has no direct IO (e.g. tmpfs)
            return False
        with _storage_errors(uri, "write"):
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
        with _storage_errors(uri, "write"):
            raise
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if not published:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    _fsync_dir(parent)
    return True


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


def _address(buffer: memoryview) -> int:
    """The memory address of ``buffer``'s first byte."""
    import ctypes

    if buffer.readonly or len(buffer) == 0:
        return 1  # never aligned for our purpose: use the buffered path
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def remove(uri: str, *, missing_ok: bool = False, **storage_options: Any) -> None:
    """Delete one file (never a folder).

    Raises:
        FileNotFoundError: nothing exists at ``uri`` and ``missing_ok`` is false.
        IsADirectoryError: ``uri`` is a folder.
    """
    fs, path = get_fs(uri, **storage_options)
    with _storage_errors(uri, "remove"):
        _refresh(fs, path)
        if missing_ok and not fs.exists(path):
            return
        if fs.isdir(path):
            raise IsADirectoryError(path)
        fs.rm_file(path)


def sha256_of(uri: str, **storage_options: Any) -> str:
    """SHA-256 of a file's content, streamed in 8 MiB chunks.

    Returns:
        The lowercase hex digest.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
    """
    digest = hashlib.sha256()
    with open_read(uri, **storage_options) as f, _storage_errors(uri, "read"):
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def copy_file(src_uri: str, dst_uri: str, **storage_options: Any) -> None:
    """Copy one file, possibly between stores (s3 to local, local to s3, ...).

    The copy is atomic at ``dst_uri``. Within one object store it is a server-side copy
    (itself atomic); otherwise the bytes are streamed through this process.

    Args:
        src_uri: The file to copy.
        dst_uri: Its destination (parents created; an existing file is replaced).
        **storage_options: Options used for both URIs. For stores that need different
            options, configure them through fsspec's configuration instead.

    Raises:
        FileNotFoundError: ``src_uri`` does not exist.
    """
    src_fs, src_path = get_fs(src_uri, **storage_options)
    dst_fs, dst_path = get_fs(dst_uri, **storage_options)
    if src_fs is dst_fs and _is_object_store(src_fs):
        with _storage_errors(src_uri, f"copy to {dst_uri!r}"):
            src_fs.copy(src_path, dst_path)
        return
    with (
        open_read(src_uri, **storage_options) as src,
        open_write_atomic(dst_uri, **storage_options) as dst,
        _storage_errors(src_uri, f"copy to {dst_uri!r}"),
    ):
        shutil.copyfileobj(src, dst, _CHUNK)


def create_exclusive(uri: str, data: bytes, **storage_options: Any) -> bool:
    """Create ``uri`` holding ``data`` only if nothing exists there yet (a lock primitive).

    - Local files: the data is written to a temporary sibling, then ``os.link``-ed onto
      the name, which fails if the name exists: exclusive, and a reader never sees the
      file empty or partial.
    - s3: one PUT with ``If-None-Match: *`` (s3fs ``mode="create"``). AWS S3 and moto
      refuse it when the key exists; a server that ignores the header (nanio 0.1.7) lets
      the last writer win, so callers that need exclusivity read the object back.
    - Other filesystems: an existence check, then a write (not atomic).

    Returns:
        True when this call created the file, False when something was already there.

    Raises:
        PermissionError, OSError: the store refused the write (the message names ``uri``).
    """
    fs, path = get_fs(uri, **storage_options)
    if _is_local(fs):
        parent = os.path.dirname(path) or "."
        tmp = _tmp_sibling(path)
        with _storage_errors(uri, "create"):
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
        _fsync_dir(parent)
        return True
    if "s3" in _protocols(fs) or "s3a" in _protocols(fs):
        with _storage_errors(uri, "create"):
            try:
                fs.pipe_file(path, bytes(data), mode="create")
            except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
                return False
        return True
    with _storage_errors(uri, "create"):
        _refresh(fs, path)
        if fs.exists(path):
            return False
    write_bytes_atomic(uri, data, **storage_options)
    return True
