"""safetensors headers, parsed by dareflow itself: the format, ``TensorInfo`` and ``ShardFile``.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the end of the header) and the tensor bytes. :func:`read_header`
reads only the header (two small ranged reads through ``dareflow.io.storage``, on any
fsspec store) and :func:`parse_header` validates it, so that ``dareflow.io.checkpoints``
can later fetch exactly one tensor's bytes.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dareflow.io import storage

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
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    }.items()
    if dtype is not None
}

#: safetensors codes of quantized floats (FP8, FP6, FP4): codes that mean something only
#: with their scale tensors. Headers with them are read (so that every problem can be
#: reported together) but ``dareflow.io.homology.check_family`` refuses to merge them.
QUANTIZED_DTYPES = frozenset(
    {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F6_E2M3", "F6_E3M2", "F4"}
)

#: What to do with a quantized checkpoint (FP8 dtypes, GPTQ/AWQ/bitsandbytes tensors).
DEQUANTIZE_HINT = (
    "dareflow merges full-precision weights only (dropping and rescaling quantized codes "
    "or their scales is not DARE). Merge the bf16/fp16 checkpoints the quantized ones were "
    "made from, or dequantize each model to bf16/fp16 first, e.g. with transformers: "
    "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16); "
    "model.dequantize() (where its quantization method supports it); "
    "model.save_pretrained(out), and merge those folders"
)

# The safetensors library refuses larger headers; a larger length means a corrupt file.
MAX_HEADER_BYTES = 100_000_000


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


def corrupt(uri: str, what: str) -> ValueError:
    """The error for a safetensors file ``uri`` that is corrupt or incomplete: ``what``."""
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
        raise corrupt(uri, f"its header is not valid JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise corrupt(uri, f"its header is a JSON {type(parsed).__name__}, not an object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise corrupt(uri, "its __metadata__ is not a mapping of strings to strings")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in parsed.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise corrupt(uri, f"{where} has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get(
            "data_offsets"
        )
        if dtype in QUANTIZED_DTYPES and dtype not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"safetensors file {uri!r}: {where} has dtype {dtype!r}, a quantized "
                f"float format; {DEQUANTIZE_HINT}"
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
            raise corrupt(uri, f"{where} has shape {shape!r}, not a list of sizes >= 0")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise corrupt(
                uri, f"{where} has data_offsets {offsets!r}, not [begin, end] with "
                "0 <= begin <= end"
            )
        expected = math.prod(shape) * _itemsize(SAFETENSORS_DTYPES[dtype])
        if offsets[1] - offsets[0] != expected:
            raise corrupt(
                uri, f"{where} has data_offsets {offsets} ({offsets[1] - offsets[0]} "
                f"bytes) but dtype {dtype} and shape {shape} need {expected} bytes "
                "(the header lies)"
            )
        start, end = data_start + offsets[0], data_start + offsets[1]
        if end > file_size:
            raise corrupt(
                uri, f"{where} needs bytes up to offset {end} but the file has only "
                f"{file_size} bytes (truncated)"
            )
        tensors[name] = TensorInfo(name, uri, dtype, tuple(shape), start, end)

    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, prev_end, prev), (start, _, name) in itertools.pairwise(spans):
        if start < prev_end:
            raise corrupt(
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
        raise corrupt(uri, f"it has {file_size} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", storage.read_bytes(uri, 0, 8, **storage_options))
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise corrupt(
            uri, f"its header length is {n} bytes but the file has {file_size} bytes "
            "(truncated, or not a safetensors file)"
        )
    header = storage.read_bytes(uri, 8, 8 + n, **storage_options)
    if len(header) != n:
        raise corrupt(uri, f"read {len(header)} of the {n} header bytes (truncated)")
    tensors, metadata = parse_header(uri, header, file_size)
    return tensors, ShardFile(uri, file_size, _version_of(stat), metadata)
