"""Object-store specifics of ``dareflow.io.storage``: s3, gcs, azure and friends.

An object store never shows a partial object for a single put (a multipart upload
becomes visible only when it completes), so an atomic write is one put of the complete
object and needs no temporary key (:func:`atomic_upload`). Streams are spooled to a
local temporary file first (``tempfile.gettempdir()``, i.e. ``$TMPDIR``) because an
fsspec file that is closed after an error would publish what was written so far. On s3
an exclusive create is one conditional put (:func:`create_exclusive`).

Remote calls are retried and their errors named after the URI by ``dareflow.io.retry``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

import fsspec

from dareflow.io import retry
from dareflow.io.retry import storage_errors

#: Protocols of object stores, where one put is atomic and renames are copies.
OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
)


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names of ``fs`` (fsspec gives one string or a tuple)."""
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is an object store (see ``OBJECT_STORE_PROTOCOLS``)."""
    return any(p in OBJECT_STORE_PROTOCOLS for p in protocols(fs))


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is s3fs (``s3://`` or ``s3a://``)."""
    return "s3" in protocols(fs) or "s3a" in protocols(fs)


@contextlib.contextmanager
def atomic_upload(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """A local spool file whose content becomes the object ``path`` (of ``uri``) in one
    put when the ``with`` body completes; nothing is uploaded if it raises."""
    # Spool locally, then one put: the object never exists in a partial state.
    spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed before the put
        prefix="dareflow-upload-", delete=False
    )
    try:
        yield spool
        spool.flush()
        spool.close()
        retry.call(uri, "write", lambda: fs.put_file(spool.name, path))
    finally:
        spool.close()
        with contextlib.suppress(OSError):
            os.remove(spool.name)


def create_exclusive(uri: str, fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create the s3 object ``path`` (of ``uri``) holding ``data`` unless it exists.

    One PUT with ``If-None-Match: *`` (s3fs ``mode="create"``). AWS S3 and moto refuse it
    when the key exists; a server that ignores the header (nanio 0.1.7) lets the last
    writer win, so callers that need exclusivity read the object back.

    Returns:
        True when this call created the object, False when one was already there.
    """
    with storage_errors(uri, "create"):
        try:
            fs.pipe_file(path, bytes(data), mode="create")
        except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
            return False
    return True
