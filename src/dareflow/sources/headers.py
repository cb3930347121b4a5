"""A source's metadata before anything is mirrored: ``config.json``, the safetensors index and
each weight file's header, read where the source lives.

:func:`read_source_headers` pins a model of a recipe as :func:`dareflow.sources.mirror_source`
would, in the same order (a sha already mirrored, the offline fallback, the pinned revision, a
local folder read in place, a complete mirror), and opens a header-only
:class:`~dareflow.io.checkpoints.Checkpoint`:

- Hub: :func:`hub_checkpoint` sends plain GETs for ``config.json`` and the index and two ranged
  GETs per weight file (its 8-byte header length, then the header), pinned to the commit sha;
  ``HF_TOKEN`` goes to the Hub endpoint only (httpx drops it on a redirect to another origin,
  such as the Hub's CDN). A server that ignores ``Range`` is read only up to the header's last
  byte, then the connection is dropped: no weight byte is ever fetched.
- s3 and local: ``Checkpoint.open`` on the source, which reads the headers by byte range
  through :mod:`dareflow.io.storage` (ranged GETs on s3).
- already mirrored (or offline with a mirror): the mirror in the store.

It also says what the mirror would download: the bytes of the selected files (only the shards
the index names) unless the store already holds a complete mirror of that revision.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from dareflow.io import storage
from dareflow.io.checkpoints import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, Checkpoint
from dareflow.io.headers import MAX_HEADER_BYTES, ShardFile, TensorInfo, corrupt, parse_header
from dareflow.io.s3 import storage_options_for

# The mirror's own lookups, so that pre-flight and mirror agree on what the store holds.
from dareflow.sources.mirror import MirrorResult, check_marker, pin_source
from dareflow.sources.resolve import (
    FileEntry,
    ResolvedSource,
    Selection,
    hub_endpoint,
    hub_error,
    hub_token,
    select_files,
)
from dareflow.sources.spec import Source, parse_source
from dareflow.sources.store import Store

__all__ = ["SourceHeaders", "hub_checkpoint", "hub_root", "read_source_headers"]

#: Retries of one ranged GET on the Hub (429/5xx/network); the Hub was reachable a moment
#: before (the revision was just pinned), so a few are enough.
HUB_RETRIES = 3


@dataclass(frozen=True)
class SourceHeaders:
    """One model of a recipe as pre-flight sees it.

    Attributes:
        role: ``"base"`` or ``"fine-tuned"``.
        model: The recipe's ``model`` string.
        source: The pinned source.
        checkpoint: Its tensors and config, from headers only; None when its weights are
            pickles (converted only when mirrored, so not readable by range).
        read_from: Where the headers were read: ``"hub"``, ``"s3"``, ``"local"``
            (the source itself) or ``"store"`` (its complete mirror).
        files: The files the mirror copies (``{"name", "size"}``).
        download_bytes: Bytes the mirror would still download (0 when mirrored or in place).
        in_place: A local source the merge reads where it is (nothing copied).
        note: Why the checkpoint could not be opened, when it is None.
    """

    role: str
    model: str
    source: ResolvedSource
    checkpoint: Checkpoint | None
    read_from: str
    files: tuple[dict[str, Any], ...]
    download_bytes: int
    in_place: bool = False
    note: str = ""

    @property
    def size_bytes(self) -> int:
        """Bytes of the files the merge reads or mirrors."""
        return sum(int(f["size"]) for f in self.files)


def read_source_headers(
    spec: dict[str, Any],
    store_uri: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    source_options: dict | None = None,
    store_options: dict | None = None,
) -> SourceHeaders:
    """Pin one model and open its headers where it lives (or where it is mirrored).

    Args:
        spec: One item of :func:`dareflow.sources.source_specs` (``role``, ``model``,
            ``allow_pickle``).
        store_uri: The artifact store root.
        token: Hub token; default ``HF_TOKEN``. Sent only to the Hub endpoint.
        endpoint: Hub endpoint; default ``HF_ENDPOINT`` or https://huggingface.co.
        source_options, store_options: fsspec options for s3 URIs (default: the AWS
            environment variables).

    Returns:
        A :class:`SourceHeaders`; no weight byte has been read.

    Raises:
        FileNotFoundError, PermissionError, ConnectionError, OSError: the source cannot be
            pinned or read (see :func:`dareflow.sources.resolve`).
        ValueError: a pickle-only source without ``allow_pickle``; a corrupt header or index.
    """
    src = parse_source(spec["model"])
    token, endpoint = hub_token(token), hub_endpoint(endpoint)
    store = Store(store_uri, store_options)
    folder = store.join("sources", src.safe_id)

    def mirrored(hit: MirrorResult) -> SourceHeaders:
        return SourceHeaders(
            spec["role"], spec["model"], hit.source, Checkpoint.open(hit.uri, **store.options),
            "store", tuple({"name": f["name"], "size": f["size"]} for f in hit.files), 0)

    pinned = pin_source(src, store, token=token, endpoint=endpoint,
                        source_options=source_options)
    if isinstance(pinned, MirrorResult):
        return mirrored(pinned)
    resolved = pinned
    selection = select_files(resolved, allow_pickle=bool(spec.get("allow_pickle")))
    if src.kind == "local" and store.local and not selection.pickles:
        checkpoint = Checkpoint.open(src.id)
        return SourceHeaders(spec["role"], spec["model"], resolved, checkpoint, "local",
                             _entries(_mirrored_files(selection, checkpoint)), 0, in_place=True)
    hit = check_marker(store, storage.join(folder, resolved.revision), resolved)
    if hit is not None:
        return mirrored(hit)
    if selection.pickles:
        files = _entries(selection.files + selection.pickles)
        return SourceHeaders(
            spec["role"], spec["model"], resolved, None, src.kind, files,
            sum(f["size"] for f in files),
            note="pickle weights (allow_pickle) are converted to safetensors when mirrored, "
                 "so their tensors are checked after mirroring, not before")
    if src.kind == "hub":
        checkpoint = hub_checkpoint(resolved, token=token, endpoint=endpoint)
    else:
        options = storage_options_for(src.id) if source_options is None else source_options
        checkpoint = Checkpoint.open(src.id, **(options if src.kind == "s3" else {}))
    files = _entries(_mirrored_files(selection, checkpoint))
    return SourceHeaders(spec["role"], spec["model"], resolved, checkpoint, src.kind, files,
                         sum(f["size"] for f in files))


def _entries(files: tuple[FileEntry, ...] | list[FileEntry]) -> tuple[dict[str, Any], ...]:
    return tuple({"name": f.name, "size": f.size} for f in files)


def _mirrored_files(selection: Selection, checkpoint: Checkpoint) -> list[FileEntry]:
    """The selection as ``copy_all`` copies it: with an index, only the shards it names."""
    if not any(f.name == INDEX_NAME for f in selection.files):
        return list(selection.files)
    used = {uri.rsplit("/", 1)[-1] for uri in checkpoint.files}
    return [f for f in selection.files if not f.name.endswith(".safetensors") or f.name in used]


# -- the Hub: ranged GETs --------------------------------------------------------------------


class _HubFiles:
    """GETs of one pinned Hub repo's files: whole small files, or a byte range."""

    def __init__(self, resolved: ResolvedSource, token: str | None, endpoint: str):
        # huggingface_hub costs ~1 s to import: only when a Hub source is read.
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        self.resolved = resolved
        self.endpoint = endpoint
        self._url = lambda name: hf_hub_url(resolved.id, name, revision=resolved.revision,
                                            endpoint=endpoint)
        # Only ever sent to URLs of this endpoint (httpx drops it on cross-origin redirects).
        self._headers = build_hf_headers(token=token)

    def read(self, name: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``name`` (``end`` None: the whole file).

        At most ``end`` bytes are received even when the server ignores ``Range`` (then
        the response is read up to ``end`` and the connection dropped).
        """
        from huggingface_hub import constants
        from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

        headers = dict(self._headers)
        if end is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        src = Source("hub", self.resolved.id, self.resolved.revision)
        data = bytearray()
        try:
            with http_stream_backoff("GET", self._url(name), headers=headers,
                                     max_retries=HUB_RETRIES,
                                     timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                hf_raise_for_status(response)
                # 206: the range itself; 200: the server sent the whole file from byte 0.
                skip = start if response.status_code == 200 else 0
                got = response.headers.get("Content-Range", "")
                if end is not None and response.status_code == 206 \
                        and not got.startswith(f"bytes {start}-"):
                    raise OSError(f"asked {self._url(name)} for bytes {start}-{end - 1} "
                                  f"but the Hub sent {got!r}")
                want = None if end is None else skip + end - start
                for chunk in response.iter_bytes():
                    data += chunk
                    if want is not None and len(data) >= want:
                        break
        except Exception as exc:  # noqa: BLE001 - translated to built-in exceptions
            raise hub_error(exc, src, self.endpoint) from None
        return bytes(data[skip:want])

    def header(self, entry: FileEntry) -> tuple[dict[str, TensorInfo], ShardFile, str]:
        """Parse one safetensors file's header from two ranged GETs."""
        name, size = entry.name, entry.size
        uri = f"{hub_root(self.resolved)}/{name}"
        if size < 8:
            raise corrupt(uri, f"it has {size} bytes, fewer than the 8-byte header length")
        (n,) = struct.unpack("<Q", self.read(name, 0, 8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise corrupt(uri, f"its header length is {n} bytes but the file has {size} "
                               "bytes (truncated, or not a safetensors file)")
        header = self.read(name, 8, 8 + n)
        if len(header) != n:
            raise corrupt(uri, f"read {len(header)} of the {n} header bytes (truncated)")
        tensors, metadata = parse_header(uri, header, size)
        # The Hub's sha256 (LFS) or git blob id: what ShardFile.version is for.
        return tensors, ShardFile(uri, size, f"etag={entry.etag}", metadata), uri


def hub_root(resolved: ResolvedSource) -> str:
    """The URI a Hub checkpoint's files are named by (``hf://org/name@sha``)."""
    return f"hf://{resolved.id}@{resolved.revision}"


def hub_checkpoint(resolved: ResolvedSource, *, token: str | None = None,
                   endpoint: str | None = None) -> Checkpoint:
    """Open a pinned Hub repo as a header-only :class:`Checkpoint`, without downloading weights.

    Reads ``config.json`` and ``model.safetensors.index.json`` whole (plain GETs) and each
    weight file's header with two ranged GETs: bytes 0-7 (the header length ``n``), then
    bytes 8 to ``8 + n - 1``. Files are named ``hf://org/name@sha/<file>``; the checkpoint
    is for checking and planning, not for reading tensors.

    Args:
        resolved: A Hub source pinned to its commit sha (:func:`dareflow.sources.resolve`).
        token: Hub token (default ``HF_TOKEN``); sent to ``endpoint`` only.
        endpoint: Hub endpoint (default ``HF_ENDPOINT`` or https://huggingface.co).

    Raises:
        FileNotFoundError: no ``model.safetensors`` nor index, or the index names a shard
            the repo does not have.
        ValueError: a corrupt header, or an index that disagrees with the headers.
        PermissionError, ConnectionError, OSError: Hub errors (see ``hub_error``).
    """
    hub = _HubFiles(resolved, hub_token(token), hub_endpoint(endpoint))
    entries = {f.name: f for f in resolved.files if "/" not in f.name}
    root = hub_root(resolved)
    config = _json(hub.read(CONFIG_NAME), f"{root}/{CONFIG_NAME}") if CONFIG_NAME in entries \
        else None
    weight_map: dict[str, str] | None = None
    if INDEX_NAME in entries:
        weight_map = _weight_map(_json(hub.read(INDEX_NAME), f"{root}/{INDEX_NAME}"),
                                 f"{root}/{INDEX_NAME}")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in entries]
        if missing:
            raise FileNotFoundError(
                f"index {root}/{INDEX_NAME} names shard(s) missing from the repo: "
                f"{', '.join(missing)}; the repo is incomplete at revision {resolved.revision}"
            )
    elif WEIGHTS_NAME in entries:
        shards = [WEIGHTS_NAME]
    else:
        found = ", ".join(n for n in sorted(entries) if n.endswith(".safetensors")) or "none"
        raise FileNotFoundError(
            f"Hub repo {resolved.id}@{resolved.revision[:12]} has no {WEIGHTS_NAME} or "
            f"{INDEX_NAME} (safetensors files: {found}); point at a repo written by "
            "save_pretrained"
        )
    tensors: dict[str, TensorInfo] = {}
    files: dict[str, ShardFile] = {}
    for shard in shards:
        shard_tensors, shard_file, uri = hub.header(entries[shard])
        files[uri] = shard_file
        for name, info in shard_tensors.items():
            if name in tensors:
                raise ValueError(
                    f"tensor {name!r} is stored twice in {root}: in {tensors[name].file!r} "
                    f"and {uri!r}; the checkpoint is inconsistent"
                )
            tensors[name] = info
    for name, shard in sorted((weight_map or {}).items()):
        if name not in tensors or tensors[name].file != f"{root}/{shard}":
            raise ValueError(
                f"index {root}/{INDEX_NAME} maps tensor {name!r} to {shard!r} but that "
                "shard's header does not contain it; the index and shards come from "
                "different saves"
            )
    return Checkpoint(root, tensors, config, files)


def _json(raw: bytes, uri: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{uri!r} is not valid JSON ({e}); the repo's file is broken") from None


def _weight_map(index: Any, uri: str) -> dict[str, str]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise ValueError(f"index {uri!r} has no weight_map of tensor name -> shard file")
    return weight_map
