"""Checkpoint IO: Hugging Face model folders opened lazily, tensors read by byte range.

Opening a checkpoint reads only its ``config.json`` and safetensors headers
(``dareflow.io.headers``), on any fsspec store, and ``Checkpoint.read`` fetches exactly
one tensor's bytes (one ranged GET on s3, through ``dareflow.io.buffers``). A worker
therefore never loads a whole model: peak memory is the tensors of one layer unit.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling can run
arbitrary code and they cannot be read by byte range.

Tied embeddings: when a config says ``tie_word_embeddings: true`` and the checkpoint
stores no ``lm_head.weight``, the output head *is* the input embedding matrix.
``Checkpoint.aliases`` maps ``lm_head.weight`` to that stored tensor, so ``read`` and
``fingerprint`` of ``lm_head.weight`` work on such a model, and
``dareflow.io.homology.check_family`` does not call it missing when the base stores an
untied head. ``tensors`` lists only what is stored.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from dareflow.io import buffers, storage
from dareflow.io.headers import ShardFile, TensorInfo, corrupt, read_header

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Weight files of formats we refuse, and how they are recognised.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Input embeddings that a tied lm_head shares.
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                     "tok_embeddings.weight")
LM_HEAD = "lm_head.weight"


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
        got = buffers.read_into(
            info.file, memoryview(out.numpy()), info.start, **self.storage_options
        )
        if got != info.nbytes:
            raise corrupt(
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
