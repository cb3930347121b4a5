"""The merge methods as a table of rows, the merge spec, and the per-tensor merge.

One generalised method (mergekit's "generalized task arithmetic" idea): a method is
a row saying which sparsification (none | magnitude | dare) and which consensus
(none | ties) it uses. :func:`merge_tensor` runs, for one tensor name:

    delta_k = θ_k − θ_base                       (float32; NaN/Inf rejected)
    # sparsify   δ̂_k = DARE / MP(delta_k)        (mask key = derive_key(seed, model_id, name))
    # elect sign + # disjoint merge  (ties rows)  or  Σ w_k δ̂_k (linear rows)
    θ = θ_base + λ · merged                       cast once to out_dtype

The DARE paper (Yu et al. 2023, arXiv 2311.03099) uses DARE as a plug-in in front of
task arithmetic / average merging (``dare_linear``) and TIES-Merging (``dare_ties``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from dareflow.errors import unknown_choice
from dareflow.methods.blockwise import NonFiniteInput, merge_blockwise, supports_blockwise
from dareflow.methods.fuse import (
    DisjointMerge,
    SignElection,
    disjoint_merge,
    elect_sign,
    linear,
    task_arithmetic,
)
from dareflow.methods.masks import derive_key
from dareflow.methods.sparsify import Rescale, dare, magnitude_prune

__all__ = [
    "MERGELM_TIES_TRIM",
    "METHODS",
    "MergeSpec",
    "MethodRow",
    "ModelParams",
    "get_method",
    "merge_tensor",
    "merge_tensor_reference",
]

Sparsification = Literal["none", "magnitude", "dare"]
Consensus = Literal["none", "ties"]

#: The TIES trim MergeLM (the DARE authors' code) applies after DARE in DARE+TIES
#: on its GLUE (encoder) experiments: its ``ties_merging`` trims
#: ``param_value_mask_rate`` (argparse default 0.8; the GLUE search reuses the best of
#: {0.7, 0.8, 0.9} found for plain TIES). Pass it as ``MergeSpec.trim_after_dare`` to
#: reproduce that script; the default is 0.0, mergekit's and peft's ``dare_ties`` (no
#: trim after DARE).
MERGELM_TIES_TRIM = 0.8

_RESCALES: tuple[str, ...] = get_args(Rescale)
_SIGN_ELECTIONS: tuple[str, ...] = get_args(SignElection)
_DISJOINT_MERGES: tuple[str, ...] = get_args(DisjointMerge)


@dataclass(frozen=True)
class MethodRow:
    """One merge method, as a row of the generalised method.

    Attributes:
        id: Method id as users know it from mergekit (plus ours).
        sparsification: ``"none"``, ``"magnitude"`` (top-k by |δ|) or ``"dare"``.
        consensus: ``"none"`` (weighted sum) or ``"ties"`` (elect sign + disjoint merge).
        needs_base: Whether a base model is required (all but ``linear``).
        default_normalize: Default of ``MergeSpec.normalize`` (divide by Σw);
            None for TIES rows, where ``MergeSpec.disjoint_merge`` decides.
        default_rescale: Default of ``MergeSpec.rescale``; None if the row does
            not sparsify.
        default_sign_election: Default of ``MergeSpec.sign_election`` (TIES rows;
            None for the others).
        default_disjoint_merge: Default of ``MergeSpec.disjoint_merge`` (TIES rows;
            None for the others).
        summary: One line on what it computes.
        reference: The paper.
        peer_notes: How mergekit / peft / MergeLM differ, per row.
    """

    id: str
    sparsification: Sparsification
    consensus: Consensus
    needs_base: bool
    default_normalize: bool | None
    default_rescale: Rescale | None
    summary: str
    reference: str
    peer_notes: str
    default_sign_election: SignElection | None = None
    default_disjoint_merge: DisjointMerge | None = None


_ROWS = (
    MethodRow(
        id="linear",
        sparsification="none",
        consensus="none",
        needs_base=False,
        default_normalize=True,
        default_rescale=None,
        summary="Σ w_k θ_k / Σ w_k (weighted average of whole parameters).",
        reference="Wortsman et al. 2022, Model soups, arXiv 2203.05482",
        peer_notes=(
            "mergekit linear (normalize: true default); MergeLM/DARE paper "
            "'average merging' is the unweighted case."
        ),
    ),
    MethodRow(
        id="task_arithmetic",
        sparsification="none",
        consensus="none",
        needs_base=True,
        default_normalize=False,
        default_rescale=None,
        summary="θ_base + λ Σ w_k δ_k.",
        reference="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv 2212.04089",
        peer_notes=(
            "mergekit task_arithmetic (normalize: false, lambda = our scale); "
            "peft task_arithmetic (no normalize); MergeLM task_arithmetic (w = 1)."
        ),
    ),
    MethodRow(
        id="ties",
        sparsification="magnitude",
        consensus="ties",
        needs_base=True,
        default_normalize=None,
        default_rescale="none",
        summary="trim (top-k |δ| per tensor) → elect sign → disjoint merge; θ_base + λ · merged.",
        reference="Yadav et al. 2023, TIES-Merging, arXiv 2306.01708",
        peer_notes=(
            "Defaults are mergekit's ties: weighted_sum election, 'weight' normalisation "
            "(normalize: true), no rescale, density 1 (no trim) unless set; with density "
            "it keeps int(density·n) per tensor. Paper/MergeLM: trim over the whole model "
            "(we trim per tensor, like mergekit and peft), unweighted sign sum ('sum'), "
            "mean over agreeing ('mean'). peft ties: unweighted election ('total') + mean."
        ),
        default_sign_election="weighted_sum",
        default_disjoint_merge="weight",
    ),
    MethodRow(
        id="dare_linear",
        sparsification="dare",
        consensus="none",
        needs_base=True,
        default_normalize=False,
        default_rescale="l1",
        summary="DARE each δ_k (drop p, rescale) → θ_base + λ Σ w_k δ̂_k.",
        reference="Yu et al. 2023, Language Models are Super Mario (DARE), arXiv 2311.03099",
        peer_notes=(
            "Defaults are mergekit's dare_linear: normalize false, rescale l1 (its "
            "rescale: true since 2025; 1/density before), density 1 unless set. The "
            "paper: rescale inverse (1/(1−p)); MergeLM: DARE + task_arithmetic, or + "
            "average merging (= normalize true, w = 1). peft dare_linear: 1/density, "
            "no normalize."
        ),
    ),
    MethodRow(
        id="dare_ties",
        sparsification="dare",
        consensus="ties",
        needs_base=True,
        default_normalize=None,
        default_rescale="l1",
        summary=(
            "DARE each δ_k → optional TIES trim (trim_after_dare) → elect sign → "
            "disjoint merge; θ_base + λ · merged."
        ),
        reference="Yu et al. 2023, Language Models are Super Mario (DARE), arXiv 2311.03099",
        peer_notes=(
            "Defaults are mergekit's dare_ties: no trim after DARE, weighted_sum "
            "election, normalize false ('sum'), rescale l1, density 1 unless set. "
            "MergeLM (GLUE): DARE then full ties_merging, i.e. a magnitude trim after "
            f"DARE (param_value_mask_rate, default {MERGELM_TIES_TRIM}) → set "
            "trim_after_dare, rescale inverse, 'sum' + 'mean'. peft dare_ties: no trim, "
            "1/density, 'total' + mean."
        ),
        default_sign_election="weighted_sum",
        default_disjoint_merge="sum",
    ),
    MethodRow(
        id="magnitude_linear",
        sparsification="magnitude",
        consensus="none",
        needs_base=True,
        default_normalize=False,
        default_rescale="none",
        summary="MP each δ_k (keep top-(1−p) |δ| by index) → θ_base + λ Σ w_k δ̂_k.",
        reference="Yu et al. 2023 (DARE), MP ablation, arXiv 2311.03099",
        peer_notes=(
            "Ours (the paper's MP ablation through task arithmetic); peft "
            "magnitude_prune is the same with floor(density·n) kept. MergeLM MP "
            "drops by threshold (|δ| <= k-th value), so ties drop more. (An "
            "MP + TIES row would be exactly 'ties'.)"
        ),
    ),
)

#: The methods table, by id.
METHODS: dict[str, MethodRow] = {row.id: row for row in _ROWS}


def get_method(name: str) -> MethodRow:
    """Looks a method up by id.

    Raises:
        KeyError: For an unknown id, with a "did you mean" and the choices.
    """
    if name in METHODS:
        return METHODS[name]
    raise KeyError(unknown_choice("merge method", name, METHODS))


@dataclass(frozen=True)
class ModelParams:
    """Per-model merge parameters.

    Attributes:
        model_id: The fine-tuned model's id (also seeds its DARE masks).
        weight: w_k (any finite number; a negative weight subtracts the delta and
            votes against it in a weighted sign election, as in mergekit).
        drop_rate: The sparsification rate p: DARE's drop rate, or the TIES / MP
            trim (= 1 − density). 0 for methods that do not sparsify.
        density: The density as the recipe gave it (mergekit's key), or None when
            it gave a drop rate. It only changes how many entries magnitude pruning
            keeps: ``int(density · n)`` as mergekit, instead of ``n − ⌊p · n⌋``
            (see :func:`~dareflow.methods.sparsify.magnitude_keep_count`). When
            set, ``drop_rate`` must be ``1 − density``.
    """

    model_id: str
    weight: float = 1.0
    drop_rate: float = 0.0
    density: float | None = None

    def __post_init__(self) -> None:
        problems = _model_problems(self)
        if problems:
            raise ValueError("invalid ModelParams: " + "; ".join(problems))


def _model_problems(model: ModelParams) -> list[str]:
    problems = []
    if not isinstance(model.model_id, str) or not model.model_id:
        problems.append(f"model_id must be a non-empty str, got {model.model_id!r}")
    label = f"model {model.model_id!r}"
    if not _is_real(model.weight) or not math.isfinite(model.weight):
        problems.append(f"{label}: weight must be a finite number, got {model.weight!r}")
    if not _is_real(model.drop_rate) or not (0.0 <= model.drop_rate <= 1.0):
        problems.append(
            f"{label}: drop_rate must be in [0, 1], got {model.drop_rate!r} "
            "(p is the fraction of delta parameters dropped; density = 1 - p)"
        )
    elif model.density is not None:
        if not _is_real(model.density) or not (0.0 <= model.density <= 1.0):
            problems.append(f"{label}: density must be in [0, 1] or None, got {model.density!r}")
        elif abs(model.drop_rate - (1.0 - model.density)) > 1e-9:
            problems.append(
                f"{label}: drop_rate {model.drop_rate!r} is not 1 - density "
                f"({model.density!r}); give drop_rate = 1 - density, or density=None"
            )
    return problems


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MergeSpec:
    """Everything that decides a merged tensor, besides the tensors themselves.

    Attributes:
        method: A key of :data:`METHODS`.
        models: One :class:`ModelParams` per fine-tuned model, in merge order.
        scale: λ, multiplies the merged delta (not for ``linear``).
        rescale: DARE/MP rescale (``"inverse"`` | ``"l1"`` | ``"none"``); None →
            the method's default (mergekit's: ``"l1"`` for DARE rows, ``"none"`` for
            magnitude rows). Must be None for rows that do not sparsify.
        normalize: Divide by Σw in linear-style rows; None → the row's default.
            Must be None for TIES rows (use ``disjoint_merge``).
        sign_election: TIES sign election (``"sum"`` | ``"weighted_sum"`` |
            ``"count"``); None → the row's default (mergekit's ``"weighted_sum"``).
            Must be None for rows without TIES consensus.
        disjoint_merge: TIES normalisation (``"mean"`` | ``"weight"`` | ``"sum"``);
            None → the row's default (mergekit's: ``"weight"`` for ties, ``"sum"``
            for dare_ties). Must be None for rows without TIES consensus.
        trim_after_dare: ``dare_ties`` only: a TIES magnitude trim (drop rate)
            applied to each DARE output. 0.0 (default) = mergekit/peft;
            :data:`MERGELM_TIES_TRIM` = the DARE authors' code.
        seed: The run seed of the DARE masks.
        out_dtype: dtype of the merged tensor (one cast at the end).

    Every problem is reported at once in a single ValueError.
    """

    method: str
    models: tuple[ModelParams, ...]
    scale: float = 1.0
    rescale: Rescale | None = None
    normalize: bool | None = None
    sign_election: SignElection | None = None
    disjoint_merge: DisjointMerge | None = None
    trim_after_dare: float = 0.0
    seed: int = 0
    out_dtype: torch.dtype = field(default=torch.float32)

    def __post_init__(self) -> None:
        if isinstance(self.models, list):
            object.__setattr__(self, "models", tuple(self.models))
        row = get_method(self.method)  # KeyError with "did you mean"
        problems = _spec_problems(self, row)
        if problems:
            raise ValueError(
                f"invalid merge spec for method {self.method!r}:\n  - " + "\n  - ".join(problems)
            )

    @property
    def row(self) -> MethodRow:
        """The method's row in :data:`METHODS`."""
        return METHODS[self.method]

    @property
    def resolved_rescale(self) -> Rescale | None:
        """The rescale actually used (None when the method does not sparsify)."""
        return self.row.default_rescale if self.rescale is None else self.rescale

    @property
    def resolved_normalize(self) -> bool | None:
        """Whether Σw normalisation is used (None for TIES rows)."""
        return self.row.default_normalize if self.normalize is None else self.normalize

    @property
    def resolved_sign_election(self) -> SignElection | None:
        """The sign election actually used (None without TIES consensus)."""
        if self.sign_election is None:
            return self.row.default_sign_election
        return self.sign_election

    @property
    def resolved_disjoint_merge(self) -> DisjointMerge | None:
        """The disjoint-merge normalisation actually used (None without TIES consensus)."""
        if self.disjoint_merge is None:
            return self.row.default_disjoint_merge
        return self.disjoint_merge


def _spec_problems(spec: MergeSpec, row: MethodRow) -> list[str]:
    problems: list[str] = []
    if not isinstance(spec.models, tuple) or len(spec.models) == 0:
        problems.append(f"models must be a non-empty tuple of ModelParams, got {spec.models!r}")
        return problems
    seen: set[str] = set()
    for model in spec.models:
        if not isinstance(model, ModelParams):
            problems.append(f"models must hold ModelParams, got {model!r}")
            continue
        if model.model_id in seen:
            problems.append(
                f"model_id {model.model_id!r} appears twice; ids seed the DARE masks and must be unique"
            )
        seen.add(model.model_id)
        if row.sparsification == "none" and model.drop_rate != 0:
            problems.append(
                f"model {model.model_id!r}: drop_rate {model.drop_rate!r} would be ignored, "
                f"method {row.id!r} does not sparsify; use a dare_* or ties method or set it to 0"
            )
    if not _is_real(spec.scale) or not math.isfinite(spec.scale):
        problems.append(f"scale must be a finite number, got {spec.scale!r}")
    elif row.id == "linear" and spec.scale != 1.0:
        problems.append(
            f"scale {spec.scale!r} would be ignored: 'linear' has no λ; use task_arithmetic"
        )
    if spec.rescale is not None:
        if spec.rescale not in _RESCALES:
            problems.append(f"rescale must be one of {list(_RESCALES)}, got {spec.rescale!r}")
        elif row.sparsification == "none":
            problems.append(
                f"rescale {spec.rescale!r} would be ignored: method {row.id!r} does not "
                "sparsify; leave rescale unset"
            )
    if spec.normalize is not None:
        if not isinstance(spec.normalize, bool):
            problems.append(f"normalize must be true, false or unset, got {spec.normalize!r}")
        elif row.consensus == "ties":
            problems.append(
                f"normalize would be ignored by {row.id!r}: TIES normalisation is "
                "disjoint_merge ('weight' = mergekit normalize: true, 'sum' = normalize: false, "
                "'mean' = paper)"
            )
    if spec.sign_election is None:
        pass
    elif spec.sign_election not in _SIGN_ELECTIONS:
        problems.append(
            f"sign_election must be one of {list(_SIGN_ELECTIONS)}, got {spec.sign_election!r}"
        )
    elif row.consensus != "ties":
        problems.append(
            f"sign_election {spec.sign_election!r} would be ignored: {row.id!r} has no TIES consensus"
        )
    if spec.disjoint_merge is None:
        pass
    elif spec.disjoint_merge not in _DISJOINT_MERGES:
        problems.append(
            f"disjoint_merge must be one of {list(_DISJOINT_MERGES)}, got {spec.disjoint_merge!r}"
        )
    elif row.consensus != "ties":
        problems.append(
            f"disjoint_merge {spec.disjoint_merge!r} would be ignored: {row.id!r} has no TIES consensus"
        )
    if not _is_real(spec.trim_after_dare) or not (0.0 <= spec.trim_after_dare <= 1.0):
        problems.append(
            f"trim_after_dare must be in [0, 1], got {spec.trim_after_dare!r} "
            "(the fraction of each DARE output trimmed by magnitude)"
        )
    elif spec.trim_after_dare != 0 and not (
        row.sparsification == "dare" and row.consensus == "ties"
    ):
        problems.append(
            f"trim_after_dare {spec.trim_after_dare!r} would be ignored: only dare_ties trims after DARE"
        )
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
        problems.append(f"seed must be an int, got {spec.seed!r}")
    if not isinstance(spec.out_dtype, torch.dtype) or not spec.out_dtype.is_floating_point:
        problems.append(f"out_dtype must be a floating torch.dtype, got {spec.out_dtype!r}")
    if not problems and not row.needs_base:
        # linear averages whole parameters: a zero Σw has no meaning (mergekit divides
        # by it and writes inf/NaN). Delta methods guard it instead (fuse.delta_divisor).
        normalize = row.default_normalize if spec.normalize is None else spec.normalize
        if normalize and sum(m.weight for m in spec.models) == 0:
            problems.append(
                f"weights {[m.weight for m in spec.models]} sum to 0, cannot normalize; "
                "set normalize to false or change the weights"
            )
    return problems


def _nonfinite_error(name: str, who: str, count: int, what: str) -> ValueError:
    return ValueError(
        f"tensor {name!r} of {who} has {count} NaN/Inf values in its {what}; "
        "check that checkpoint (a corrupt shard or an fp16 overflow) or leave the model out"
    )


def _check_inputs(
    name: str, base: torch.Tensor | None, finetuned: Sequence[torch.Tensor], spec: MergeSpec
) -> None:
    if len(finetuned) != len(spec.models):
        raise ValueError(
            f"tensor {name!r}: got {len(finetuned)} fine-tuned tensors for "
            f"{len(spec.models)} models in the spec; pass one per model, in spec order"
        )
    named = [("the base model", base)] if base is not None else []
    named += [(f"model {m.model_id!r}", t) for m, t in zip(spec.models, finetuned)]
    shape = named[0][1].shape
    for who, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"tensor {name!r} of {who} is a {type(tensor).__name__}, not a torch.Tensor"
            )
        if not tensor.is_floating_point():
            raise ValueError(
                f"tensor {name!r} of {who} has dtype {tensor.dtype}; only floating tensors are "
                "merged (copy integer buffers from the base model instead)"
            )
        if tensor.shape != shape:
            raise ValueError(
                f"tensor {name!r} of {who} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(shape)}; the models are not homologous for this tensor"
            )


def merge_tensor(
    name: str,
    base: torch.Tensor | None,
    finetuned: Sequence[torch.Tensor],
    spec: MergeSpec,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merges one tensor of K fine-tuned models according to ``spec``.

    Computes exactly :func:`merge_tensor_reference` (same bytes; see its docstring
    for the steps), blockwise in cache-sized pieces with buffers reused across
    blocks (:mod:`dareflow.methods.blockwise`): a few MB of extra memory instead of
    several float32 copies of the tensor, and no whole-tensor passes. Inputs may be
    read-only (e.g. memory-mapped checkpoint bytes) and on CUDA (DARE masks are
    drawn on the device, the same bits as on the CPU).

    Args:
        name: The tensor's checkpoint name.
        base: Base parameter of shape S (None only for ``linear``).
        finetuned: K tensors of shape S, in ``spec.models`` order.
        spec: The merge spec.
        out: Optional contiguous tensor of shape S and dtype ``spec.out_dtype`` to
            write the result into (e.g. a view into a shard buffer).

    Returns:
        Tensor of shape S and dtype ``spec.out_dtype``, on the inputs' device (``out``
        when given).

    Raises:
        ValueError: On a missing base, non-floating or mismatched tensors, or
            NaN/Inf values (naming the tensor and the model).
    """
    row = spec.row
    if row.needs_base and base is None:
        raise ValueError(
            f"tensor {name!r}: method {row.id!r} needs the base model's tensor, got None"
        )
    _check_inputs(name, base if row.needs_base else None, finetuned, spec)
    if out is not None and (out.shape != finetuned[0].shape or out.dtype != spec.out_dtype
                            or not out.is_contiguous()):
        raise ValueError(
            f"tensor {name!r}: out must be contiguous with shape {tuple(finetuned[0].shape)} "
            f"and dtype {spec.out_dtype}, got {tuple(out.shape)} {out.dtype}"
        )
    if supports_blockwise(spec, base if row.needs_base else None):
        try:
            return merge_blockwise(name, base if row.needs_base else None, finetuned, spec,
                                   out=out)
        except NonFiniteInput:
            pass  # the reference path raises the error that names the model
    merged = merge_tensor_reference(name, base, finetuned, spec)
    if out is None:
        return merged
    return out.copy_(merged)


def merge_tensor_reference(
    name: str,
    base: torch.Tensor | None,
    finetuned: Sequence[torch.Tensor],
    spec: MergeSpec,
) -> torch.Tensor:
    """Merges one tensor of K fine-tuned models according to ``spec`` (reference).

    Whole-tensor float32 code that reads like the papers; :func:`merge_tensor` runs
    the same math blockwise and must match it byte for byte.

    Steps: upcast to float32; ``δ_k = θ_k − θ_base``; ``# sparsify`` each δ_k with
    mask key ``derive_key(spec.seed, model_id, name)`` (so the result depends on the
    name, never on call order); fuse per the method row (weighted sum, or
    ``# elect sign`` + ``# disjoint merge``); ``θ_base + λ · merged``; one cast to
    ``spec.out_dtype``. ``linear`` uses no base (``base`` may be None).

    Args:
        name: The tensor's checkpoint name.
        base: Base parameter of shape S (None only for ``linear``).
        finetuned: K tensors of shape S, in ``spec.models`` order.
        spec: The merge spec.

    Returns:
        Tensor of shape S and dtype ``spec.out_dtype``.

    Raises:
        ValueError: On a missing base, non-floating or mismatched tensors, or
            NaN/Inf values (naming the tensor and the model).
    """
    row = spec.row
    if row.needs_base and base is None:
        raise ValueError(
            f"tensor {name!r}: method {row.id!r} needs the base model's tensor, got None"
        )
    if not row.needs_base:
        base = None  # linear ignores the base
    _check_inputs(name, base, finetuned, spec)
    weights = [m.weight for m in spec.models]

    if not row.needs_base:
        thetas = [t.to(torch.float32) for t in finetuned]
        for model, theta in zip(spec.models, thetas):
            bad = int((~torch.isfinite(theta)).sum().item())
            if bad:
                raise _nonfinite_error(name, f"model {model.model_id!r}", bad, "weights")
        return linear(thetas, weights, normalize=bool(spec.resolved_normalize)).to(spec.out_dtype)

    base32 = base.to(torch.float32)
    bad = int((~torch.isfinite(base32)).sum().item())
    if bad:
        raise _nonfinite_error(name, "the base model", bad, "weights")
    deltas = []
    for model, theta in zip(spec.models, finetuned):
        delta = theta.to(torch.float32) - base32
        bad = int((~torch.isfinite(delta)).sum().item())
        if bad:
            raise _nonfinite_error(name, f"model {model.model_id!r}", bad, "delta")
        # sparsify
        if row.sparsification == "dare":
            key = derive_key(spec.seed, model.model_id, name)
            delta = dare(delta, model.drop_rate, key, rescale=spec.resolved_rescale)
            if spec.trim_after_dare > 0:
                delta = magnitude_prune(delta, spec.trim_after_dare, rescale="none")
        elif row.sparsification == "magnitude":
            delta = magnitude_prune(delta, model.drop_rate, rescale=spec.resolved_rescale,
                                    density=model.density)
        deltas.append(delta)

    if row.consensus == "ties":
        # elect sign
        sign = elect_sign(deltas, weights, spec.resolved_sign_election)
        # disjoint merge
        merged_delta = disjoint_merge(deltas, weights, sign, spec.resolved_disjoint_merge)
        merged = base32 + spec.scale * merged_delta
    else:
        merged = task_arithmetic(
            base32, deltas, weights, scale=spec.scale, normalize=bool(spec.resolved_normalize)
        )
    return merged.to(spec.out_dtype)
