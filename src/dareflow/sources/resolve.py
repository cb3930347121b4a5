"""Pin a source to a revision, list its files, and choose the ones to mirror.

:func:`resolve` pins a :class:`~dareflow.sources.spec.Source` to a revision (a Hub commit sha, a
hash of S3 ETags, a hash of local file stats) and lists its files; Hub errors come back as
built-in exceptions whose message says what to do (:func:`hub_error`). :func:`select_files`
picks the files a merge needs.

What is mirrored (:data:`ALLOW_PATTERNS`): top-level ``*.safetensors`` (restricted to the shards
``model.safetensors.index.json`` names when there is an index), the index, ``config.json``,
``generation_config.json``, tokenizer files and the sentence-transformers files
(:data:`SENTENCE_TRANSFORMERS_FILES`, the only files mirrored from sub-folders). Other files in
sub-folders (e.g. a Llama repo's ``original/consolidated.00.pth``), READMEs and pickle weights are
never mirrored from a source that has safetensors. A source with only pickle weights is refused
unless the caller opts in with ``allow_pickle=True`` (recipe key ``allow_pickle: true``); then the
weights are loaded with ``torch.load(weights_only=True)`` and written as safetensors.

The Hub token (``HF_TOKEN``, :func:`hub_token`) is sent to the Hub only; it is never logged or
written.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dareflow.io import storage
from dareflow.io.s3 import explain_s3_error, storage_options_for
from dareflow.sources.files import MAX_MODEL_FILE_BYTES, local_file_problem, unsafe_file_error
from dareflow.sources.spec import COMMIT_SHA, Source, SourceKind, parse_source

__all__ = [
    "ALLOW_PATTERNS",
    "PICKLE_INDEX",
    "PICKLE_PATTERNS",
    "SAFETENSORS_INDEX",
    "SENTENCE_TRANSFORMERS_FILES",
    "FileEntry",
    "ResolvedSource",
    "Selection",
    "hub_endpoint",
    "hub_error",
    "hub_token",
    "matches",
    "resolve",
    "select_files",
]

#: sentence-transformers files: the module list, its configs, the pooling config and the
#: normalisation module's folder. A pattern with a folder matches files directly inside it
#: (see :func:`matches`); the model card (README.md) is never taken.
SENTENCE_TRANSFORMERS_FILES: tuple[str, ...] = (
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "2_Normalize/*",
)
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
    *SENTENCE_TRANSFORMERS_FILES,
)
PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.ckpt")
PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Pickles that trainers leave next to the weights: never weights, never converted.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*.pth",
                "scaler.pt", "optimizer*.bin")
DEFAULT_ENDPOINT = "https://huggingface.co"

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
            folders their top level and the sub-folders :data:`ALLOW_PATTERNS` names); only
            top-level files and the sentence-transformers sub-folder files are ever selected.
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


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a file path (``/``-separated, relative to the model folder) matches one of the
    fnmatch ``patterns`` component by component: ``*.safetensors`` matches top-level files
    only and ``2_Normalize/*`` the files directly inside that folder (``*`` never crosses a
    ``/``)."""
    parts = name.split("/")
    return any(
        len(split := p.split("/")) == len(parts)
        and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, split))
        for p in patterns
    )


def _relevant(name: str) -> bool:
    return (
        matches(name, ALLOW_PATTERNS) or matches(name, PICKLE_PATTERNS) or name == PICKLE_INDEX
    )


def _local_files(root: Path) -> list[Path]:
    """A local folder's top-level files, then the files of the sub-folders that
    :data:`ALLOW_PATTERNS` names: regular files inside the folder, or links to them
    (``dareflow.sources.files``); never folders.

    Raises:
        ValueError: a file a merge would read (:func:`_relevant`) is a link out of the
            folder (``vocab.txt -> /etc/passwd``), or a FIFO, device or socket. Other odd
            entries (a README linked elsewhere) are left out.
    """
    entries = sorted(root.iterdir())
    for folder in sorted({p.split("/")[0] for p in ALLOW_PATTERNS if "/" in p}):
        if (root / folder).is_dir():
            entries += sorted((root / folder).iterdir())
    found = []
    for p in entries:
        name = p.relative_to(root).as_posix()
        if p.is_dir():
            continue
        problem = local_file_problem(root, name)
        if problem is None:
            found.append(p)
        elif _relevant(name):
            raise unsafe_file_error(root, name, problem)
    return found


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
    for p in _local_files(root):
        st = p.stat()
        files.append(FileEntry(p.relative_to(root).as_posix(), st.st_size,
                               f"{st.st_size}-{st.st_mtime_ns}"))
    # Size + mtime_ns, not a content hash: hashing a 14 GB folder on every run would cost more
    # than the merge cache saves. An in-place rewrite that keeps size and mtime goes unnoticed.
    rows = [(f.name, f.etag) for f in files if _relevant(f.name)]
    return ResolvedSource("local", src.id, _stat_revision("local", rows),
                          tuple(sorted(files, key=lambda f: f.name)), None, src.spec)


def hub_error(exc: BaseException, src: Source, endpoint: str) -> Exception:
    """The built-in exception for a huggingface_hub error about ``src``: FileNotFoundError,
    PermissionError, ConnectionError or OSError, with a message that says what to do."""
    # huggingface_hub costs ~0.5-1 s to import: only when a Hub source is used.
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
    try:  # optional: only huggingface_hub versions that use httpx2 install it
        import httpx2
    except ImportError:  # older huggingface_hub uses requests/httpx
        return "Connect" in type(exc).__name__ or "Timeout" in type(exc).__name__
    return isinstance(exc, httpx2.ConnectError | httpx2.TimeoutException | httpx2.NetworkError)


def _resolve_hub(src: Source, token: str | None, endpoint: str) -> ResolvedSource:
    from huggingface_hub import HfApi  # ~1 s to import: only when a Hub source is used

    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(src.id, revision=src.revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - translated to built-in exceptions
        raise hub_error(exc, src, endpoint) from None
    if not info.sha or not COMMIT_SHA.match(info.sha):
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
    """Apply the allow-patterns (top-level files and the sentence-transformers sub-folder
    files, see :func:`matches`) and the pickle policy.

    Raises:
        ValueError: only pickle weights and ``allow_pickle`` is False (the message says why
            and how to convert), or a selected file other than weights is larger than
            ``MAX_MODEL_FILE_BYTES``.
        FileNotFoundError: no weights at all.
    """
    top = [f for f in resolved.files if "/" not in f.name]
    allowed = [f for f in resolved.files if matches(f.name, ALLOW_PATTERNS)]
    large = [f for f in allowed if not f.name.endswith(".safetensors")
             and f.size > MAX_MODEL_FILE_BYTES]
    if large:
        raise ValueError(
            f"{resolved.where}: {', '.join(f'{f.name} ({f.size} bytes)' for f in large)} "
            f"larger than the {MAX_MODEL_FILE_BYTES} bytes dareflow reads from a config, "
            "tokenizer or sentence-transformers file; is it the right file? Remove it if "
            "the model does not need it")
    if any(f.name.endswith(".safetensors") for f in allowed):
        return Selection(tuple(allowed))
    pickles = [f for f in top if matches(f.name, PICKLE_PATTERNS)
               and not matches(f.name, _NOT_WEIGHTS)]
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
