"""Assemble the merged model: a Hugging Face folder that ``from_pretrained`` loads.

Shards (one per unit), ``model.safetensors.index.json``, ``config.json`` with the output
dtype, the base's tokenizer and sentence-transformers files, a model card (README.md) and
``manifest.json``.
Every file is written atomically through ``dareflow.io.storage``, so a killed run never
leaves a partial file under its final name.

Shard bytes are deterministic: the same tensors and metadata give the same bytes and
sha256 whatever the insertion order or process. safetensors orders tensors itself
(by dtype alignment, then name) but serialises ``__metadata__`` from a hash map whose
order changes between calls, so the header is re-written here with sorted metadata.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import yaml
from safetensors.torch import save as safetensors_save

from dareflow.errors import fault_point
from dareflow.io import storage
from dareflow.io.checkpoints import CONFIG_NAME, INDEX_NAME
from dareflow.merge.tokenizer import is_tokenizer_file
from dareflow.sources.files import (
    drop_remote_code,
    json_without_remote_code,
    read_model_file,
    remote_code_note,
)
from dareflow.sources.resolve import SENTENCE_TRANSFORMERS_FILES, matches

README_NAME = "README.md"
MANIFEST_NAME = "manifest.json"

#: Files copied from the base folder when present (fnmatch patterns matched component by
#: component, see ``dareflow.sources.resolve.matches``; regular files only).
MODEL_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    *SENTENCE_TRANSFORMERS_FILES,
)

#: Output dtypes and the spellings accepted for them.
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _json_bytes(data: Any, *, sort_keys: bool = True) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n").encode()


# --------------------------------------------------------------------------- shards


def shard_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, memoryview]:
    """Serialise tensors as safetensors with a deterministic header.

    Args:
        tensors: Tensors by name, any shapes; moved to CPU and made contiguous.
        metadata: String metadata for ``__metadata__``; ``{"format": "pt"}`` is added
            unless given (transformers refuses other formats).

    Returns:
        ``(head, data)``: the 8-byte length plus the JSON header (space-padded to a
        multiple of 8, as safetensors does), and the tensor bytes. The file is
        ``head + data``.

    Raises:
        ValueError: a name or metadata entry is not a string, or two tensors share
            memory (pass a copy of one of them).
    """
    md = {"format": "pt", **(metadata or {})}
    bad = {k: v for k, v in md.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(
            f"shard metadata must map strings to strings; got {bad!r}; convert the values "
            "with str() or json.dumps()"
        )
    if not all(isinstance(k, str) for k in tensors):
        raise ValueError(f"tensor names must be strings, got {sorted(map(repr, tensors))}")
    prepared = {
        name: tensors[name].detach().to("cpu").contiguous() for name in sorted(tensors)
    }
    try:
        raw = safetensors_save(prepared)
    except RuntimeError as e:
        raise ValueError(f"cannot serialise shard: {e}") from e
    (n,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + n])
    header = {"__metadata__": dict(sorted(md.items())), **entries}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, memoryview(raw)[8 + n :]


def write_shard(
    uri: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    **storage_options: Any,
) -> tuple[str, int]:
    """Write tensors as one safetensors file, atomically.

    Args:
        uri: Destination file, e.g. ``.../units/layer_000.safetensors``.
        tensors: Tensors by name (each ``[*shape]`` in its output dtype).
        metadata: String metadata stored in the header (``format: pt`` is added).
        **storage_options: fsspec options for the store.

    Returns:
        ``(sha256, nbytes)`` of the written file. Identical inputs give identical bytes.

    Raises:
        ValueError: see ``shard_bytes``.
    """
    head, data = shard_bytes(tensors, metadata)
    digest = hashlib.sha256(head)
    digest.update(data)

    with storage.open_write_atomic(uri, **storage_options) as f:
        f.write(head)
        fault_point("shard-half-written")  # a kill here leaves only a temporary file
        f.write(data)
    return digest.hexdigest(), len(head) + len(data)


def write_index(
    out_uri: str, weight_map: Mapping[str, str], total_size: int, **storage_options: Any
) -> str:
    """Write ``model.safetensors.index.json`` for a sharded model folder.

    Args:
        out_uri: The model folder.
        weight_map: Tensor name -> shard file name (relative to the folder).
        total_size: Sum of the tensors' data bytes (transformers only reports it).

    Returns:
        The index URI.

    Raises:
        ValueError: an empty map, a shard that is not a relative ``.safetensors`` name,
            or a negative ``total_size``.
    """
    if not weight_map:
        raise ValueError("write_index: weight_map is empty; pass tensor name -> shard file")
    bad = sorted(
        {f for f in weight_map.values() if not isinstance(f, str)
         or not f.endswith(".safetensors") or f.startswith("/") or "://" in f
         or ".." in f.split("/")}
    , key=repr)
    if bad:
        raise ValueError(
            f"write_index: shard files must be .safetensors names relative to {out_uri!r}, "
            f"got {bad!r}"
        )
    if not isinstance(total_size, int) or isinstance(total_size, bool) or total_size < 0:
        raise ValueError(f"write_index: total_size must be an integer >= 0, got {total_size!r}")
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    uri = storage.join(out_uri, INDEX_NAME)
    storage.write_bytes_atomic(uri, _json_bytes(index), **storage_options)
    return uri


# --------------------------------------------------------------------------- config, tokenizer


def normalize_dtype(dtype: str | torch.dtype) -> str:
    """The transformers name of an output dtype (``"bf16"`` -> ``"bfloat16"``).

    Raises:
        ValueError: not one of float32, bfloat16, float16 (or their short spellings).
    """
    key = str(dtype).removeprefix("torch.").lower()
    if key not in DTYPE_NAMES:
        raise ValueError(
            f"output dtype {dtype!r} is not supported; choose float32, bfloat16 or float16"
        )
    return DTYPE_NAMES[key]


def _set_dtype(config: dict[str, Any], dtype: str) -> None:
    # transformers >= 4.56 reads "dtype" (and 5.x writes only it); older versions read
    # "torch_dtype". Set "dtype" always, and "torch_dtype" where the base used it, so
    # both readers agree. Nested sub-configs (text_config, ...) follow the same rule.
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    for value in config.values():
        if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
            _set_dtype(value, dtype)


def copy_model_files(
    base_uri: str, out_uri: str, dtype: str, *, tokenizer_uri: str | None = None,
    vocab_size: int | None = None, notes: list[str] | None = None, **storage_options: Any
) -> list[str]:
    """Write ``config.json`` with the output dtype and copy the base's tokenizer files and
    sentence-transformers files (``modules.json``, ``1_Pooling/config.json``, ...).

    Only regular files inside the base folder are read, each of at most
    ``MAX_MODEL_FILE_BYTES`` (``dareflow.sources.files``), and the remote-code keys
    (``auto_map``, ``trust_remote_code``, ``custom_pipelines``) are dropped from the
    output ``config.json`` and ``tokenizer_config.json``: no code is shipped with a merge.

    Args:
        base_uri: The base model folder.
        out_uri: The merged model folder.
        dtype: Output dtype (``float32``, ``bfloat16``, ``float16``). transformers 5
            loads weights in the config's dtype by default, so it must match the shards.
        tokenizer_uri: A folder of output tokenizer files (a vocabulary policy's,
            ``dareflow.merge.vocab_policy``): copied instead of the base's tokenizer files.
        vocab_size: The output embedding rows, written as the config's ``vocab_size``.
        notes: Where to append one line per file whose remote-code keys were dropped,
            for the model card (``write_model_card(notes=...)``).
        **storage_options: fsspec options for both folders.

    Returns:
        The names written to ``out_uri``, ``config.json`` first, then the copied files
        (those of ``MODEL_FILE_PATTERNS`` present in the base, the tokenizer files from
        ``tokenizer_uri`` when given), sorted.

    Raises:
        FileNotFoundError: the base folder or its ``config.json`` is missing.
        ValueError: unsupported ``dtype``, an invalid ``config.json``, or a file to copy
            that is a link out of the base folder, not a regular file, or too large.
    """
    dtype = normalize_dtype(dtype)
    names = storage.listdir(base_uri, **storage_options)
    if CONFIG_NAME not in names:
        raise FileNotFoundError(
            f"base folder {base_uri!r} has no {CONFIG_NAME}; the merged model needs the "
            "base's config, pass the folder written by save_pretrained"
        )
    config_uri = storage.join(base_uri, CONFIG_NAME)
    try:
        config = json.loads(read_model_file(base_uri, CONFIG_NAME, **storage_options))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_uri!r} is not valid JSON ({e}); restore it") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_uri!r} is not a JSON object; restore it")  # noqa: TRY004
    _set_dtype(config, dtype)
    if vocab_size is not None:
        _set_vocab_size(config, vocab_size)
    _note(notes, CONFIG_NAME, drop_remote_code(config))
    # every file is read (and checked) before the first is written
    copied = _model_files(base_uri, names, storage_options)
    if tokenizer_uri is not None:  # the output vocabulary's tokenizer replaces the base's
        copied = [n for n in copied if not is_tokenizer_file(n)]
    files = {name: read_model_file(base_uri, name, **storage_options) for name in copied}
    if tokenizer_uri is not None:
        files |= {name: read_model_file(tokenizer_uri, name, **storage_options)
                  for name in storage.listdir(tokenizer_uri, **storage_options)
                  if not storage.is_temporary(name)}
    storage.write_bytes_atomic(
        storage.join(out_uri, CONFIG_NAME), _json_bytes(config), **storage_options
    )
    for name, data in sorted(files.items()):
        if name == "tokenizer_config.json":  # custom tokenizer classes: auto_map too
            data, dropped = json_without_remote_code(data)
            _note(notes, name, dropped)
        storage.write_bytes_atomic(storage.join(out_uri, name), data, **storage_options)
    return [CONFIG_NAME, *sorted(files)]


def _note(notes: list[str] | None, name: str, dropped: list[str]) -> None:
    if dropped and notes is not None:
        notes.append(remote_code_note(name, dropped))


def _set_vocab_size(config: dict[str, Any], rows: int) -> None:
    # the key transformers reads: top level, and sub-configs that have one (text_config
    # of a multimodal model); set at the top level when no config has it
    nested = [v for v in config.values() if isinstance(v, dict) and "vocab_size" in v]
    if "vocab_size" in config or not nested:
        config["vocab_size"] = rows
    for sub in nested:
        sub["vocab_size"] = rows


def _model_files(base_uri: str, names: list[str], storage_options: Mapping[str, Any]
                 ) -> list[str]:
    """The base's files that ``MODEL_FILE_PATTERNS`` names: top-level ones and those directly
    inside the sub-folders a pattern names (``1_Pooling/config.json``); folders and the
    temporary files of unfinished writes are skipped."""
    candidates = list(names)
    for folder in sorted({p.split("/")[0] for p in MODEL_FILE_PATTERNS if "/" in p} & set(names)):
        if storage.isdir(storage.join(base_uri, folder), **storage_options):
            candidates += [f"{folder}/{n}" for n in
                           storage.listdir(storage.join(base_uri, folder), **storage_options)]
    # anything but a folder: a link out of the base folder or a FIFO named like a
    # tokenizer file is refused when read (read_model_file), never skipped silently
    return sorted(
        n for n in candidates if matches(n, MODEL_FILE_PATTERNS) and not storage.is_temporary(n)
        and storage.info(storage.join(base_uri, n), **storage_options).get("type") != "directory"
    )


# --------------------------------------------------------------------------- card, manifest


def _model_refs(recipe: Mapping[str, Any]) -> list[str]:
    refs = []
    for ref in [recipe.get("base_model"), *(
        m.get("model") if isinstance(m, Mapping) else m for m in recipe.get("models") or []
    )]:
        if isinstance(ref, str) and ref and ref.split("@")[0] not in refs:
            refs.append(ref.split("@")[0])
    return refs


def _front_matter(recipe: Mapping[str, Any]) -> str:
    refs = _model_refs(recipe)
    hub = [r for r in refs if _HUB_ID.match(r)]
    # The Hub only understands repo ids; local or s3 sources are named in the body.
    base_models = hub or refs[:1]
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "dare", "dareflow"]}
    if base_models:
        meta["base_model"] = base_models
    if len(base_models) > 1:
        meta["base_model_relation"] = "merge"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _cell(value: Any) -> str:
    text = "—" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_RESCALE = {
    "inverse": "inverse — kept deltas × 1/(1−p), as in the DARE paper",
    "l1": "l1 — kept deltas rescaled to the L1 norm of the full delta (mergekit since 2025)",
    "none": "none — drop only, no rescale (DropOnly)",
}
_DISJOINT = {
    "weight": "weight — Σ agreeing w·δ / Σ agreeing w (mergekit normalize: true)",
    "sum": "sum — Σ agreeing w·δ (mergekit normalize: false)",
    "mean": "mean — Σ agreeing w·δ / number agreeing (TIES paper)",
}
_ELECTION = {
    "weighted_sum": "weighted_sum — sign of Σ w·δ (mergekit)",
    "sum": "sum — sign of Σ δ (TIES paper)",
    "count": "count — majority of the signs",
}
# (key in the resolved recipe's parameters, label, descriptions)
_OPTIONS = (("lambda", "Scale λ", {}), ("normalize", "Normalize (÷ Σ w)", {}),
            ("rescale", "Rescale", _RESCALE), ("sign_election", "Sign election", _ELECTION),
            ("disjoint_merge", "Disjoint merge", _DISJOINT),
            ("trim_after_dare", "Trim after DARE", {}))


def _setting_text(value: Any) -> str:
    """A per-model setting in words: a number, a gradient or its filters."""
    if not isinstance(value, list):
        return str(value)
    if all(not isinstance(v, Mapping) for v in value):
        return "gradient [" + ", ".join(str(v) for v in value) + "]"
    return "; ".join(f"{v.get('filter') or '*'}: {_setting_text(v.get('value'))}"
                     for v in value)


def _rate(own: Mapping[str, Any], default: Mapping[str, Any]) -> Any:
    for params in (own, default):
        if params.get("drop_rate") is not None:
            return _setting_text(params["drop_rate"])
        density = params.get("density")
        if isinstance(density, (int, float)) and not isinstance(density, bool):
            return round(1.0 - float(density), 12)
        if density is not None:
            return f"1 − density ({_setting_text(density)})"
    return None


def _recipe_section(recipe: Mapping[str, Any]) -> str:
    """The recipe in words. With the resolved recipe's ``conventions``, every option
    says whose convention its value follows (set in the recipe, mergekit's default for
    the method, or dareflow's)."""
    params = recipe.get("parameters") or {}
    conventions = recipe.get("conventions") or {}
    method = recipe.get("merge_method", recipe.get("method"))

    def noted(key: str, text: Any) -> str:
        return f"{text} · *{conventions[key]}*" if key in conventions else str(text)

    lines = [
        f"- **Method:** `{method}`" if method else "- **Method:** —",
        f"- **Base model:** `{recipe['base_model']}`" if recipe.get("base_model") else None,
    ]
    for key, label, words in _OPTIONS:
        value = params.get(key, recipe.get(key))
        if key == "lambda" and value is None:
            value = params.get("scale")
        if value is None or (key == "lambda" and value in (1, 1.0) and key not in conventions):
            continue
        lines.append(f"- **{label}:** {noted(key, words.get(value, value))}")
    if recipe.get("seed") is not None:
        lines.append(f"- **Seed:** {noted('seed', recipe['seed'])}")
    if recipe.get("dtype"):
        lines.append(f"- **Output dtype:** {noted('dtype', recipe['dtype'])}")
    out = "\n".join(line for line in lines if line) + "\n"
    models = [m for m in recipe.get("models") or [] if isinstance(m, Mapping)]
    if models:
        rows = []
        for i, m in enumerate(models):
            own = m.get("parameters") or {}
            weight = own.get("weight", params.get("weight"))
            row = [f"`{m.get('model')}`", _rate(own, params),
                   "1.0 (default)" if weight is None else _setting_text(weight)]
            if conventions:
                prefix = f"models[{i}]."
                row.append("; ".join(f"{key.removeprefix(prefix)}: {text}"
                                     for key, text in conventions.items()
                                     if key.startswith(prefix)))
            rows.append(row)
        header = ["model", "drop rate p", "weight"] + (["from"] if conventions else [])
        out += "\n" + _table(header, rows)
    return out


def render_model_card(
    *,
    recipe: Mapping[str, Any],
    sources: list[Mapping[str, Any]],
    shards: Mapping[str, str],
    versions: Mapping[str, str],
    notes: Sequence[str] = (),
) -> str:
    """The text of the merged model's README.md (see ``write_model_card``)."""
    name = recipe.get("name") or "Merged model"
    method = recipe.get("merge_method", recipe.get("method", "a merge method"))
    parts = [
        _front_matter(recipe),
        (f"\n# {name}\n\n"
        f"A merge of fine-tuned language models made with dareflow using `{method}`. "
        "DARE (Drop And REscale; Yu et al., *Language Models are Super Mario*, ICML 2024, "
        "arXiv:2311.03099) drops each delta parameter with probability p and rescales the "
        "rest. Masks depend only on (seed, model, tensor), so the recipe below reproduces "
        "these weights bit for bit.\n"),
        "\n## Recipe\n\n" + _recipe_section(recipe),
    ]
    if sources:
        columns: list[str] = []
        for s in sources:
            columns += [k for k in s if k not in columns]
        rows = [[s.get(c) for c in columns] for s in sources]
        parts.append("\n## Sources\n\n" + _table(columns, rows))
    parts.append(
        "\n## Full recipe\n\n```yaml\n"
        + yaml.safe_dump(dict(recipe), sort_keys=False, allow_unicode=True)
        + "```\n"
    )
    if shards:
        parts.append(
            "\n## Files\n\n"
            + _table(["file", "sha256"], [[f"`{f}`", f"`{h}`"] for f, h in sorted(shards.items())])
        )
    if versions:
        parts.append(
            "\n## Software\n\n"
            + "".join(f"- {k}: {v}\n" for k, v in sorted(versions.items()))
        )
    if notes:
        parts.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    return "".join(parts)


def write_model_card(
    out_uri: str,
    *,
    recipe: Mapping[str, Any],
    sources: list[Mapping[str, Any]],
    shards: Mapping[str, str],
    versions: Mapping[str, str],
    notes: Sequence[str] = (),
    **storage_options: Any,
) -> str:
    """Write README.md: Hub front matter, the recipe in words and as YAML, checksums.

    It writes exactly what it is given: the caller must redact credentials (URIs with
    keys, tokens) from ``recipe`` and ``sources`` first.

    Args:
        out_uri: The merged model folder.
        recipe: The recipe as plain data (mergekit spelling: ``merge_method``,
            ``base_model``, ``models[].model/parameters``, ``parameters.rescale``,
            ``seed``, ...); unknown keys appear in the full YAML block.
        sources: One mapping per source model (e.g. ``id``, ``role``, ``revision``,
            ``uri``, ``sha256``), rendered as a table with the union of their keys.
        shards: Shard file name -> sha256.
        versions: Software name -> version (dareflow, torch, transformers, ...).
        notes: Lines for a "Notes" section (what was changed from the base's files, see
            ``copy_model_files(notes=...)``).

    Returns:
        The README URI.
    """
    text = render_model_card(recipe=recipe, sources=sources, shards=shards, versions=versions,
                             notes=notes)
    uri = storage.join(out_uri, README_NAME)
    storage.write_bytes_atomic(uri, text.encode(), **storage_options)
    return uri


def write_manifest(out_uri: str, manifest: Mapping[str, Any], **storage_options: Any) -> str:
    """Write ``manifest.json`` (sorted keys, 2-space indent) in the model folder.

    Returns:
        The manifest URI.

    Raises:
        ValueError: a value is not JSON-serialisable.
    """
    try:
        data = _json_bytes(dict(manifest))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"manifest for {out_uri!r} is not JSON-serialisable ({e}); pass plain "
            "str/int/float/bool/list/dict values"
        ) from None
    uri = storage.join(out_uri, MANIFEST_NAME)
    storage.write_bytes_atomic(uri, data, **storage_options)
    return uri
