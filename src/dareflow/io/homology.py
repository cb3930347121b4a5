"""The homology check: can these fine-tuned models be merged with this base?

:func:`check_family` compares checkpoints (``dareflow.io.checkpoints.Checkpoint``, headers
and ``config.json`` only, no tensor data) before any heavy work and reports every problem
at once: quantized checkpoints (FP8 dtypes, GPTQ/AWQ/bitsandbytes tensors or a
``quantization_config``), another architecture or size, missing or extra tensors, shape
mismatches (vocabulary-size differences named as such), dtype differences.

Non-floating tensors are buffers (an int64 ``embeddings.position_ids`` that older
transformers saved), not weights: they are never merged but copied from the base, so a
fine-tune may lack them. :func:`check_buffers` reads them (a few KB) and refuses a family
whose models store different values. :func:`vocab_tensor_names` and
:func:`with_tensors_from` serve the ``vocab_mismatch: exclude_embeddings`` policy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from dareflow.io.checkpoints import LM_HEAD, Checkpoint
from dareflow.io.headers import DEQUANTIZE_HINT, QUANTIZED_DTYPES, TensorInfo

# Module names whose weight has one row per vocabulary entry.
_VOCAB_MODULES = frozenset(
    {"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "lm_head",
     "embed_out", "output", "decoder"}
)

_log = logging.getLogger(__name__)

# Last name components of the extra tensors quantizers store: GPTQ/AWQ (qweight, qzeros,
# scales, g_idx), bitsandbytes 4-bit (absmax, quant_map, nested_*, quant_state.*) and
# 8-bit (SCB, weight_format), compressed-tensors and FP8 checkpoints (weight_scale, ...).
_QUANTIZER_TENSORS = frozenset(
    {"qweight", "qzeros", "scales", "g_idx", "absmax", "quant_map", "nested_absmax",
     "nested_quant_map", "SCB", "weight_format", "weight_packed", "weight_zero_point",
     "weight_scale", "weight_scale_inv"}
)

# config.json keys that fix tensor shapes and counts: a difference means another
# architecture size, reported once instead of as one shape error per tensor.
_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
              "intermediate_size", "n_inner", "num_attention_heads", "n_head",
              "num_key_value_heads", "head_dim")


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


def quantization_problem(ckpt: Checkpoint, who: str) -> str | None:
    """Why ``ckpt`` is a quantized checkpoint that dareflow will not merge, or None.

    Recognised from headers and ``config.json`` only: a ``quantization_config``, tensors
    stored in a quantized float dtype (``F8_E4M3``, ``F8_E5M2``, ``F8_E8M0``, ...), or the
    extra tensors GPTQ, AWQ and bitsandbytes store (``qweight``, ``qzeros``, ``scales``,
    ``g_idx``, ``absmax``, ``quant_map``, ...).

    Args:
        ckpt: The opened checkpoint.
        who: How messages name it (``"model 'a' (/path)"``).
    """
    found = []
    quant = (ckpt.config or {}).get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, Mapping) else None
        found.append("config.json has a quantization_config"
                     + (f" (quant_method {method!r})" if method else ""))
    fp8 = [n for n, t in ckpt.tensors.items() if t.dtype in QUANTIZED_DTYPES]
    if fp8:
        dtypes = sorted({ckpt.tensors[n].dtype for n in fp8})
        found.append(f"{len(fp8)} tensor(s) stored as {'/'.join(dtypes)}: {_names_list(fp8, 3)}")
    packed = [n for n in ckpt.tensors
              if n.split(".")[-1] in _QUANTIZER_TENSORS or ".quant_state." in n]
    if packed:
        found.append(f"{len(packed)} quantizer tensor(s) such as {_names_list(packed, 3)}")
    if not found:
        return None
    return f"{who} is a quantized checkpoint ({'; '.join(found)}): {DEQUANTIZE_HINT}"


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

    Non-floating tensors (buffers) are copied from the base: a fine-tune may lack one,
    one it stores must have the base's dtype and shape (its values are compared by
    :func:`check_buffers`), and one stored only by a fine-tune is left out with a
    warning (the merged model has the base's tensors).

    Args:
        base: The common base model.
        models: Fine-tuned models by id (the ids used in messages and in the recipe).
        allow_dtypes_differ: Accept models stored in another float dtype than the base
            (e.g. bf16 fine-tunes of an f32 base); merging computes in float32 anyway.

    Raises:
        ValueError: one error listing every problem found: quantized checkpoints, a
            different ``model_type``, missing or extra tensors, shape mismatches
            (vocabulary-size differences are named as such), buffers of another dtype,
            floating weights stored as integers, and dtype differences when not allowed.
    """
    if not models:
        raise ValueError(
            "check_family needs at least one fine-tuned model besides the base; got none"
        )
    problems: list[str] = []
    base_type = (base.config or {}).get("model_type")
    base_quantized = quantization_problem(base, f"base {base.uri!r}")
    if base_quantized:
        problems.append(base_quantized)

    for model_id, model in models.items():
        who = f"model {model_id!r} ({model.uri})"
        quantized = quantization_problem(model, who)
        if quantized:
            problems.append(quantized)
        if quantized or base_quantized:
            continue  # scales and packed tensors would only add noise to the comparison
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

        # A missing buffer is fine: buffers are copied from the base, never merged.
        missing = [n for n, t in base.tensors.items() if n not in model and t.is_floating_point]
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
        buffers = [n for n in extra if not model.tensors[n].is_floating_point]
        if buffers:
            # e.g. a fine-tune saved by an older transformers over a base saved by a newer
            # one: transformers recomputes such buffers, and the output follows the base.
            _log.warning(
                "%s stores non-floating tensor(s) the base does not have: %s; they are "
                "buffers, not weights, so the merged model leaves them out as the base "
                "does", who, _names_list(buffers),
            )
        extra = [n for n in extra if n not in untied and n not in buffers]
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
            if not b.is_floating_point and m.dtype != b.dtype:
                problems.append(
                    f"{who}: buffer {name!r} is stored as {m.dtype} but the base stores "
                    f"{b.dtype}; non-floating tensors are copied from the base, not merged: "
                    "remove it from this model's safetensors (transformers recomputes "
                    "buffers such as position_ids) or re-save the model with the base's "
                    "transformers version"
                )
            elif b.is_floating_point and not m.is_floating_point:
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


def buffer_names(ckpt: Checkpoint) -> list[str]:
    """The non-floating tensors stored in ``ckpt`` (buffers: copied, never merged)."""
    return [n for n, t in ckpt.tensors.items() if not t.is_floating_point]


def check_buffers(
    base: Checkpoint, models: Mapping[str, Checkpoint], *, base_role: str = "base"
) -> None:
    """Check that every model storing one of the base's buffers stores the base's bytes.

    The merged model's buffers are the base's, copied: a fine-tune whose buffer differs
    (other position ids, another mask) would silently lose its values. Reads only the
    buffers (a few KB: one ranged read each), after ``check_family`` passed (same dtypes
    and shapes).

    Args:
        base: The checkpoint the buffers are copied from.
        models: The other models by id.
        base_role: How messages name ``base`` (``"base"``, or ``"first model"`` for a
            merge without a base).

    Raises:
        ValueError: one error naming each differing tensor, the models that differ and
            what to do.
    """
    problems = []
    for name in buffer_names(base):
        expected = base.read(name)
        differ = [f"{mid!r} ({m.uri})" for mid, m in models.items()
                  if name in m and not _same_bytes(expected, m.read(name))]
        if differ:
            info = base.tensors[name]
            problems.append(
                f"tensor {name!r} ({info.dtype} {list(info.shape)}) of the {base_role} "
                f"differs in model(s) {', '.join(differ)}"
            )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(
            f"non-floating tensors (buffers) are copied from the {base_role} "
            f"{base.uri!r}, not merged, and these differ:\n{lines}\n"
            "Remove the tensor from the models that differ (transformers recomputes "
            "buffers such as position_ids, and a model saved by a current transformers "
            f"version does not store them), or make the model whose values you want the "
            f"{base_role}"
        )


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    # integer and bool tensors: equal values are equal bytes
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


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
