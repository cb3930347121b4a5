"""Resolve model sources and mirror them into the artifact store, once per revision.

A source is a Hugging Face Hub repo id, an ``s3://`` prefix or a local folder
(:func:`parse_source`). :func:`resolve` pins it to a revision (a Hub commit sha, a hash of S3
ETags, a hash of local file stats) and lists its files. :func:`mirror` copies the files a merge
needs into ``{store_uri}/sources/{safe_id}/{revision}/`` and commits a ``_COMPLETE.json`` marker
last; a later call that finds a valid marker downloads nothing.

What is mirrored (:data:`ALLOW_PATTERNS`, top-level files only): ``*.safetensors`` (restricted
to the shards ``model.safetensors.index.json`` names when there is an index), the index,
``config.json``, ``generation_config.json`` and tokenizer files. Files in sub-folders (e.g. a
Llama repo's ``original/consolidated.00.pth``), READMEs and pickle weights are never mirrored
from a source that has safetensors. A source with only pickle weights is refused unless the
caller opts in with ``allow_pickle=True`` (recipe key ``allow_pickle: true``); then the
weights are loaded with ``torch.load(weights_only=True)`` and written as safetensors.

Store layout (docs/CONTRACT.md)::

    {store}/sources/{safe_id}/{revision}/<files>, _COMPLETE.json   one folder per revision
    {store}/sources/{safe_id}/refs/{branch}.json                   last sha seen (offline)

A local source with a local store is read in place (no copy) unless ``copy_local=True``.
The Hub token (``HF_TOKEN``) is sent to the Hub only; it is never logged or written.

No Prefect here: the flow's task wraps :func:`mirror_source`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import quote, urlsplit

from fsspec.implementations.local import LocalFileSystem
from typing_extensions import Self

from dareflow.errors import TransientError
from dareflow.io import storage
from dareflow.io.s3 import explain_s3_error, redact, storage_options_for

__all__ = [
    "ALLOW_PATTERNS",
    "MARKER",
    "PICKLE_PATTERNS",
    "FileEntry",
    "MirrorResult",
    "ResolvedSource",
    "Selection",
    "Source",
    "hub_endpoint",
    "hub_token",
    "mirror",
    "mirror_source",
    "parse_source",
    "resolve",
    "select_files",
]

logger = logging.getLogger(__name__)

ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    # tokenizer files (transformers >= 4.43 may keep the chat template in its own file)
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.ckpt")
PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Pickles that trainers leave next to the weights: never weights, never converted.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*.pth",
                "scaler.pt", "optimizer*.bin")
MARKER = "_COMPLETE.json"
MARKER_FORMAT = 1
DEFAULT_ENDPOINT = "https://huggingface.co"
_CHUNK = 8 << 20

SourceKind = Literal["hub", "s3", "local"]

# Hub repo ids: "org/name"; letters, digits, "-", "_", "."; no "--" or ".."; <= 96 chars.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

PICKLE_REFUSED = (
    "{where} has only pickle weights ({names}) and no *.safetensors. Pickle checkpoints can run "
    "arbitrary code when loaded, so dareflow refuses them. Convert once to safetensors: "
    "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)` "
    "with transformers (or the Hub's safetensors convert Space, "
    "https://huggingface.co/spaces/safetensors/convert) and point the recipe at the result. "
    "If you trust this source, opt in with `allow_pickle: true` on the model entry "
    "(mirror(..., allow_pickle=True)): the weights are then loaded with "
    "torch.load(weights_only=True) and stored as safetensors."
)


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A parsed source spec.

    Attributes:
        kind: ``hub``, ``s3`` or ``local``.
        id: ``org/name`` (hub), ``s3://bucket/prefix`` without trailing slash (s3), or an
            absolute local path (local).
        revision: the requested Hub revision (branch, tag or sha); None means ``main``.
            Always None for s3 and local.
        spec: the string the user wrote.
    """

    kind: SourceKind
    id: str
    revision: str | None = None
    spec: str = ""

    @property
    def safe_id(self) -> str:
        """A path-safe, human-readable, collision-free name for the store layout."""
        if self.kind == "hub":
            base = "hf--" + self.id.replace("/", "--")
        elif self.kind == "s3":
            base = "s3--" + self.id[len("s3://"):].replace("/", "--")
        else:
            # The folder name alone could collide; the hash of the full path cannot.
            digest = hashlib.sha256(self.id.encode()).hexdigest()[:12]
            base = f"local--{Path(self.id).name}--{digest}"
        base = re.sub(r"[^A-Za-z0-9._-]", "_", base)
        if len(base) > 120:
            base = base[:100] + "--" + hashlib.sha256(base.encode()).hexdigest()[:16]
        return base


def parse_source(spec: str) -> Source:
    """Parse a model source spec.

    Rules, in order:

    1. ``s3://bucket/prefix`` (or ``s3a://``) → S3 prefix.
    2. ``hf://org/name[@revision]`` → Hub, always (forces the Hub when a local folder of the same
       name exists).
    3. ``file://...``, or a path starting with ``/``, ``./``, ``../`` or ``~`` → local folder.
    4. A relative path that is an existing folder → local (an existing folder wins over the Hub).
    5. ``org/name`` or ``org/name@revision`` (Hub id syntax) → Hub.
    6. Anything else → ``ValueError`` naming the accepted forms.

    Raises:
        ValueError: unsupported scheme, malformed repo id or revision, or a bare name that is
            neither a local folder nor ``org/name``.
        FileNotFoundError: an explicit local path that does not exist or is not a folder.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model source must be a non-empty string, got {spec!r}")
    s = spec.strip()
    scheme = urlsplit(s).scheme.lower() if "://" in s else ""
    if scheme in ("s3", "s3a"):
        rest = s.split("://", 1)[1].strip("/")
        if not rest or rest.startswith("/"):
            raise ValueError(f"S3 source {spec!r} has no bucket; write s3://bucket/prefix")
        return Source("s3", "s3://" + rest, None, spec)
    if scheme == "hf":
        return _parse_hub(s.split("://", 1)[1], spec)
    if scheme == "file":
        return _local(urlsplit(s).path, spec, explicit=True)
    if scheme:
        raise ValueError(
            f"unsupported model source scheme {scheme!r} in {spec!r}; use a Hub id (org/name or "
            "org/name@revision), s3://bucket/prefix, or a local folder (./path, /path, file://)"
        )
    if s.startswith(("/", "./", "../", "~")) or s in (".", ".."):
        return _local(s, spec, explicit=True)
    if Path(s).is_dir():
        return _local(s, spec, explicit=False)
    if _REPO_ID.match(s.split("@", 1)[0]):
        return _parse_hub(s, spec)
    if Path(s).exists():
        raise FileNotFoundError(f"model source {spec!r} is a file; point at the model folder")
    raise ValueError(
        f"model source {spec!r} is neither an existing local folder nor a Hub repo id; write "
        f"./{s} for a folder relative to {os.getcwd()}, org/name[@revision] for the Hub, or "
        "s3://bucket/prefix"
    )


def _parse_hub(text: str, spec: str) -> Source:
    repo_id, _, revision = text.partition("@")
    repo_id = repo_id.strip("/")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or len(repo_id) > 96:
        raise ValueError(
            f"invalid Hub repo id {repo_id!r} in {spec!r}: expected org/name with letters, "
            "digits, '-', '_', '.' (no '--' or '..', at most 96 characters)"
        )
    if "@" in text and not revision:
        raise ValueError(f"empty revision after '@' in {spec!r}; write org/name@<branch|tag|sha>")
    return Source("hub", repo_id, revision or None, spec)


def _local(path: str, spec: str, explicit: bool) -> Source:
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(
            f"local model folder {spec!r} does not exist (resolved to {p}); check the path "
            "(relative paths are resolved against the working directory)"
        )
    if not p.is_dir():
        raise FileNotFoundError(f"local model source {spec!r} is a file; point at the folder")
    return Source("local", str(p), None, spec)


# ------------------------------------------------------------------------------------------------
# resolve
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a source: ``etag`` is the Hub's sha256 (LFS) or git blob id, the S3 ETag, or
    ``{size}-{mtime_ns}`` for local files."""

    name: str
    size: int
    etag: str


@dataclass(frozen=True)
class ResolvedSource:
    """A source pinned to one revision.

    Attributes:
        kind, id: as in :class:`Source`.
        revision: Hub commit sha (40 hex); ``s3-<hex>`` = hash of the sorted (name, size,
            ETag) of the relevant files; ``local-<hex>`` = hash of their (name, size, mtime_ns).
        files: the source's files, sorted by name (Hub and S3 list sub-folders too, local
            folders only their top level); only top-level files are ever selected.
        requested_revision: what the spec asked for (Hub only).
    """

    kind: SourceKind
    id: str
    revision: str
    files: tuple[FileEntry, ...]
    requested_revision: str | None = None
    spec: str = ""

    @property
    def safe_id(self) -> str:
        return Source(self.kind, self.id).safe_id

    @property
    def where(self) -> str:
        if self.kind == "hub":
            return f"Hub repo {self.id}@{self.revision[:12]}"
        return f"{self.kind} source {self.id}"


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint: the argument, else ``HF_ENDPOINT`` read now (huggingface_hub reads it
    only at import), else https://huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token(token: str | None = None) -> str | None:
    """The Hub token: the argument, else ``HF_TOKEN`` (or the legacy
    ``HUGGING_FACE_HUB_TOKEN``). None lets huggingface_hub use a token saved by ``hf auth login``."""
    return token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _relevant(name: str) -> bool:
    return "/" not in name and (
        _matches(name, ALLOW_PATTERNS) or _matches(name, PICKLE_PATTERNS) or name == PICKLE_INDEX
    )


def _stat_revision(prefix: str, rows: Iterable[tuple]) -> str:
    payload = json.dumps(sorted(rows), separators=(",", ":"))
    return f"{prefix}-{hashlib.sha256(payload.encode()).hexdigest()[:40]}"


def resolve(
    source: Source | str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    storage_options: dict | None = None,
) -> ResolvedSource:
    """Pin ``source`` to a revision and list its top-level files.

    Args:
        source: a :class:`Source` or a spec for :func:`parse_source`.
        token: Hub token (default :func:`hub_token`); sent as ``Authorization: Bearer``.
        endpoint: Hub endpoint (default :func:`hub_endpoint`).
        storage_options: fsspec options for an s3 source (default from the AWS environment).

    Raises:
        FileNotFoundError: repo, revision, prefix or folder not found, or no files.
        PermissionError: S3 access denied.
        ConnectionError: the Hub or S3 endpoint cannot be reached.
    """
    src = parse_source(source) if isinstance(source, str) else source
    if src.kind == "hub":
        return _resolve_hub(src, hub_token(token), hub_endpoint(endpoint))
    if src.kind == "s3":
        opts = storage_options_for(src.id) if storage_options is None else storage_options
        fs, root = storage.get_fs(src.id, **opts)
        try:
            fs.invalidate_cache(root)
            # ETags need the detailed listing, which dareflow.io.storage does not expose.
            found = fs.find(root, detail=True, withdirs=False)
        except Exception as exc:  # noqa: BLE001 - botocore's many types, translated
            raise explain_s3_error(exc, src.id) from None
        files = []
        for path, info in found.items():
            name = path[len(root):].lstrip("/")
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
            files.append(FileEntry(name, int(info["size"]), etag))
        if not files:
            raise FileNotFoundError(f"S3 source {src.id} has no objects; check the prefix")
        rows = [(f.name, f.size, f.etag) for f in files if _relevant(f.name)]
        return ResolvedSource("s3", src.id, _stat_revision("s3", rows),
                              tuple(sorted(files, key=lambda f: f.name)), None, src.spec)
    root = Path(src.id)
    files = []
    for p in sorted(root.iterdir()):
        if p.is_file():
            st = p.stat()
            files.append(FileEntry(p.name, st.st_size, f"{st.st_size}-{st.st_mtime_ns}"))
    # Size + mtime_ns, not a content hash: hashing a 14 GB folder on every run would cost more
    # than the merge cache saves. An in-place rewrite that keeps size and mtime goes unnoticed.
    rows = [(f.name, f.etag) for f in files if _relevant(f.name)]
    return ResolvedSource("local", src.id, _stat_revision("local", rows), tuple(files), None,
                          src.spec)


def _hub_error(exc: BaseException, src: Source, endpoint: str) -> Exception:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{src.id} on {endpoint}"
    if isinstance(exc, RevisionNotFoundError):
        return FileNotFoundError(
            f"revision {src.revision!r} not found in Hub repo {where}; use a branch, tag or "
            "commit sha that exists (org/name@revision)"
        )
    if isinstance(exc, GatedRepoError):
        return PermissionError(
            f"Hub repo {where} is gated: accept its terms on the Hub, then set HF_TOKEN to a "
            "token of that account"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return FileNotFoundError(
            f"Hub repo {where} not found, or private and HF_TOKEN is missing or has no access; "
            "check the id and set HF_TOKEN"
        )
    if isinstance(exc, RemoteEntryNotFoundError):
        return FileNotFoundError(f"a file listed by Hub repo {where} is missing: {exc}")
    if _is_connection_error(exc):
        return ConnectionError(
            f"cannot reach the Hub at {endpoint} for {src.id}: {type(exc).__name__}: {exc}. "
            "Check the network or HF_ENDPOINT; a repo mirrored before can be used offline with "
            "HF_HUB_OFFLINE=1"
        )
    if isinstance(exc, HfHubHTTPError):
        return OSError(f"Hub request for {where} failed: {exc}")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    try:
        import httpx2
    except ImportError:  # older huggingface_hub uses requests/httpx
        return "Connect" in type(exc).__name__ or "Timeout" in type(exc).__name__
    return isinstance(exc, httpx2.ConnectError | httpx2.TimeoutException | httpx2.NetworkError)


def _resolve_hub(src: Source, token: str | None, endpoint: str) -> ResolvedSource:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(src.id, revision=src.revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - translated to built-in exceptions
        raise _hub_error(exc, src, endpoint) from None
    if not info.sha or not _COMMIT.match(info.sha):
        raise OSError(f"Hub at {endpoint} returned no commit sha for {src.id}; is it a Hub?")
    files = []
    for s in info.siblings or []:
        etag = s.lfs.sha256 if s.lfs is not None else (s.blob_id or "")
        size = s.lfs.size if s.lfs is not None else s.size
        if size is None:
            raise OSError(f"Hub at {endpoint} gave no size for {src.id}/{s.rfilename}")
        files.append(FileEntry(s.rfilename, int(size), etag))
    return ResolvedSource("hub", src.id, info.sha, tuple(sorted(files, key=lambda f: f.name)),
                          src.revision or "main", src.spec)


# ------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which files to mirror: ``files`` as-is, ``pickles`` to convert (opt-in only)."""

    files: tuple[FileEntry, ...]
    pickles: tuple[FileEntry, ...] = ()


def select_files(resolved: ResolvedSource, allow_pickle: bool = False) -> Selection:
    """Apply the allow-patterns (top-level files only) and the pickle policy.

    Raises:
        ValueError: only pickle weights and ``allow_pickle`` is False (the message says why
            and how to convert).
        FileNotFoundError: no weights at all.
    """
    top = [f for f in resolved.files if "/" not in f.name]
    allowed = [f for f in top if _matches(f.name, ALLOW_PATTERNS)]
    if any(f.name.endswith(".safetensors") for f in allowed):
        return Selection(tuple(allowed))
    pickles = [f for f in top if _matches(f.name, PICKLE_PATTERNS)
               and not _matches(f.name, _NOT_WEIGHTS)]
    if pickles:
        if not allow_pickle:
            names = ", ".join(f.name for f in pickles[:5]) + (" ..." if len(pickles) > 5 else "")
            raise ValueError(PICKLE_REFUSED.format(where=resolved.where, names=names))
        index = [f for f in top if f.name == PICKLE_INDEX]
        return Selection(tuple(allowed + index), tuple(pickles))
    seen = ", ".join(f.name for f in resolved.files[:20]) or "(nothing)"
    raise FileNotFoundError(
        f"{resolved.where} has no model weights (*.safetensors); found: {seen}. Point at a "
        "folder with config.json and model*.safetensors"
    )


# ------------------------------------------------------------------------------------------------
# mirror
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MirrorResult:
    """Where a source lives in the store and what it holds.

    Attributes:
        uri: the folder to read the model from (a store folder, or the source folder itself for
            a local source used in place).
        source: the pinned source.
        files: ``{"name", "size", "sha256"}`` per mirrored file (from the marker; empty when
            used in place, where nothing was hashed).
        cached: True when a complete mirror was found and nothing was downloaded.
        in_place: True for a local source read where it is.
    """

    uri: str
    source: ResolvedSource
    files: tuple[dict, ...] = ()
    cached: bool = False
    in_place: bool = False


def mirror(
    source: Source | str,
    store_uri: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    allow_pickle: bool = False,
    copy_local: bool = False,
    source_options: dict | None = None,
    store_options: dict | None = None,
) -> str:
    """Mirror ``source`` into ``store_uri`` once and return the mirrored folder's URI.

    See :func:`mirror_source` for the arguments; this returns only ``.uri``.
    """
    return mirror_source(
        source, store_uri, token=token, endpoint=endpoint, allow_pickle=allow_pickle,
        copy_local=copy_local, source_options=source_options, store_options=store_options,
    ).uri


def mirror_source(
    source: Source | str,
    store_uri: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    allow_pickle: bool = False,
    copy_local: bool = False,
    source_options: dict | None = None,
    store_options: dict | None = None,
) -> MirrorResult:
    """Copy a source's allowed files to ``{store_uri}/sources/{safe_id}/{revision}/`` once.

    Steps: pin the revision (:func:`resolve`); if that folder has a ``_COMPLETE.json`` whose
    listed files all exist with the listed sizes, return it (nothing downloaded). Otherwise
    stream each selected file into the folder, each written atomically through
    :func:`dareflow.io.storage.open_write_atomic` (temp file + rename locally, one complete PUT on
    S3) after its size and hash are checked against the source, and write the marker (file
    list, sizes, sha256, pinned revision) last. Readers trust a folder only with its marker, so
    a killed mirror is redone, never used half-written; two concurrent mirrors of one revision
    write identical bytes and either marker is valid.

    A local source with a local store is used in place (nothing copied; ``in_place=True``)
    unless ``copy_local`` is set or pickle weights must be converted. With
    ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, a Hub source whose requested
    revision was mirrored before is served from the store (the sha is read from
    ``sources/{safe_id}/refs/{revision}.json``). A spec pinned to a 40-hex commit sha that is
    already mirrored makes no network request at all.

    Args:
        source: a spec (see :func:`parse_source`) or a :class:`Source`.
        store_uri: the store root (local path, ``file://`` or ``s3://``).
        token: Hub token; default ``HF_TOKEN``. Sent only to the Hub; never logged or written.
        endpoint: Hub endpoint; default ``HF_ENDPOINT`` or https://huggingface.co.
        allow_pickle: convert pickle-only checkpoints (trusted sources only).
        copy_local: mirror local sources even into a local store.
        source_options, store_options: fsspec options for s3 URIs (default: the AWS
            environment variables through :func:`dareflow.io.s3.storage_options_for`).

    Returns:
        A :class:`MirrorResult`.

    Raises:
        ValueError: pickle-only source without ``allow_pickle``; bad spec.
        FileNotFoundError, PermissionError, ConnectionError, OSError: see :func:`resolve` and
            :mod:`dareflow.io.storage` (messages name the URI or repo).
    """
    src = parse_source(source) if isinstance(source, str) else source
    token = hub_token(token)
    endpoint = hub_endpoint(endpoint)
    store = _Store(store_uri, store_options)
    base = store.join("sources", src.safe_id)

    # A commit sha already mirrored needs no network at all.
    if src.kind == "hub" and src.revision and _COMMIT.match(src.revision):
        hit = _check_marker(store, storage.join(base, src.revision))
        if hit is not None:
            return hit
    try:
        if src.kind == "hub" and _env_flag("HF_HUB_OFFLINE"):
            raise ConnectionError("HF_HUB_OFFLINE=1")
        resolved = resolve(src, token=token, endpoint=endpoint, storage_options=source_options)
    except ConnectionError as exc:
        hit = _offline_hit(store, base, src) if src.kind == "hub" else None
        if hit is None:
            raise
        logger.warning("%s: Hub not reachable (%s); using the mirror of %s", src.id, exc,
                       hit.source.revision)
        return hit
    selection = select_files(resolved, allow_pickle=allow_pickle)

    if src.kind == "local" and store.local and not copy_local and not selection.pickles:
        logger.info("%s: local source used in place (revision %s)", src.id, resolved.revision)
        return MirrorResult(src.id, resolved, in_place=True)

    dest = storage.join(base, resolved.revision)
    hit = _check_marker(store, dest, resolved)
    if hit is not None:
        _write_ref(store, base, resolved)
        return hit

    t0 = time.monotonic()
    with _reader_for(resolved, token=token, endpoint=endpoint, options=source_options) as reader:
        records, converted = _copy_all(reader, selection, store, dest)
    marker = {
        "format": MARKER_FORMAT,
        "source": {
            "kind": resolved.kind,
            "id": resolved.id,
            "revision": resolved.revision,
            "requested_revision": resolved.requested_revision,
            "spec": resolved.spec,
        },
        "files": records,
        "converted_from_pickle": converted,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write(storage.join(dest, MARKER), _json_bytes(redact(marker, [token or ""])))
    _write_ref(store, base, resolved)
    total = sum(r["size"] for r in records)
    logger.info("%s: mirrored %d files (%.1f MB) to %s in %.1f s", resolved.where, len(records),
                total / 1e6, dest, time.monotonic() - t0)
    return MirrorResult(dest, resolved, tuple(records), cached=False)


# -- store helpers (all IO through dareflow.io.storage) ------------------------------------------------


class _Store:
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


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _check_marker(
    store: _Store, dest: str, resolved: ResolvedSource | None = None
) -> MirrorResult | None:
    """The mirror at ``dest`` if its marker exists and every listed file has its listed size.

    Sizes, not hashes: re-hashing gigabytes on every run would defeat the cache; the sha256 in
    the marker is for manifests and for anyone who wants a full check.
    """
    marker_uri = storage.join(dest, MARKER)
    raw = store.read(marker_uri)
    if raw is None:
        return None
    try:
        marker = json.loads(raw)
        files = [{"name": str(r["name"]), "size": int(r["size"]), "sha256": str(r["sha256"])}
                 for r in marker["files"]]
        src = marker["source"]
        ok = marker.get("format") == MARKER_FORMAT
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        logger.warning("%s: unreadable or unknown marker; mirroring again", marker_uri)
        return None
    bad = [f["name"] for f in files if store.size(storage.join(dest, f["name"])) != f["size"]]
    if bad:
        logger.warning("%s: %d listed files missing or resized (%s); mirroring again",
                       dest, len(bad), ", ".join(bad[:5]))
        return None
    if resolved is None:
        resolved = ResolvedSource(src["kind"], src["id"], src["revision"], (),
                                  src.get("requested_revision"), src.get("spec", ""))
    return MirrorResult(dest, resolved, tuple(files), cached=True)


def _ref_uri(base: str, requested: str) -> str:
    return storage.join(base, "refs", quote(requested, safe="") + ".json")


def _write_ref(store: _Store, base: str, resolved: ResolvedSource) -> None:
    """Remember which commit a branch/tag pointed to (for offline runs)."""
    if resolved.kind != "hub" or not resolved.requested_revision:
        return
    store.write(_ref_uri(base, resolved.requested_revision),
                _json_bytes({"requested_revision": resolved.requested_revision,
                             "revision": resolved.revision}))


def _offline_hit(store: _Store, base: str, src: Source) -> MirrorResult | None:
    raw = store.read(_ref_uri(base, src.revision or "main"))
    if raw is None:
        return None
    try:
        revision = json.loads(raw)["revision"]
    except (ValueError, KeyError, TypeError):
        return None
    return _check_marker(store, storage.join(base, revision))


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
        return open(os.path.join(self.resolved.id, name), "rb")

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
                raise _hub_error(exc, src, self.endpoint) from None
        return self._paths[name]

    def open(self, name: str) -> IO[bytes]:
        return open(self.local_path(name), "rb")

    def release(self, name: str) -> None:
        path = self._paths.pop(name, None)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _quiet_tqdm() -> type:
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _reader_for(resolved: ResolvedSource, *, token: str | None, endpoint: str,
                options: dict | None) -> _Reader:
    if resolved.kind == "hub":
        return _HubReader(resolved, token, endpoint)
    if resolved.kind == "s3":
        return _S3Reader(resolved, options)
    return _LocalReader(resolved)


# -- copying ---------------------------------------------------------------------------------------


def _copy_all(
    reader: _Reader, selection: Selection, store: _Store, dest: str
) -> tuple[list[dict], dict[str, dict]]:
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


def _index_shards(store: _Store, uri: str) -> set[str]:
    index = json.loads(store.read(uri) or b"{}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{uri}: index has no weight_map; the checkpoint index is malformed")
    return set(weight_map.values())


def _copy_one(reader: _Reader, entry: FileEntry, store: _Store, uri: str) -> str:
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
    reader: _Reader, selection: Selection, store: _Store, dest: str, records: list[dict]
) -> tuple[list[dict], dict[str, dict]]:
    """Opt-in path: pickle weights → safetensors with ``torch.load(weights_only=True)``."""
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
        blob = _json_bytes(data)
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
