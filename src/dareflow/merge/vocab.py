"""Output vocabularies and the re-indexing of embedding rows: pure functions (torch, Python).

When the models of a merge have different vocabularies, every vocabulary-indexed tensor
(input embeddings, output head) of every model, the base included, is re-indexed to the
output vocabulary BEFORE merging: row ``i`` of every input then holds output token ``i``,
so deltas are taken token by token. Two policies:

- mergekit's tokenizer settings (``tokenizer:`` / ``tokenizer_source:``), as mergekit
  0.1.4 computes them (``tokenizer/build.py``, ``tokenizer/embed.py``):
  :func:`output_vocab` builds the output vocabulary (``union``: the base's ids kept, the
  other models' regular tokens appended in model order, then their added tokens, then the
  ``tokens:`` keys; ``base``; one model's) and :func:`reindex_plan` the per-model
  permutations and the row of a token a model lacks (in mergekit's order of checks: the
  ``tokens:`` setting; the only model that has it; zeros if none has it; the base's row;
  the mean of the rows of the models that have it). Rows past the vocabulary (padding to
  ``pad_to_multiple_of``) are the mean of that model's re-indexed rows.
- the DARE authors' ``pad_to_union`` (MergeLM's ``smart_tokenizer_and_embedding_resize``):
  :func:`pad_to_union_plan`, every model with fewer rows than the largest gets rows equal
  to the mean of its own rows.

Where mergekit's order is a hash map's (``get_vocab()``), tokens are taken by id here, so
the output is the same on every run. A :class:`VocabPlan` is plain data: the plan step
writes it to the store as JSON and the unit tasks apply it with :func:`reindex`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Settings of an added token (as in ``tokenizers.AddedToken``).
ADDED_TOKEN_FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")

# Rows summed per step for a mean: float64 partial sums in a fixed order.
_MEAN_BLOCK = 1024


@dataclass(frozen=True)
class ModelVocab:
    """One model's tokenizer vocabulary, limited to its embedding rows.

    Attributes:
        tokens: Token -> id for every token with id < ``rows`` (regular and added).
        added: The added tokens among them, in id order -> their settings (the keys of
            ``ADDED_TOKEN_FLAGS``).
        rows: The model's embedding rows.
    """

    tokens: Mapping[str, int]
    added: Mapping[str, Mapping[str, bool]]
    rows: int


@dataclass(frozen=True)
class OutputVocab:
    """The output vocabulary and how the output tokenizer is made.

    Attributes:
        tokens: Output token by id (``None``: no token has this id).
        start: Key of the model whose tokenizer the output starts from.
        appended: Tokens added to that tokenizer, in id order, with their added-token
            settings (``None``: a plain added token, as ``add_tokens("tok")`` makes).
    """

    tokens: tuple[str | None, ...]
    start: str
    appended: tuple[tuple[str, Mapping[str, bool] | None], ...] = ()


@dataclass(frozen=True)
class VocabPlan:
    """How each input's vocabulary-indexed tensors become output rows.

    Attributes:
        rows: Output rows (the output config's ``vocab_size``).
        perms: Input key -> old id per output row ``i < len(perm)``; ``-1`` means the
            row is ``fill[i]``. Rows ``len(perm) .. rows-1`` are the mean of rows
            ``0 .. len(perm)-1`` of that input's re-indexed matrix.
        input_rows: Input key -> its rows (checked when the tensors are read).
        fill: Output id -> the row of a model that lacks the token (or every model, for a
            forced token): ``("zero",)``, ``("row", key, old_id)`` or
            ``("mean", ((key, old_id), ...))``.
    """

    rows: int
    perms: Mapping[str, tuple[int, ...]]
    input_rows: Mapping[str, int]
    fill: Mapping[int, tuple[Any, ...]] = field(default_factory=dict)

    def is_identity(self) -> bool:
        """True when re-indexing changes nothing (every input keeps its rows)."""
        return not self.fill and all(
            rows == self.rows and len(self.perms[key]) == rows
            and all(p == i for i, p in enumerate(self.perms[key]))
            for key, rows in self.input_rows.items()
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; permutations as runs ``[first_old_id or -1, length]``."""
        return {
            "rows": self.rows,
            "input_rows": dict(self.input_rows),
            "perms": {key: _runs(perm) for key, perm in self.perms.items()},
            "fill": {str(i): _spec_to_json(spec) for i, spec in sorted(self.fill.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VocabPlan:
        return cls(
            rows=int(data["rows"]),
            input_rows={k: int(v) for k, v in data["input_rows"].items()},
            perms={key: _unruns(runs) for key, runs in data["perms"].items()},
            fill={int(i): _spec_from_json(spec) for i, spec in data["fill"].items()},
        )


def _runs(perm: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for p in perm:
        if runs and ((p == -1 and runs[-1][0] == -1)
                     or (p != -1 and runs[-1][0] != -1 and runs[-1][0] + runs[-1][1] == p)):
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return runs


def _unruns(runs: Sequence[Sequence[int]]) -> tuple[int, ...]:
    out: list[int] = []
    for first, length in runs:
        out += [-1] * length if first == -1 else range(first, first + length)
    return tuple(out)


def _spec_to_json(spec: tuple[Any, ...]) -> list[Any]:
    if spec[0] == "mean":
        return ["mean", [list(pair) for pair in spec[1]]]
    return list(spec)


def _spec_from_json(spec: Sequence[Any]) -> tuple[Any, ...]:
    if spec[0] == "mean":
        return ("mean", tuple((str(k), int(i)) for k, i in spec[1]))
    if spec[0] == "row":
        return ("row", str(spec[1]), int(spec[2]))
    return ("zero",)


# --------------------------------------------------------------------------- vocabularies


def _by_id(tokens: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(tokens.items(), key=lambda item: item[1])


def output_vocab(source: str, vocabs: Mapping[str, ModelVocab], base_key: str,
                 extra_tokens: Sequence[str] = ()) -> OutputVocab:
    """The output vocabulary of mergekit's ``tokenizer.source``.

    Args:
        source: ``"union"``, ``"base"`` or the key of one model in ``vocabs``.
        vocabs: Every input's vocabulary, base first, then the models in recipe order
            (the order tokens are appended in).
        base_key: The key of the tokenizer "base" (the base model, or the first model
            when the merge has none).
        extra_tokens: The ``tokens:`` keys; those not in the vocabulary are appended.

    Returns:
        The vocabulary: the start tokenizer's ids are kept; ``union`` appends every
        other model's regular tokens (model by model, by id), then all models' added
        tokens (the first model's settings win), then ``extra_tokens``.
    """
    start = base_key if source in ("union", "base") else source
    first = vocabs[start]
    size = max(first.tokens.values(), default=-1) + 1
    by_id: list[str | None] = [None] * size
    for tok, i in first.tokens.items():
        by_id[i] = tok
    present = set(first.tokens)
    appended: list[tuple[str, Mapping[str, bool] | None]] = []
    if source == "union":
        for key, vocab in vocabs.items():
            if key == start:
                continue
            for tok, _ in _by_id(vocab.tokens):
                if tok not in vocab.added and tok not in present:
                    appended.append((tok, None))
                    present.add(tok)
        for vocab in vocabs.values():
            for tok, settings in vocab.added.items():
                if tok not in present:
                    appended.append((tok, dict(settings)))
                    present.add(tok)
    for tok in extra_tokens:
        if tok not in present:
            appended.append((tok, None))
            present.add(tok)
    return OutputVocab(tuple(by_id) + tuple(t for t, _ in appended), start, tuple(appended))


def reindex_plan(out: OutputVocab, vocabs: Mapping[str, ModelVocab], base_key: str | None,
                 token_settings: Mapping[str, Mapping[str, Any]] | None = None,
                 pad_to_multiple_of: int | None = None) -> tuple[VocabPlan, list[str]]:
    """Permutations and fill rows that re-index every input to ``out`` (mergekit's rules).

    Args:
        out: The output vocabulary (``output_vocab``).
        vocabs: Every input's vocabulary by key (base and models).
        base_key: The base model's key, or ``None`` when the merge has no base.
        token_settings: mergekit's ``tokenizer.tokens``: token -> ``{"source": None |
            key | {"kind": "zero"} | {"kind": "model_token", "model": key, "token": str
            | None, "token_id": int | None}, "force": bool}`` (model refs as keys).
        pad_to_multiple_of: Round the output rows up to a multiple of this.

    Returns:
        ``(plan, notes)``: notes name the tokens no model has (their rows are zeros).

    Raises:
        ValueError: listing every ``tokens:`` setting that names a token or id a model
            does not have.
    """
    settings = dict(token_settings or {})
    n = len(out.tokens)
    rows = n if not pad_to_multiple_of else math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of
    perms = {key: tuple(-1 if tok is None else vocab.tokens.get(tok, -1) for tok in out.tokens)
             for key, vocab in vocabs.items()}
    forced = {tok for tok, s in settings.items() if s.get("force")}
    problems: list[str] = []
    notes: list[str] = []
    fill: dict[int, tuple[Any, ...]] = {}
    for i, tok in enumerate(out.tokens):
        if tok not in forced and all(perm[i] >= 0 for perm in perms.values()):
            continue
        if tok is not None and tok in forced:
            for key, perm in perms.items():
                perms[key] = perm[:i] + (-1,) + perm[i + 1:]
        fill[i] = _default_row(i, tok, vocabs, base_key, settings.get(tok or "", {}),
                               problems, notes)
    if problems:
        raise ValueError("tokenizer.tokens: " + "; ".join(problems))
    return VocabPlan(rows, perms, {k: v.rows for k, v in vocabs.items()}, fill), notes


def _default_row(i: int, tok: str | None, vocabs: Mapping[str, ModelVocab],
                 base_key: str | None, setting: Mapping[str, Any], problems: list[str],
                 notes: list[str]) -> tuple[Any, ...]:
    """The row of output token ``tok`` for an input that lacks it (or for every input,
    when it is forced), in mergekit's order of checks."""
    source = setting.get("source")
    if isinstance(source, Mapping) and source.get("kind") == "zero":
        return ("zero",)
    if isinstance(source, Mapping) and source.get("kind") == "model_token":
        model, vocab = source["model"], vocabs[source["model"]]
        if source.get("token_id") is not None:
            token_id = int(source["token_id"])
            if token_id >= vocab.rows:
                problems.append(f"{tok!r}: token_id {token_id} is out of range for "
                                f"{model!r} ({vocab.rows} rows); give an id below {vocab.rows}")
            return ("row", model, token_id)
        if source["token"] not in vocab.tokens:
            problems.append(f"{tok!r}: {model!r} has no token {source['token']!r}; name a "
                            "token of its vocabulary or give token_id")
            return ("zero",)
        return ("row", model, vocab.tokens[source["token"]])
    if isinstance(source, str):
        if tok not in vocabs[source].tokens:
            problems.append(f"{tok!r}: source {source!r} has no such token; name a model "
                            "that has it, or use {kind: model_token, model, token}")
            return ("zero",)
        return ("row", source, vocabs[source].tokens[tok])
    holders = [key for key, vocab in vocabs.items() if tok is not None and tok in vocab.tokens]
    if len(holders) == 1:
        return ("row", holders[0], vocabs[holders[0]].tokens[tok])
    if not holders:
        notes.append(f"no model has token {tok!r} (id {i}): its row is zeros")
        return ("zero",)
    if base_key is not None and base_key in holders:
        return ("row", base_key, vocabs[base_key].tokens[tok])
    return ("mean", tuple((key, vocabs[key].tokens[tok]) for key in holders))


def pad_to_union_plan(input_rows: Mapping[str, int]) -> VocabPlan:
    """The DARE authors' policy: every input keeps its rows; one with fewer rows than the
    largest gets the missing rows, each equal to the mean of its own rows.

    Args:
        input_rows: Input key -> embedding rows.
    """
    rows = max(input_rows.values())
    return VocabPlan(rows, {k: tuple(range(r)) for k, r in input_rows.items()},
                     dict(input_rows))


# --------------------------------------------------------------------------- re-indexing


def mean_rows(rows: torch.Tensor) -> torch.Tensor:
    """The mean of ``rows`` ``[n, *rest]`` over dim 0: float64 sums over fixed blocks of
    rows, rounded once to float32 ``[*rest]`` (the same bits on every run)."""
    total = torch.zeros(rows.shape[1:], dtype=torch.float64)
    for start in range(0, rows.shape[0], _MEAN_BLOCK):
        total += rows[start:start + _MEAN_BLOCK].to(torch.float64).sum(0)
    return (total / max(rows.shape[0], 1)).to(torch.float32)


def _fill_row(spec: tuple[Any, ...], tensors: Mapping[str, torch.Tensor],
              rest: tuple[int, ...]) -> torch.Tensor:
    if spec[0] == "zero":
        return torch.zeros(rest, dtype=torch.float32)
    if spec[0] == "row":
        return tensors[spec[1]][spec[2]].to(torch.float32)
    return mean_rows(torch.stack([tensors[key][i] for key, i in spec[1]]))


def reindex(plan: VocabPlan, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-index one vocabulary-indexed tensor of every input to the output vocabulary.

    Args:
        plan: The plan of the merge.
        tensors: Input key -> its tensor ``[input_rows[key], *rest]`` (any float dtype);
            every key of the plan's fill rows must be present.

    Returns:
        Input key -> float32 ``[plan.rows, *rest]``: its own row for every token it has
        (unless forced), the fill row otherwise, and the mean of those rows past the
        permutation (padding). An input whose rows the plan keeps as they are is
        returned itself (no float32 copy of a large embedding).

    Raises:
        ValueError: a tensor's rows differ from the plan's, or a fill row names an input
            that is not given.
    """
    for key, t in tensors.items():
        if key not in plan.perms or t.shape[0] != plan.input_rows[key]:
            raise ValueError(
                f"vocabulary plan: input {key!r} has {t.shape[0]} rows but the plan expects "
                f"{plan.input_rows.get(key)}; the checkpoint changed since the merge was "
                "planned, plan it again")
    rest = tuple(next(iter(tensors.values())).shape[1:])
    try:
        fill = {i: _fill_row(spec, tensors, rest) for i, spec in plan.fill.items()}
    except KeyError as e:
        raise ValueError(f"vocabulary plan: a fill row needs input {e}, which was not "
                         "given") from None
    out = {}
    for key, t in tensors.items():
        perm = torch.tensor(plan.perms[key], dtype=torch.long)
        n, own = perm.numel(), t.shape[0]
        # own rows kept in place (pad_to_union; union for the base): one copy, no gather
        in_place = n >= own and torch.equal(perm[:own], torch.arange(own))
        if in_place and n == own == plan.rows:
            out[key] = t
            continue
        matrix = torch.empty((plan.rows, *rest), dtype=torch.float32)
        if in_place:
            matrix[:own].copy_(t)
        else:
            have = (perm >= 0).nonzero().flatten()
            matrix.index_copy_(0, have, t.index_select(0, perm[have]).to(torch.float32))
        missing = (perm < 0).nonzero().flatten()
        if missing.numel():
            matrix.index_copy_(0, missing, torch.stack([fill[int(i)] for i in missing]))
        if plan.rows > n:
            matrix[n:] = mean_rows(matrix[:n])
        out[key] = matrix
    return out
