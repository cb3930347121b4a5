"""The artifact store as the mirror writes it: :class:`Store` (a root URI plus the fsspec
options every call needs) and :func:`json_bytes` (the one JSON encoding of what the mirror
writes: markers, refs, converted indexes).

All IO goes through :mod:`dareflow.io.storage`; every write is atomic (temp file + rename
locally, one complete PUT on S3).
"""

from __future__ import annotations

import contextlib
import json
from typing import IO, Any

from fsspec.implementations.local import LocalFileSystem

from dareflow.io import storage
from dareflow.io.s3 import storage_options_for

__all__ = ["Store", "json_bytes"]


class Store:
    """The store root plus the fsspec options every call needs."""

    def __init__(self, uri: str, options: dict | None):
        self.uri = uri
        self.options = storage_options_for(uri) if options is None else dict(options)
        fs, _ = storage.get_fs(uri, **self.options)
        self.local = isinstance(fs, LocalFileSystem)

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def read(self, uri: str) -> bytes | None:
        """The bytes at ``uri``, or None if there is no such file."""
        try:
            return storage.read_bytes(uri, **self.options)
        except FileNotFoundError:
            return None

    def size(self, uri: str) -> int | None:
        try:
            return storage.size(uri, **self.options)
        except FileNotFoundError:
            return None

    def write(self, uri: str, data: bytes) -> None:
        storage.write_bytes_atomic(uri, data, **self.options)

    def open_write(self, uri: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return storage.open_write_atomic(uri, **self.options)

    def remove(self, uri: str) -> None:
        storage.remove(uri, missing_ok=True, **self.options)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented, key-sorted JSON with a final newline (same object, same bytes)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
