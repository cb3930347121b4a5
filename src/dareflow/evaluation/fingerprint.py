"""Model fingerprints for the results cache: what a model would be evaluated on, hashed.

A model's *revision* is a fingerprint of what it would be evaluated on: for a folder that
dareflow merged, its ``manifest.json`` shard sha256s; otherwise the sha256 of every weight file
(safetensors headers alone are the same for a base and its fine-tunes: same names, shapes,
offsets). ``config.json``, ``generation_config.json`` and the tokenizer files enter too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from dareflow.io import storage

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


def model_fingerprint(model_uri: str) -> dict[str, Any]:
    """What identifies a model for the results cache.

    Args:
        model_uri: a local HF model folder (``file://`` accepted).

    Returns:
        ``{"model_dir", "revision", "kind"}``: ``revision`` is ``"sha256:<64 hex>"`` over the
        weights (the manifest's shard sha256s for a dareflow-merged folder whose shard sizes
        match it, else every weight file's sha256) and the config and tokenizer files;
        ``kind`` is ``manifest`` or ``content``.

    Raises:
        FileNotFoundError: not a local model folder, or one without weights.
    """
    folder = local_model_dir(model_uri)
    weights = sorted(p for p in folder.iterdir()
                     if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    if not weights:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors (or *.bin) weights")
    parts: dict[str, str] = {}
    kind = "content"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            shards = json.loads(manifest_path.read_text("utf-8"))["shards"]
            if sorted(shards) == sorted(p.name for p in weights if p.suffix == ".safetensors") \
                    and all((folder / n).stat().st_size == s["bytes"] for n, s in shards.items()):
                parts = {n: s["sha256"] for n, s in shards.items()}
                kind = "manifest"
    if not parts:
        parts = {p.name: storage.sha256_of(str(p)) for p in weights}
    for name in _MODEL_FILES:
        if (folder / name).is_file():
            parts[name] = storage.sha256_of(str(folder / name))
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {"model_dir": str(folder), "revision": f"sha256:{digest}", "kind": kind}
