"""A merge's vocabulary policy: recipe + checkpoints → output vocabulary, re-index plan and
output tokenizer, written to the store at plan time.

The recipe asks for one of: mergekit's ``tokenizer:`` / ``tokenizer_source:`` (rows
re-indexed by token, ``dareflow.merge.vocab``), ``parameters.vocab_mismatch:
pad_to_union`` (the DARE authors' mean rows), or only a ``chat_template``. The plan step
calls :func:`plan_vocabulary` once; the unit tasks read the re-index plan back with
:func:`load_vocab_plan` and apply it to the vocabulary-indexed tensors of every input
(base included) before merging; assembly copies the output tokenizer files and sets the
config's ``vocab_size``. Inputs are keyed ``"base"`` (the base model) and by model
reference (the fine-tunes), as the unit tasks read them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from dareflow.io import storage
from dareflow.io.checkpoints import Checkpoint
from dareflow.io.homology import check_family, vocab_tensor_names
from dareflow.merge.tokenizer import (
    TOKENIZER_JSON,
    build_tokenizer_files,
    read_tokenizer_files,
    resolve_chat_template,
    set_chat_template,
    vocab_from_files,
)
from dareflow.merge.vocab import (
    ModelVocab,
    OutputVocab,
    VocabPlan,
    output_vocab,
    pad_to_union_plan,
    reindex_plan,
)
from dareflow.recipe import ModelTokenEmbedding, Recipe, TokenizerConfig, ZeroEmbedding

_log = logging.getLogger(__name__)

_INPUT_EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings",
                            "embed_in")

#: The fix named when vocabularies differ and the recipe has no policy.
VOCAB_FIX = (
    "models have different vocabularies (embedding rows); choose a vocabulary policy: "
    "tokenizer: {source: union} (mergekit: union of the tokenizers, rows re-indexed by "
    "token; or source: base / a model), parameters.vocab_mismatch: pad_to_union (the DARE "
    "authors: pad the smaller embeddings with the mean of their rows), or "
    "parameters.vocab_mismatch: exclude_embeddings (keep the base's embedding rows)")


def tokenizer_config(recipe: Recipe) -> TokenizerConfig | None:
    """``tokenizer:``, or ``tokenizer_source: X`` read as ``tokenizer: {source: X}``."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    if recipe.tokenizer_source is not None:
        return TokenizerConfig(source=recipe.tokenizer_source)
    return None


def has_vocab_policy(recipe: Recipe) -> bool:
    """Whether the recipe says what to do with different vocabularies (so the family
    check may accept different embedding rows)."""
    return tokenizer_config(recipe) is not None or (
        recipe.parameters.vocab_mismatch == "pad_to_union")


def _module(name: str) -> str:
    return name.split(".")[-2] if "." in name else name


def reindexed_tensors(reference: Checkpoint) -> list[str]:
    """The reference's vocabulary-indexed tensors: those named as embeddings or output
    heads whose rows equal its input embedding's."""
    names = vocab_tensor_names(reference)
    inputs = [n for n in names if _module(n) in _INPUT_EMBEDDING_MODULES] or names
    if not inputs:
        return []
    rows = reference.info(inputs[0]).shape[0]
    return [n for n in names if reference.info(n).shape and reference.info(n).shape[0] == rows]


def _rows(ckpt: Checkpoint, names: list[str]) -> set[int]:
    return {ckpt.info(n).shape[0] for n in names if n in ckpt and ckpt.info(n).shape}


def rows_aligned(inputs: Mapping[str, Checkpoint], names: list[str], rows: int
                 ) -> dict[str, Checkpoint]:
    """Views of the checkpoints whose vocabulary tensors report ``rows`` rows, for the
    family check only (never read through): the policy handles the row counts, the
    check still compares everything else."""
    out = {}
    for key, ckpt in inputs.items():
        tensors = {n: replace(t, shape=(rows, *t.shape[1:])) if n in names and t.shape else t
                   for n, t in ckpt.tensors.items()}
        out[key] = Checkpoint(ckpt.uri, tensors, ckpt.config, ckpt.files, ckpt.storage_options)
    return out


def rows_differ(reference: Checkpoint, inputs: Mapping[str, Checkpoint]) -> bool:
    """Whether any input's vocabulary tensors have other rows than the reference's."""
    names = reindexed_tensors(reference)
    return len(set().union(*(_rows(c, names) for c in [reference, *inputs.values()]))) > 1


def _key_of(ref: str, recipe: Recipe, inputs: Mapping[str, Checkpoint]) -> str:
    return "base" if ref == recipe.base_model and "base" in inputs else ref


def _token_settings(config: TokenizerConfig, recipe: Recipe,
                    inputs: Mapping[str, Checkpoint]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for tok, setting in (config.tokens or {}).items():
        source: Any = setting.source
        if isinstance(source, str):
            source = _key_of(source, recipe, inputs)
        elif isinstance(source, ZeroEmbedding):
            source = {"kind": "zero"}
        elif isinstance(source, ModelTokenEmbedding):
            source = {"kind": "model_token", "model": _key_of(source.model, recipe, inputs),
                      "token": source.token, "token_id": source.token_id}
        out[tok] = {"source": source, "force": setting.force}
    return out


def plan_vocabulary(recipe: Recipe, inputs: Mapping[str, Checkpoint],
                    store_uri: str) -> dict[str, Any] | None:
    """Apply the recipe's vocabulary policy: plan the re-indexing, build the output
    tokenizer, write both to the store.

    Args:
        recipe: The validated recipe.
        inputs: ``"base"`` (when the merge has a base) then the fine-tunes by model
            reference, in recipe order; the family check has passed.
        store_uri: The artifact store (``{store}/vocab/KEY.json``,
            ``{store}/tokenizers/KEY/``).

    Returns:
        ``None`` when the recipe has no policy or nothing changes; else ``{"policy",
        "rows"`` (output rows, or None when unchanged), ``"tensors"`` (names re-indexed
        in the units), ``"key"``, ``"uri"`` (the re-index plan), ``"tokenizer_uri"``
        (output tokenizer folder; None: copy the base's files), ``"appended"``,
        ``"notes"}``.

    Raises:
        ValueError: every problem found (rows that disagree within a model, a missing
            tokenizer, a ``tokens:`` setting naming an absent token, ...).
    """
    config = tokenizer_config(recipe)
    pad = recipe.parameters.vocab_mismatch == "pad_to_union"
    if config is None and not pad and recipe.chat_template is None:
        return None
    base_key = "base" if "base" in inputs else None
    start = base_key or next(iter(inputs))
    names = reindexed_tensors(inputs[start])
    rows: dict[str, int] = {}
    problems = []
    for key, ckpt in inputs.items() if config is not None or pad else ():
        found = _rows(ckpt, names)
        if len(found) != 1:
            problems.append(f"{key!r} ({ckpt.uri}): its vocabulary tensors {names} have "
                            f"rows {sorted(found)}; a vocabulary policy needs one embedding "
                            "and output-head row count per model")
        else:
            rows[key] = found.pop()
    if problems:
        raise ValueError("cannot plan the vocabulary: " + "; ".join(problems))
    files = {key: read_tokenizer_files(ckpt.uri, **ckpt.storage_options)
             for key, ckpt in inputs.items()}
    template = (resolve_chat_template(recipe.chat_template, files)
                if recipe.chat_template else None)
    notes: list[str] = []
    plan: VocabPlan | None = None
    out: OutputVocab | None = None
    if config is not None:
        policy = f"tokenizer source {config.source}"
        vocabs = _vocabs(inputs, files, rows, start, notes)
        source = config.source if config.source in ("union", "base") else _key_of(
            config.source, recipe, inputs)
        out = output_vocab(source, vocabs, start, list(config.tokens or {}))
        plan, zero_notes = reindex_plan(out, vocabs, base_key,
                                        _token_settings(config, recipe, inputs),
                                        config.pad_to_multiple_of)
        notes += zero_notes
    elif pad and len(set(rows.values())) > 1:
        policy = "vocab_mismatch pad_to_union"
        plan = pad_to_union_plan(rows)
        out = _padded_vocab(inputs, files, rows, start, plan.rows, notes)
    else:
        policy = "chat_template"
        if template is None:
            return None
    origin = out.start if out is not None else start
    if out is not None and files[origin]:
        built: dict[str, bytes] | None = build_tokenizer_files(files[origin], out, template)
    elif origin != start:
        raise ValueError(f"tokenizer.source: {origin!r} has no tokenizer files; choose a "
                         "model that has a tokenizer, or base / union")
    elif files[start]:
        built = dict(files[start])
        if template is not None:
            set_chat_template(built, template)
    else:
        built = None
        notes.append(f"{start!r} has no tokenizer files: the output has no tokenizer")
    for note in notes:
        _log.warning("vocabulary (%s): %s", policy, note)
    reindex = plan is not None and not plan.is_identity()
    key = uri = None
    if reindex:
        data = json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        key = hashlib.sha256(data).hexdigest()
        uri = storage.join(store_uri, "vocab", f"{key}.json")
        storage.write_bytes_atomic(uri, data)
    same = built is None or (origin == start and built == files[start])
    return {
        "policy": policy,
        "rows": plan.rows if plan is not None else None,
        "tensors": names if reindex else [],
        "key": key,
        "uri": uri,
        "tokenizer_uri": None if same else _write_tokenizer(built, store_uri),
        "appended": [t for t, _ in out.appended] if out is not None else [],
        "notes": notes,
    }


def _vocabs(inputs: Mapping[str, Checkpoint], files: Mapping[str, Mapping[str, bytes]],
            rows: Mapping[str, int], start: str, notes: list[str]) -> dict[str, ModelVocab]:
    """Every input's vocabulary, the start's first; a model without tokenizer.json shares
    the start's regular vocabulary (mergekit assumes the same)."""
    first = vocab_from_files(files[start], rows[start])
    if first is None:
        raise ValueError(
            f"tokenizer: {inputs[start].uri!r} ({start}) has no tokenizer.json, so its "
            "vocabulary cannot be read; save its tokenizer as a fast tokenizer "
            "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder)) or give "
            "another tokenizer source")
    vocabs = {start: first}
    for key in inputs:
        if key != start:
            vocabs[key] = vocab_from_files(files[key], rows[key], fallback=first)
            if TOKENIZER_JSON not in files[key]:
                notes.append(f"{key!r} has no tokenizer.json: its regular vocabulary is "
                             f"taken to be {start!r}'s, with its own added tokens")
    return vocabs


def _padded_vocab(inputs: Mapping[str, Checkpoint], files: Mapping[str, Mapping[str, bytes]],
                  rows: Mapping[str, int], start: str, total: int, notes: list[str]
                  ) -> OutputVocab | None:
    """pad_to_union's output tokenizer: the start's, plus the tokens that the models with
    more rows have at the extra ids (the same token at the same id in every model)."""
    first = vocab_from_files(files[start], rows[start])
    if first is None:
        notes.append(f"{start!r} has no tokenizer.json: its tokenizer files are copied "
                     f"unchanged for {total} rows")
        return None
    by_id: list[str | None] = [None] * (max(first.tokens.values(), default=-1) + 1)
    for tok, i in first.tokens.items():
        by_id[i] = tok
    extra: dict[int, tuple[str, Any, str]] = {}
    problems = []
    for key in inputs:
        if key == start or rows[key] <= rows[start]:
            continue
        vocab = vocab_from_files(files[key], rows[key], fallback=first)
        for tok, i in (vocab.tokens.items() if vocab else ()):
            if i < rows[start]:
                continue
            if i in extra and extra[i][0] != tok:
                problems.append(f"id {i} is {extra[i][0]!r} in {extra[i][2]!r} but {tok!r} "
                                f"in {key!r}")
            extra.setdefault(i, (tok, vocab.added.get(tok), key))
    appended = []
    for i in sorted(extra):
        if i != len(by_id) + len(appended):
            problems.append(f"token {extra[i][0]!r} has id {i} in {extra[i][2]!r} but the "
                            f"output tokenizer's next id is {len(by_id) + len(appended)}")
        appended.append(extra[i][:2])
    if problems:
        raise ValueError(
            "parameters.vocab_mismatch: pad_to_union merges rows by id, but the models' "
            "added tokens disagree: " + "; ".join(problems) + "; use tokenizer: {source: "
            "union} to merge rows by token instead")
    return OutputVocab(tuple(by_id) + tuple(t for t, _ in appended), start, tuple(appended))


def _write_tokenizer(files: Mapping[str, bytes], store_uri: str) -> str:
    """Write tokenizer files to ``{store}/tokenizers/KEY/`` (KEY: sha256 of names and
    bytes); returns the folder."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    folder = storage.join(store_uri, "tokenizers", digest.hexdigest())
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(folder, name), data)
    return folder


def load_vocab_plan(vocab: Mapping[str, Any]) -> VocabPlan:
    """The re-index plan of ``MergePlan.vocab`` (read from the store, checked by sha256).

    Raises:
        ValueError: the stored plan does not match its key (changed since planning).
    """
    data = storage.read_bytes(vocab["uri"])
    if hashlib.sha256(data).hexdigest() != vocab["key"]:
        raise ValueError(f"vocabulary plan {vocab['uri']!r} does not match its key "
                         f"{vocab['key']}; it changed since the merge was planned, plan again")
    return VocabPlan.from_dict(json.loads(data))


def check_family_with_policy(recipe: Recipe, reference: Checkpoint,
                             models: Mapping[str, Checkpoint]) -> None:
    """``check_family``, with the vocabulary rows left to the recipe's policy.

    With a policy, embedding and head rows may differ (everything else is checked);
    without one, a row difference is refused and the message names the policies.

    Raises:
        ValueError: every family problem (see ``dareflow.io.homology.check_family``).
    """
    if has_vocab_policy(recipe):
        names = reindexed_tensors(reference)
        rows = reference.info(names[0]).shape[0] if names else 0
        check_family(reference, rows_aligned(models, names, rows))
        return
    try:
        check_family(reference, models)
    except ValueError as e:
        if rows_differ(reference, models):
            raise ValueError(f"{e}\n  To merge them anyway: {VOCAB_FIX}") from None
        raise


def unit_vocab_key(vocab: Mapping[str, Any] | None, tensors: tuple[str, ...] | list[str]
                   ) -> str | None:
    """The re-index plan's key when the unit holds a re-indexed tensor (it enters the
    unit's cache key), else None."""
    if vocab and vocab.get("key") and set(tensors) & set(vocab["tensors"]):
        return vocab["key"]
    return None
