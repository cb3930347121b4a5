"""Models in an object store, copied to this machine for lm-eval (which reads local folders)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path

from dareflow.io import storage
from dareflow.settings import cache_dir


def is_remote(uri: str) -> bool:
    """True for ``s3://...`` and other non-file URIs."""
    return "://" in uri and not uri.startswith("file://")


def local_models(models: Mapping[str, str], cache: Path | None = None) -> dict[str, str]:
    """``models`` with each remote folder replaced by a fresh local copy under ``cache``
    (default ``{DAREFLOW_CACHE}/eval-models``); local folders are kept as they are.

    The copy is made again on every call (a store's model folder, e.g. a nightly merge, is
    replaced in place); the results cache keys on content, so a copy of an unchanged model
    still hits it.

    Raises:
        FileNotFoundError: a remote folder holds no files.
    """
    cache = cache or cache_dir() / "eval-models"
    out = {}
    for label, uri in models.items():
        if not is_remote(uri):
            out[label] = uri
            continue
        local = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
        shutil.rmtree(local, ignore_errors=True)
        fs, root = storage.get_fs(uri)
        files = fs.find(root)
        if not files:
            raise FileNotFoundError(f"model '{label}' at {uri!r} holds no files: "
                                    "check the URI and the store's credentials")
        scheme = uri.split("://", 1)[0]
        for path in files:
            storage.copy_file(f"{scheme}://{path}", str(local / path[len(root):].lstrip("/")))
        out[label] = str(local)
    return out
