"""Copy a pinned source's files into the store: one reader per source kind, verified
streaming copies, and the opt-in pickle-to-safetensors conversion.

:func:`reader_for` opens a :class:`~dareflow.sources.resolve.ResolvedSource` for reading (a
local folder directly, S3 through :mod:`dareflow.io.storage`, the Hub through
``hf_hub_download`` pinned to the resolved commit). :func:`copy_all` streams each selected file
into the store, checks its size (and, for the Hub, its hash) against the listing, and converts
the selection's pickle weights with ``torch.load(weights_only=True)`` into safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import IO, Any

from typing_extensions import Self

from dareflow.errors import TransientError
from dareflow.io import storage
from dareflow.io.s3 import storage_options_for
from dareflow.sources.files import open_local_file
from dareflow.sources.resolve import (
    PICKLE_INDEX,
    SAFETENSORS_INDEX,
    FileEntry,
    ResolvedSource,
    Selection,
    hub_error,
)
from dareflow.sources.spec import Source
from dareflow.sources.store import Store, json_bytes

__all__ = ["copy_all", "reader_for"]

logger = logging.getLogger(__name__)

_CHUNK = 8 << 20


# -- readers: one per source kind ----------------------------------------------------------------


class _Reader:
    """Opens the source's files for streaming; ``local_path`` for the pickle conversion."""

    def __init__(self, resolved: ResolvedSource):
        self.resolved = resolved
        self._tmp: str | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def tmpdir(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="dareflow-dl-")
        return self._tmp

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def local_path(self, name: str) -> str:
        """A local file with the content of ``name`` (downloaded if needed)."""
        dest = os.path.join(self.tmpdir(), "local", name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with self.open(name) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        return dest

    def release(self, name: str) -> None:
        """Forget a file fetched to local disk (frees space during large mirrors)."""


class _LocalReader(_Reader):
    def open(self, name: str) -> IO[bytes]:
        # checked on the open file: a link out of the folder or a FIFO put there after
        # the listing is refused, never read (dareflow.sources.files)
        return open_local_file(self.resolved.id, name)

    def local_path(self, name: str) -> str:
        return os.path.join(self.resolved.id, name)


class _S3Reader(_Reader):
    def __init__(self, resolved: ResolvedSource, options: dict | None):
        super().__init__(resolved)
        self.options = storage_options_for(resolved.id) if options is None else dict(options)

    def open(self, name: str) -> IO[bytes]:
        return storage.open_read(storage.join(self.resolved.id, name), **self.options)


class _HubReader(_Reader):
    """Downloads each file with ``hf_hub_download`` (HEAD + GET, retries and resume) into a temp
    folder, pinned to the resolved commit."""

    def __init__(self, resolved: ResolvedSource, token: str | None, endpoint: str):
        super().__init__(resolved)
        self.token = token
        self.endpoint = endpoint
        self._paths: dict[str, str] = {}

    def local_path(self, name: str) -> str:
        if name not in self._paths:
            # huggingface_hub costs ~1 s to import: only when a Hub source is mirrored.
            from huggingface_hub import hf_hub_download

            tmp = self.tmpdir()
            try:
                self._paths[name] = hf_hub_download(
                    self.resolved.id, name, revision=self.resolved.revision,
                    endpoint=self.endpoint, token=self.token,
                    local_dir=os.path.join(tmp, "files"), cache_dir=os.path.join(tmp, "cache"),
                    tqdm_class=_quiet_tqdm(),
                )
            except Exception as exc:  # noqa: BLE001 - translated to built-in exceptions
                src = Source("hub", self.resolved.id, self.resolved.revision)
                raise hub_error(exc, src, self.endpoint) from None
        return self._paths[name]

    def open(self, name: str) -> IO[bytes]:
        return open(self.local_path(name), "rb")

    def release(self, name: str) -> None:
        path = self._paths.pop(name, None)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _quiet_tqdm() -> type:
    from huggingface_hub.utils import tqdm  # only for Hub downloads (import cost)

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def reader_for(resolved: ResolvedSource, *, token: str | None, endpoint: str,
               options: dict | None) -> _Reader:
    """A reader of ``resolved``'s files; use it as a context manager (it removes its temp
    folder on exit)."""
    if resolved.kind == "hub":
        return _HubReader(resolved, token, endpoint)
    if resolved.kind == "s3":
        return _S3Reader(resolved, options)
    return _LocalReader(resolved)


# -- copying -------------------------------------------------------------------------------------


def copy_all(
    reader: _Reader, selection: Selection, store: Store, dest: str
) -> tuple[list[dict], dict[str, dict]]:
    """Copy ``selection`` from ``reader`` into the store folder ``dest``, converting its pickles.

    Returns:
        The marker's file records (``{"name", "size", "sha256"}``, sorted by name) and
        ``{target: {"from", "sha256"}}`` for each file converted from pickle.

    Raises:
        FileNotFoundError: the index names shards the source does not have.
        TransientError: a file changed or was corrupted in transit (nothing is published).
    """
    files = list(selection.files)
    # Small files first: the index tells which shards are really used (e.g. a repo that also
    # ships a consolidated.safetensors duplicate of the sharded weights).
    files.sort(key=lambda f: (f.name.endswith(".safetensors"), f.name))
    records: list[dict] = []
    index_shards: set[str] | None = None
    for entry in files:
        if entry.name.endswith(".safetensors") and index_shards is not None \
                and entry.name not in index_shards:
            logger.info("%s: skipping %s (not in %s)", reader.resolved.where, entry.name,
                        SAFETENSORS_INDEX)
            continue
        data_sha = _copy_one(reader, entry, store, storage.join(dest, entry.name))
        records.append({"name": entry.name, "size": entry.size, "sha256": data_sha})
        if entry.name == SAFETENSORS_INDEX:
            index_shards = _index_shards(store, storage.join(dest, entry.name))
    if index_shards is not None:
        lost = sorted(index_shards - {r["name"] for r in records})
        if lost:
            raise FileNotFoundError(
                f"{reader.resolved.where}: {SAFETENSORS_INDEX} names shards that are not in the "
                f"source: {', '.join(lost)}"
            )
    converted: dict[str, dict] = {}
    if selection.pickles:
        records, converted = _convert_pickles(reader, selection, store, dest, records)
    return sorted(records, key=lambda r: r["name"]), converted


def _index_shards(store: Store, uri: str) -> set[str]:
    index = json.loads(store.read(uri) or b"{}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{uri}: index has no weight_map; the checkpoint index is malformed")
    return set(weight_map.values())


def _copy_one(reader: _Reader, entry: FileEntry, store: Store, uri: str) -> str:
    """Stream one file into the store; verify size (and hash where the source gives one)."""
    sha256 = hashlib.sha256()
    # Non-LFS Hub files are identified by their git blob sha1; LFS ones by their sha256.
    git = None
    if reader.resolved.kind == "hub" and not re.fullmatch(r"[0-9a-f]{64}", entry.etag):
        git = hashlib.sha1(f"blob {entry.size}\0".encode())
    size = 0
    with reader.open(entry.name) as src, store.open_write(uri) as out:
        while chunk := src.read(_CHUNK):
            sha256.update(chunk)
            if git is not None:
                git.update(chunk)
            out.write(chunk)
            size += len(chunk)
        # Raised inside the atomic writer: nothing is published.
        _verify(reader.resolved, entry, size, (git or sha256).hexdigest())
    reader.release(entry.name)
    return sha256.hexdigest()


def _verify(resolved: ResolvedSource, entry: FileEntry, size: int, digest: str) -> None:
    problem = None
    if size != entry.size:
        problem = f"size {size} != listed {entry.size}"
    elif resolved.kind == "hub" and entry.etag and digest != entry.etag:
        problem = f"hash {digest} != the Hub's {entry.etag}"
    if problem:
        raise TransientError(f"{resolved.where}: {entry.name} changed or was corrupted in transit "
                      f"({problem}); run again")


def _pickle_target(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def _convert_pickles(
    reader: _Reader, selection: Selection, store: Store, dest: str, records: list[dict]
) -> tuple[list[dict], dict[str, dict]]:
    """Opt-in path: pickle weights → safetensors with ``torch.load(weights_only=True)``."""
    # torch costs seconds to import: only for the opt-in pickle conversion.
    import torch
    from safetensors.torch import save_file

    converted: dict[str, dict] = {}
    rename = {p.name: _pickle_target(p.name) for p in selection.pickles}
    for entry in selection.pickles:
        path = reader.local_path(entry.name)
        source_sha = _sha256_file(path)
        # weights_only=True: only tensors and plain containers are unpickled, never code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ValueError(
                f"{reader.resolved.where}: {entry.name} is not a flat state dict of tensors; "
                "convert it with transformers' save_pretrained(..., safe_serialization=True)"
            )
        # Tied weights share storage, which safetensors refuses: store independent copies.
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        target = rename[entry.name]
        out_local = os.path.join(reader.tmpdir(), "converted", target)
        os.makedirs(os.path.dirname(out_local), exist_ok=True)
        save_file(tensors, out_local, metadata={"format": "pt"})
        del state, tensors
        h = hashlib.sha256()
        with open(out_local, "rb") as src, store.open_write(storage.join(dest, target)) as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        records.append({"name": target, "size": os.path.getsize(out_local),
                        "sha256": h.hexdigest()})
        converted[target] = {"from": entry.name, "sha256": source_sha}
        os.unlink(out_local)
        reader.release(entry.name)
    # pytorch_model.bin.index.json → model.safetensors.index.json with renamed shards.
    index = next((r for r in records if r["name"] == PICKLE_INDEX), None)
    if index is not None:
        data = json.loads(store.read(storage.join(dest, PICKLE_INDEX)) or b"{}")
        data["weight_map"] = {k: rename.get(v, v) for k, v in data.get("weight_map", {}).items()}
        blob = json_bytes(data)
        store.write(storage.join(dest, SAFETENSORS_INDEX), blob)
        store.remove(storage.join(dest, PICKLE_INDEX))
        records = [r for r in records if r["name"] != PICKLE_INDEX]
        records.append({"name": SAFETENSORS_INDEX, "size": len(blob),
                        "sha256": hashlib.sha256(blob).hexdigest()})
        converted[SAFETENSORS_INDEX] = {"from": PICKLE_INDEX, "sha256": index["sha256"]}
    return records, converted


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
