"""Model fingerprints for the results cache: what a model would be evaluated on, hashed.

A model's *revision* is a fingerprint of what it would be evaluated on: the sha256 of every
weight file (safetensors headers alone are the same for a base and its fine-tunes: same names,
shapes, offsets), ``config.json``, ``generation_config.json`` and the tokenizer files.

Hashing a 7B model reads 14 GB, so each file's sha256 is cached on this machine
(``$DAREFLOW_CACHE/file-sha256/``) under the file's identity and state: path, size,
modification and change times (ns), inode and device. Any write to a file, even one that keeps
its size, changes its mtime and ctime, so an edited shard is hashed again; an unchanged one is
not. A dareflow-merged folder's ``manifest.json`` is never trusted alone (a shard edited in
place keeps its size); when its sha256s match the content, the fingerprint says so (``kind``
``manifest``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from dareflow.io import storage
from dareflow.settings import cache_dir

_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "chat_template.jinja")


def local_model_dir(uri: str) -> Path:
    """The resolved local folder of a Hugging Face model (``file://`` accepted).

    Raises:
        FileNotFoundError: no ``config.json`` there.
    """
    path = Path(uri.removeprefix("file://")).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {uri!r} is not a local Hugging Face folder ({path.resolve()}/config.json "
            "not found): pass the folder with config.json, *.safetensors and the tokenizer"
        )
    return path.resolve()


#: Seconds after a file's last modification during which its hash is not cached: a write
#: within the file system's timestamp granularity of the hashing could leave mtime unchanged
#: (git's "racily clean" entries).
RACY_SECONDS = 2.0
HASH_CACHE = "file-sha256"


def _stat_key(path: Path) -> tuple[str, os.stat_result]:
    st = path.stat()
    ident = [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
             st.st_dev]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest(), st


def file_sha256(path: str | os.PathLike, cache: Path | None = None) -> str:
    """sha256 of a local file's content, cached by its (path, size, mtime, ctime, inode).

    Args:
        path: a local file.
        cache: the cache folder (default ``$DAREFLOW_CACHE/file-sha256``).
    """
    path = Path(path)
    cache = cache if cache is not None else cache_dir() / HASH_CACHE
    key, st = _stat_key(path)
    entry = cache / key[:2] / key
    with contextlib.suppress(OSError):
        value = entry.read_text("ascii").strip()
        if len(value) == 64:
            return value
    started = time.time_ns()
    value = storage.sha256_of(str(path))
    # a file written while or just before it was hashed may change without a new mtime
    if started - st.st_mtime_ns > RACY_SECONDS * 1e9 and _stat_key(path)[0] == key:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(value, "ascii")
        os.replace(tmp, entry)
    return value


def model_fingerprint(model_uri: str) -> dict[str, Any]:
    """What identifies a model for the results cache.

    Args:
        model_uri: a local HF model folder (``file://`` accepted).

    Returns:
        ``{"model_dir", "revision", "kind"}``: ``revision`` is ``"sha256:<64 hex>"`` over the
        weight files' sha256s (see :func:`file_sha256`) and the config and tokenizer files;
        ``kind`` is ``manifest`` for a dareflow-merged folder whose manifest matches its
        shards, else ``content``. A merged folder's revision is the same either way.

    Raises:
        FileNotFoundError: not a local model folder, or one without weights.
    """
    folder = local_model_dir(model_uri)
    weights = sorted(p for p in folder.iterdir()
                     if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    if not weights:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors (or *.bin) weights")
    parts = {p.name: file_sha256(p) for p in weights}
    kind = "content"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            shards = json.loads(manifest_path.read_text("utf-8"))["shards"]
            if {n: s["sha256"] for n, s in shards.items()} == {
                    n: h for n, h in parts.items() if n.endswith(".safetensors")}:
                kind = "manifest"
    for name in _MODEL_FILES:
        if (folder / name).is_file():
            parts[name] = storage.sha256_of(str(folder / name))
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {"model_dir": str(folder), "revision": f"sha256:{digest}", "kind": kind}
