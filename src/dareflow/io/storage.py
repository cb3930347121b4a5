"""Storage: the one module that talks to fsspec.

Every byte dareflow reads or writes goes through here, addressed by a URI: a plain
local path, ``file://...``, ``s3://bucket/key`` (through s3fs) or any other fsspec
protocol. The rest of the code passes URIs and calls these functions, so a worker on
another machine reads inputs and writes outputs in the shared store without shipping
tensors between processes.

Writes are atomic: a reader (or a resumed run) sees either the previous object or the
complete new one, never a partial one.

- Local files (``dareflow.io.localdisk``): write a temporary sibling
  ``<name>.tmp-<uuid>``, fsync it, then ``os.replace`` it onto the final name (atomic on
  POSIX) and fsync the folder.
- Object stores (s3, gcs, azure; ``dareflow.io.objectstore``): one put of the complete
  object, spooled to a local temporary file first (``$TMPDIR``).
- Other fsspec filesystems (memory, sftp, ...): temporary sibling then ``fs.mv``.

Tensor data moves between the store and memory buffers through ``dareflow.io.buffers``.

Storage errors become built-in exceptions (``FileNotFoundError``, ``PermissionError``,
``OSError``) whose message names the URI, what failed and what to check; transient
errors of remote stores are retried with backoff (both in ``dareflow.io.retry``).

Credentials and endpoints: pass fsspec storage options as keyword arguments
(``endpoint_url=..., key=..., secret=...``) or configure them once for the process
through fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL`` and friends, or
``fsspec.config.conf["s3"]``) and the standard ``AWS_*`` variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from dareflow.io import localdisk, objectstore, retry
from dareflow.io.retry import storage_errors
from dareflow.io.s3 import is_s3_uri, storage_options_for

_CHUNK = 8 * 1024 * 1024

# --------------------------------------------------------------------------- helpers


def _call(fs: fsspec.AbstractFileSystem, uri: str, action: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` with storage errors named after ``uri``; transient remote errors are
    retried with exponential backoff (see ``dareflow.io.retry.retry_policy``)."""
    if localdisk.is_local(fs):
        with storage_errors(uri, action):
            return fn()
    return retry.call(uri, action, fn)


def _refresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    # s3fs caches listings; another worker may have written since, so ask again.
    if not localdisk.is_local(fs):
        fs.invalidate_cache(path)


def check_range(uri: str, start: int | None, end: int | None) -> None:
    """Check a byte range ``[start, end)`` of ``uri`` (``None``: from the start, to the
    end) before reading it.

    Raises:
        ValueError: a negative or non-integer offset, or ``end < start``.
    """
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
    return localdisk.TMP_MARKER in posixpath.basename(name)


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
    check_range(uri, start, end)
    fs, path = get_fs(uri, **storage_options)
    return _call(fs, uri, "read", lambda: fs.cat_file(path, start=start, end=end))


def open_read(uri: str, **storage_options: Any) -> IO[bytes]:
    """Open a file for binary reading (use as a context manager).

    Only opening is translated into URI-naming errors; errors while reading come from
    the filesystem as they are.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
    """
    fs, path = get_fs(uri, **storage_options)
    with storage_errors(uri, "open for reading"):
        if localdisk.is_local(fs):
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
    if localdisk.is_local(fs):
        with localdisk.atomic_file(uri, path) as f:
            yield f
    elif objectstore.is_object_store(fs):
        with objectstore.atomic_upload(uri, fs, path) as f:
            yield f
    else:
        with _rename_atomic(uri, fs, path) as f:
            yield f


@contextlib.contextmanager
def _rename_atomic(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    tmp = localdisk.tmp_sibling(path)
    with storage_errors(uri, "write"):
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        f = fs.open(tmp, "wb")
    try:
        yield f
        with storage_errors(uri, "write"):
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
    if objectstore.is_object_store(fs):
        _call(fs, uri, "write", lambda: fs.pipe_file(path, bytes(data)))
        return
    with open_write_atomic(uri, **storage_options) as f:
        f.write(data)


def remove(uri: str, *, missing_ok: bool = False, **storage_options: Any) -> None:
    """Delete one file (never a folder).

    Raises:
        FileNotFoundError: nothing exists at ``uri`` and ``missing_ok`` is false.
        IsADirectoryError: ``uri`` is a folder.
    """
    fs, path = get_fs(uri, **storage_options)
    with storage_errors(uri, "remove"):
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
    with open_read(uri, **storage_options) as f, storage_errors(uri, "read"):
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
    if src_fs is dst_fs and objectstore.is_object_store(src_fs):
        with storage_errors(src_uri, f"copy to {dst_uri!r}"):
            src_fs.copy(src_path, dst_path)
        return
    with (
        open_read(src_uri, **storage_options) as src,
        open_write_atomic(dst_uri, **storage_options) as dst,
        storage_errors(src_uri, f"copy to {dst_uri!r}"),
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
    if localdisk.is_local(fs):
        return localdisk.create_exclusive(uri, path, data)
    if objectstore.is_s3(fs):
        return objectstore.create_exclusive(uri, fs, path, data)
    with storage_errors(uri, "create"):
        _refresh(fs, path)
        if fs.exists(path):
            return False
    write_bytes_atomic(uri, data, **storage_options)
    return True
