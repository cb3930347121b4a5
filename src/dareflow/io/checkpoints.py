"""Checkpoint IO: safetensors read lazily, by byte range, through ``dareflow.io.storage``.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the end of the header) and the tensor bytes. dareflow parses the
header itself, so opening a checkpoint reads only its headers, on any fsspec store, and
``Checkpoint.read`` fetches exactly one tensor's bytes (one ranged GET on s3). A worker
therefore never loads a whole model: peak memory is the tensors of one layer unit.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling can run
arbitrary code and they cannot be read by byte range.

Tied embeddings: when a config says ``tie_word_embeddings: true`` and the checkpoint
stores no ``lm_head.weight``, the output head *is* the input embedding matrix.
``Checkpoint.aliases`` maps ``lm_head.weight`` to that stored tensor, so ``read`` and
``fingerprint`` of ``lm_head.weight`` work on such a model, and ``check_family`` does
not call it missing when the base stores an untied head. ``tensors`` lists only what is
stored.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dareflow.io import storage

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

#: safetensors dtype codes and the torch dtypes they are read as.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: dtype
    for code, dtype in {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": getattr(torch, "uint16", None),
        "I32": torch.int32,
        "U32": getattr(torch, "uint32", None),
        "I64": torch.int64,
        "U64": getattr(torch, "uint64", None),
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dtype is not None
}

# The safetensors library refuses larger headers; a larger length means a corrupt file.
MAX_HEADER_BYTES = 100_000_000

# Weight files of formats we refuse, and how they are recognised.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Module names whose weight has one row per vocabulary entry.
_VOCAB_MODULES = frozenset(
    {"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "lm_head",
     "embed_out", "output", "decoder"}
)
# Input embeddings that a tied lm_head shares.
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                     "tok_embeddings.weight")
LM_HEAD = "lm_head.weight"

_log = logging.getLogger(__name__)

# config.json keys that fix tensor shapes and counts: a difference means another
# architecture size, reported once instead of as one shape error per tensor.
_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
              "intermediate_size", "n_inner", "num_attention_heads", "n_head",
              "num_key_value_heads", "head_dim")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives.

    Attributes:
        name: Tensor name in the checkpoint (``model.layers.0.mlp.up_proj.weight``).
        file: URI of the safetensors file that holds it.
        dtype: safetensors dtype code (``"BF16"``, ``"F32"``, ``"I64"``, ...).
        shape: Tensor shape.
        start: Absolute byte offset of its first byte in ``file``.
        end: Absolute byte offset one past its last byte (``end - start == nbytes``).
    """

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype the tensor is read as."""
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start

    @property
    def is_floating_point(self) -> bool:
        """Whether the dtype is a floating-point type (the only ones dareflow merges)."""
        return self.torch_dtype.is_floating_point


@dataclass(frozen=True)
class ShardFile:
    """One safetensors file of a checkpoint, as seen when it was opened.

    Attributes:
        uri: The file's URI.
        size: Its size in bytes.
        version: The store's cheap version marker: the s3 ETag, else the local mtime
            (``""`` when the store gives neither).
        metadata: The header's ``__metadata__`` (string to string).
    """

    uri: str
    size: int
    version: str
    metadata: dict[str, str]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _corrupt(uri: str, what: str) -> ValueError:
    return ValueError(
        f"safetensors file {uri!r} is corrupt or incomplete: {what}. Download or write "
        "it again (an interrupted download or copy truncates files)"
    )


def _version_of(stat: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "VersionId", "generation", "mtime", "LastModified",
                "last_modified", "modified"):
        if stat.get(key) not in (None, ""):
            return f"{key}={stat[key]}"
    return ""


def parse_header(
    uri: str, header: bytes, file_size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the JSON header of a safetensors file.

    Args:
        uri: The file's URI (used in messages and stored in each ``TensorInfo``).
        header: The ``n`` header bytes that follow the 8-byte length.
        file_size: The file's size in bytes.

    Returns:
        ``(tensors, metadata)``: tensors by name with absolute offsets, and the
        ``__metadata__`` mapping (empty if absent).

    Raises:
        ValueError: the header is not valid JSON, names an unknown dtype, or lies:
            a tensor whose byte count is not ``numel * itemsize``, that lies outside the
            file (a truncated file) or that overlaps another tensor. The message names
            the file and the tensor.
    """
    data_start = 8 + len(header)
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(uri, f"its header is not valid JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise _corrupt(uri, f"its header is a JSON {type(parsed).__name__}, not an object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(uri, "its __metadata__ is not a mapping of strings to strings")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in parsed.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise _corrupt(uri, f"{where} has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get(
            "data_offsets"
        )
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"safetensors file {uri!r}: {where} has dtype {dtype!r}, which dareflow "
                f"cannot read; supported: {', '.join(SAFETENSORS_DTYPES)}. Convert the "
                "checkpoint to bf16/f16/f32 first"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _corrupt(uri, f"{where} has shape {shape!r}, not a list of sizes >= 0")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(
                uri, f"{where} has data_offsets {offsets!r}, not [begin, end] with "
                "0 <= begin <= end"
            )
        expected = math.prod(shape) * _itemsize(SAFETENSORS_DTYPES[dtype])
        if offsets[1] - offsets[0] != expected:
            raise _corrupt(
                uri, f"{where} has data_offsets {offsets} ({offsets[1] - offsets[0]} "
                f"bytes) but dtype {dtype} and shape {shape} need {expected} bytes "
                "(the header lies)"
            )
        start, end = data_start + offsets[0], data_start + offsets[1]
        if end > file_size:
            raise _corrupt(
                uri, f"{where} needs bytes up to offset {end} but the file has only "
                f"{file_size} bytes (truncated)"
            )
        tensors[name] = TensorInfo(name, uri, dtype, tuple(shape), start, end)

    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, prev_end, prev), (start, _, name) in itertools.pairwise(spans):
        if start < prev_end:
            raise _corrupt(
                uri, f"tensors {prev!r} and {name!r} overlap in the file (the header lies)"
            )
    return tensors, metadata


def read_header(
    uri: str, **storage_options: Any
) -> tuple[dict[str, TensorInfo], ShardFile]:
    """Read and validate the header of one safetensors file (two small ranged reads).

    Args:
        uri: The ``.safetensors`` file.
        **storage_options: fsspec options for the store.

    Returns:
        ``(tensors, shard)``: tensors by name, and the file's size/version/metadata.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is truncated or its header is invalid (see ``parse_header``).
    """
    stat = storage.info(uri, **storage_options)
    file_size = int(stat["size"])
    if file_size < 8:
        raise _corrupt(uri, f"it has {file_size} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", storage.read_bytes(uri, 0, 8, **storage_options))
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise _corrupt(
            uri, f"its header length is {n} bytes but the file has {file_size} bytes "
            "(truncated, or not a safetensors file)"
        )
    header = storage.read_bytes(uri, 8, 8 + n, **storage_options)
    if len(header) != n:
        raise _corrupt(uri, f"read {len(header)} of the {n} header bytes (truncated)")
    tensors, metadata = parse_header(uri, header, file_size)
    return tensors, ShardFile(uri, file_size, _version_of(stat), metadata)


def _pickle_error(uri: str, found: list[str]) -> ValueError:
    return ValueError(
        f"checkpoint {uri!r} has only pickle weights ({', '.join(found)}); dareflow "
        "refuses pickle checkpoints because unpickling can run arbitrary code and they "
        "cannot be read by byte range. Convert it to safetensors once, in an environment "
        "you trust: `AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out)` "
        "(transformers writes model.safetensors), or `safetensors.torch.save_file("
        "torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors', "
        "metadata={'format': 'pt'})`; or use the Hub revision that has *.safetensors"
    )


class Checkpoint:
    """A Hugging Face model folder (or one ``.safetensors`` file) opened lazily.

    Opening reads ``config.json`` and the safetensors headers only; ``read`` fetches
    one tensor's byte range.

    Attributes:
        uri: The folder (or file) URI.
        tensors: Stored tensors by name, sorted by name (header data only).
        config: The parsed ``config.json``, or ``None`` when there is none.
        files: The safetensors files by URI.
        aliases: Names readable without being stored, mapped to the stored tensor
            they share (``{"lm_head.weight": "model.embed_tokens.weight"}`` for a
            model with tied word embeddings).
        storage_options: The fsspec options used for every read.
    """

    def __init__(
        self,
        uri: str,
        tensors: Mapping[str, TensorInfo],
        config: dict[str, Any] | None,
        files: Mapping[str, ShardFile],
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.uri = uri
        self.tensors: dict[str, TensorInfo] = dict(sorted(tensors.items()))
        self.config = config
        self.files: dict[str, ShardFile] = dict(files)
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.aliases: dict[str, str] = _tied_aliases(self.tensors, config)

    def __repr__(self) -> str:
        return (
            f"Checkpoint({self.uri!r}, {len(self.tensors)} tensors, "
            f"{len(self.files)} file{'s' if len(self.files) != 1 else ''})"
        )

    @classmethod
    def open(cls, uri: str, **storage_options: Any) -> Checkpoint:
        """Open a checkpoint folder: ``model.safetensors`` or a sharded index.

        Args:
            uri: A Hugging Face model folder holding ``model.safetensors`` or
                ``model.safetensors.index.json`` plus its shards, or the URI of a single
                ``.safetensors`` file (such as a unit shard written by dareflow).
            **storage_options: fsspec options for the store (kept for later reads).

        Returns:
            The opened checkpoint; no tensor data has been read.

        Raises:
            FileNotFoundError: the folder does not exist, holds no weights, or the index
                names a shard that is missing.
            ValueError: only pickle weights exist, or a header/index is invalid.
        """
        uri = uri.rstrip("/") if uri.rstrip("/") else uri
        if uri.endswith(".safetensors") and not storage.isdir(uri, **storage_options):
            tensors, shard = read_header(uri, **storage_options)
            return cls(uri, tensors, None, {uri: shard}, storage_options)
        if not storage.exists(uri, **storage_options):
            raise FileNotFoundError(
                f"checkpoint folder {uri!r} does not exist; pass the folder that holds "
                "config.json and model.safetensors (download Hub models first)"
            )
        if uri.endswith(_PICKLE_SUFFIXES) and not storage.isdir(uri, **storage_options):
            raise _pickle_error(uri, [uri.rsplit("/", 1)[-1]])
        names = storage.listdir(uri, **storage_options)
        config = _read_json(storage.join(uri, CONFIG_NAME), storage_options) if (
            CONFIG_NAME in names
        ) else None

        if INDEX_NAME in names:
            tensors, files = _open_sharded(uri, names, storage_options)
        elif WEIGHTS_NAME in names:
            file_uri = storage.join(uri, WEIGHTS_NAME)
            tensors, shard = read_header(file_uri, **storage_options)
            files = {file_uri: shard}
        else:
            raise _no_weights_error(uri, names)
        return cls(uri, tensors, config, files, storage_options)

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether ``config.json`` says the output head shares the input embeddings."""
        return bool((self.config or {}).get("tie_word_embeddings", False))

    def __contains__(self, name: object) -> bool:
        return name in self.tensors or name in self.aliases

    def info(self, name: str) -> TensorInfo:
        """Where tensor ``name`` (or the tensor it aliases) is stored.

        Raises:
            KeyError: no such tensor; the message suggests close names.
        """
        if name in self.tensors:
            return self.tensors[name]
        if name in self.aliases:
            return self.tensors[self.aliases[name]]
        close = difflib.get_close_matches(name, list(self.tensors), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(
            f"checkpoint {self.uri!r} has no tensor {name!r} ({len(self.tensors)} "
            f"tensors){hint}"
        )

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor: exactly its byte range, never the rest of the file.

        Args:
            name: A stored tensor name, or an alias (see ``aliases``).

        Returns:
            A new tensor that owns its memory, with the stored dtype and shape.

        Raises:
            KeyError: no such tensor.
            ValueError: the file ends before the tensor's last byte (truncated since it
                was opened).
        """
        info = self.info(name)
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        got = storage.read_into(
            info.file, memoryview(out.numpy()), info.start, **self.storage_options
        )
        if got != info.nbytes:
            raise _corrupt(
                info.file, f"tensor {info.name!r} needs {info.nbytes} bytes at offset "
                f"{info.start} but only {got} could be read (truncated)"
            )
        # safetensors is little-endian, as are the CPUs dareflow runs on.
        return out.view(info.torch_dtype).reshape(info.shape)

    def fingerprint(self, name: str) -> str:
        """A short, stable identifier of tensor ``name``'s stored bytes.

        Hashes the file URI, the file size and version marker (s3 ETag or local mtime),
        the byte offsets, dtype and shape: cheap (no data read) and changes whenever the
        file is rewritten. Use it in cache keys instead of hashing tensors.

        Returns:
            32 hex characters.

        Raises:
            KeyError: no such tensor.
        """
        info = self.info(name)
        shard = self.files[info.file]
        payload = json.dumps(
            [info.file, shard.size, shard.version, info.start, info.end, info.dtype,
             list(info.shape)],
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _read_json(uri: str, storage_options: Mapping[str, Any]) -> Any:
    raw = storage.read_bytes(uri, **storage_options)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{uri!r} is not valid JSON ({e}); restore the file from its source"
        ) from None


def _open_sharded(
    uri: str, names: list[str], storage_options: Mapping[str, Any]
) -> tuple[dict[str, TensorInfo], dict[str, ShardFile]]:
    index_uri = storage.join(uri, INDEX_NAME)
    index = _read_json(index_uri, storage_options)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise ValueError(
            f"index {index_uri!r} has no weight_map of tensor name -> shard file; "
            "restore it from the model's source"
        )
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if s not in names]
    if missing:
        raise FileNotFoundError(
            f"index {index_uri!r} names shard(s) missing from {uri!r}: "
            f"{', '.join(missing)}; download every shard listed in the index"
        )
    tensors: dict[str, TensorInfo] = {}
    files: dict[str, ShardFile] = {}
    for shard_name in shard_names:
        shard_uri = storage.join(uri, shard_name)
        shard_tensors, shard = read_header(shard_uri, **storage_options)
        files[shard_uri] = shard
        for name, info in shard_tensors.items():
            if name in tensors:
                raise ValueError(
                    f"tensor {name!r} is stored twice in {uri!r}: in "
                    f"{tensors[name].file!r} and {shard_uri!r}; the checkpoint is "
                    "inconsistent, restore it from its source"
                )
            tensors[name] = info
    for name, shard_name in sorted(weight_map.items()):
        info = tensors.get(name)
        if info is None or info.file != storage.join(uri, shard_name):
            raise ValueError(
                f"index {index_uri!r} maps tensor {name!r} to {shard_name!r} but that "
                "shard's header does not contain it; the index and shards come from "
                "different saves, download them again together"
            )
    return tensors, files


def _no_weights_error(uri: str, names: list[str]) -> Exception:
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        return _pickle_error(uri, pickles)
    others = [n for n in names if n.endswith(".safetensors")]
    if any(n.startswith("adapter_model") for n in others):
        return ValueError(
            f"{uri!r} holds a PEFT adapter ({', '.join(others)}), not a full model; "
            "merge the adapter into its base first (peft's merge_and_unload(), then "
            "save_pretrained) and pass that folder"
        )
    if others:
        return FileNotFoundError(
            f"{uri!r} has {', '.join(others)} but no {WEIGHTS_NAME} or {INDEX_NAME}; "
            "pass a Hugging Face folder as written by save_pretrained"
        )
    listing = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
    return FileNotFoundError(
        f"no weights in {uri!r}: expected {WEIGHTS_NAME} or {INDEX_NAME}, found "
        f"[{listing}]; pass the model folder (the one with config.json)"
    )


def _tied_aliases(
    tensors: Mapping[str, TensorInfo], config: Mapping[str, Any] | None
) -> dict[str, str]:
    if LM_HEAD in tensors or not (config or {}).get("tie_word_embeddings", False):
        return {}
    candidates = [n for n in tensors if n.endswith(_INPUT_EMBEDDINGS)]
    return {LM_HEAD: candidates[0]} if len(candidates) == 1 else {}


def vocab_tensor_names(ckpt: Checkpoint) -> list[str]:
    """Stored tensors with one row per vocabulary entry, by module name (input
    embeddings and output heads: ``model.embed_tokens.weight``, ``lm_head.weight``)."""
    return [n for n in ckpt.tensors
            if (n.split(".")[-2] if "." in n else n) in _VOCAB_MODULES]


def with_tensors_from(model: Checkpoint, other: Checkpoint, names: list[str]) -> Checkpoint:
    """A view of ``model`` whose tensors ``names`` are read from ``other`` instead.

    Used by ``vocab_mismatch: exclude_embeddings``: a fine-tune's embeddings read as the
    base's, so their delta is 0 and the merged rows are the base's, exactly. Both
    checkpoints must be readable with ``model.storage_options``.
    """
    tensors, files = dict(model.tensors), dict(model.files)
    for name in names:
        info = other.info(name)
        tensors[name] = info
        files[info.file] = other.files[info.file]
    return Checkpoint(model.uri, tensors, model.config, files, model.storage_options)


def _is_vocab_tensor(name: str, shape: tuple[int, ...], config: Mapping[str, Any] | None) -> bool:
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else parts[0]
    vocab = (config or {}).get("vocab_size")
    return module in _VOCAB_MODULES or (bool(shape) and vocab is not None and shape[0] == vocab)


def _names_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def check_family(
    base: Checkpoint,
    models: Mapping[str, Checkpoint],
    *,
    allow_dtypes_differ: bool = True,
) -> None:
    """Check that fine-tuned models can be merged with their base, before heavy work.

    Only tensors stored in the base are merged, so they define the comparison. A model
    whose config ties word embeddings may lack ``lm_head.weight``: it reads as its input
    embedding (see ``Checkpoint.aliases``), so against an untied base its head delta is
    ``its input embedding - the base's lm_head``. The merged model follows the base's
    tying: a fine-tune that stores an untied ``lm_head.weight`` while the base ties it
    is accepted with a warning, and that separate head is not merged (the tied output
    head is the merged input embedding).

    Args:
        base: The common base model.
        models: Fine-tuned models by id (the ids used in messages and in the recipe).
        allow_dtypes_differ: Accept models stored in another float dtype than the base
            (e.g. bf16 fine-tunes of an f32 base); merging computes in float32 anyway.

    Raises:
        ValueError: one error listing every problem found: a different ``model_type``,
            missing or extra tensors, shape mismatches (vocabulary-size differences are
            named as such), non-floating tensors, and dtype differences when not allowed.
    """
    if not models:
        raise ValueError(
            "check_family needs at least one fine-tuned model besides the base; got none"
        )
    problems: list[str] = []
    base_type = (base.config or {}).get("model_type")

    non_float = [n for n, t in base.tensors.items() if not t.is_floating_point]
    if non_float:
        problems.append(
            f"base {base.uri!r}: non-floating tensors cannot be merged: "
            + ", ".join(f"{n!r} ({base.tensors[n].dtype})" for n in non_float)
            + "; remove these buffers from the checkpoint (re-save it with a current "
            "transformers version) or use a base without them"
        )

    for model_id, model in models.items():
        who = f"model {model_id!r} ({model.uri})"
        model_type = (model.config or {}).get("model_type")
        if base_type and model_type and model_type != base_type:
            problems.append(
                f"{who}: model_type {model_type!r} differs from the base's {base_type!r}; "
                "merge only fine-tunes of the same architecture as the base"
            )
        sizes = [
            f"{k} {(model.config or {})[k]} vs base {(base.config or {})[k]}"
            for k in _SIZE_KEYS
            if k in (model.config or {}) and k in (base.config or {})
            and (model.config or {})[k] != (base.config or {})[k]
        ]
        if sizes:
            problems.append(
                f"{who}: config.json {', '.join(sizes)}: another model size, not a "
                "fine-tune of this base; merge only fine-tunes of the same base model"
            )

        missing = [n for n in base.tensors if n not in model]
        if missing:
            tie_hint = (
                "; if this model ties its output head to its input embeddings, its "
                "config.json needs tie_word_embeddings: true"
                if LM_HEAD in missing and not model.tie_word_embeddings else ""
            )
            problems.append(
                f"{who}: missing {len(missing)} tensor(s) present in the base: "
                f"{_names_list(missing)}{tie_hint}"
            )
        extra = [n for n in model.tensors if n not in base.tensors]
        untied = [n for n in extra if n == LM_HEAD and base.tie_word_embeddings]
        if untied:
            # The merged model follows the base's tying: its output head is the merged
            # input embedding, so this model's separate head has nowhere to go.
            _log.warning(
                "%s stores an untied %r but the base ties it to its input embeddings; "
                "the merged model keeps the base's tying, so that head is not merged "
                "(its input embedding is)", who, LM_HEAD,
            )
        extra = [n for n in extra if n not in untied]
        if extra:
            problems.append(
                f"{who}: {len(extra)} tensor(s) not in the base: {_names_list(extra)}; "
                "merge only fine-tunes of this base (same architecture and heads)"
            )

        dtype_diffs: list[str] = []
        for name, b in base.tensors.items():
            if name not in model:
                continue
            m = model.info(name)
            if m.shape != b.shape and not sizes:
                problems.append(_shape_problem(who, name, b, m, base.config))
            if b.is_floating_point and not m.is_floating_point:
                problems.append(
                    f"{who}: tensor {name!r} has non-floating dtype {m.dtype} (base: "
                    f"{b.dtype}); re-save the model with floating weights"
                )
            elif m.dtype != b.dtype and not allow_dtypes_differ:
                dtype_diffs.append(f"{name!r} {m.dtype} vs base {b.dtype}")
        if dtype_diffs:
            problems.append(
                f"{who}: {len(dtype_diffs)} tensor(s) stored in another dtype than the "
                f"base: {', '.join(dtype_diffs[:5])}"
                + (f", ... and {len(dtype_diffs) - 5} more" if len(dtype_diffs) > 5 else "")
                + "; pass allow_dtypes_differ=True to merge in float32 anyway"
            )

    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(
            f"models cannot be merged with base {base.uri!r} ({count}):\n{lines}"
        )


def _shape_problem(
    who: str, name: str, base: TensorInfo, model: TensorInfo, config: Mapping[str, Any] | None
) -> str:
    b, m = base.shape, model.shape
    rows_only = len(b) == len(m) and len(b) >= 1 and b[1:] == m[1:]
    if rows_only and _is_vocab_tensor(name, b, config):
        return (
            f"{who}: tensor {name!r} has {m[0]} rows vs {b[0]} in the base (shapes "
            f"{list(m)} vs {list(b)}): a vocabulary-size difference (e.g. added tokens, "
            f"{b[0]} vs {m[0]}). Merge models that share the base's tokenizer and "
            f"vocabulary, or resize the embeddings first so that every model has the "
            f"same rows (e.g. model.resize_token_embeddings({b[0]}) on the fine-tune, or "
            f"on the base to {m[0]}, then save_pretrained)"
        )
    return f"{who}: tensor {name!r} has shape {list(m)} but the base has {list(b)}"
