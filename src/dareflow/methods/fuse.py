"""Fusion of (sparsified) deltas: linear, task arithmetic and TIES consensus.

Pure functions on lists of equally shaped float32 tensors (other float dtypes are
upcast). Sums run in list order with one float32 accumulator, so peak memory is
one extra tensor rather than a stack of K, and the result is deterministic.

TIES (Yadav et al., "TIES-Merging", NeurIPS 2023, arXiv 2306.01708) consensus,
after the trim (see :mod:`dareflow.methods.sparsify`):

* ``# elect sign``, :func:`elect_sign`, named variants:

  ===============  ==========================================  =======================================
  mode             elected sign of entry j                     matches
  ===============  ==========================================  =======================================
  ``sum``          sgn(Σ_k δ_kj), weights ignored              TIES paper and MergeLM; peft ``total``
                                                               (peft elects on the unweighted deltas)
  ``weighted_sum`` sgn(Σ_k w_k δ_kj)                            mergekit ``consensus_method: sum`` (it
                                                               elects on weighted deltas)
  ``count``        sgn(Σ_k sgn(w_k δ_kj))                       mergekit ``count``; peft ``frequency``
                                                               (unweighted signs; equal when all w > 0)
  ===============  ==========================================  =======================================

  A zero total elects +1, as mergekit and peft do (``>= 0``). The TIES paper and
  MergeLM resolve zeros to the majority sign of the whole model, a global quantity
  a per-tensor pure function cannot see; an entry only sums to exactly zero when
  its nonzero deltas cancel exactly (or there are none, and the merge gives 0).

* ``# disjoint merge``, :func:`disjoint_merge`: model k *agrees* at entry j when its
  contribution ``w_k δ_kj`` is nonzero with the elected sign (trimmed or dropped
  zeros never agree). Named normalisations:

  ==========  ==========================================  =========================================
  mode        merged delta of entry j                     matches
  ==========  ==========================================  =========================================
  ``mean``    Σ_agree w_k δ_kj / #agree                   TIES paper and MergeLM (w = 1); peft
                                                          ``disjoint_merge`` (weighted numerator,
                                                          count denominator)
  ``weight``  Σ_agree w_k δ_kj / Σ_agree w_k              mergekit with ``normalize: true`` (its
                                                          ``ties`` default)
  ``sum``     Σ_agree w_k δ_kj                            mergekit with ``normalize: false`` (its
                                                          ``dare_ties`` default)
  ==========  ==========================================  =========================================

  An entry with no agreeing model gives 0, never NaN (denominator 0 → 1, as all
  three peers do).

Agreement uses the sign of ``w_k δ_kj`` (mergekit's convention). With all weights
> 0 (the normal case) this is the sign of δ_kj, so every variant above matches its
peer exactly; peft differs only for a zero weight (it counts such a model in the
``mean`` denominator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

__all__ = [
    "WEIGHT_SUM_EPS",
    "DisjointMerge",
    "SignElection",
    "delta_divisor",
    "disjoint_merge",
    "elect_sign",
    "linear",
    "task_arithmetic",
    "ties_consensus",
]

SignElection = Literal["sum", "weighted_sum", "count"]
DisjointMerge = Literal["mean", "weight", "sum"]

_SIGN_ELECTIONS: tuple[str, ...] = get_args(SignElection)
_DISJOINT_MERGES: tuple[str, ...] = get_args(DisjointMerge)

#: A weight sum below this in magnitude divides by 1 instead (mergekit's guard when it
#: normalises deltas without consensus), so weights such as [1, -1] with normalize
#: still merge (to Σ w δ).
WEIGHT_SUM_EPS = 1e-8


def _check_tensors(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], what: str
) -> list[torch.Tensor]:
    if len(tensors) == 0:
        raise ValueError(f"{what}: need at least one tensor, got none")
    if len(weights) != len(tensors):
        raise ValueError(
            f"{what}: got {len(tensors)} tensors but {len(weights)} weights; give one weight per model"
        )
    shape = tensors[0].shape
    out = []
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{what}: tensor {index} must be a floating-point torch.Tensor")
        if tensor.shape != shape:
            raise ValueError(
                f"{what}: tensor {index} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        out.append(tensor.to(torch.float32))
    return out


def _weighted_sum(tensors: list[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    # Plain multiply then add (no fused add-with-alpha): each elementwise op is
    # rounded once, identically on every CPU, so results are bitwise portable.
    total = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        total.add_(tensor * float(weight))
    return total


def _weight_total(weights: Sequence[float], what: str) -> float:
    total = float(sum(float(w) for w in weights))
    if total == 0.0:
        raise ValueError(
            f"{what}: weights {list(weights)} sum to 0, cannot normalize; "
            "set normalize to false or change the weights"
        )
    return total


def delta_divisor(weights: Sequence[float]) -> float:
    """The divisor of a normalised weighted sum of deltas: ``Σ w``, or 1 where
    ``|Σ w| < 1e-8`` (:data:`WEIGHT_SUM_EPS`, mergekit's guard)."""
    total = float(sum(float(w) for w in weights))
    return 1.0 if abs(total) < WEIGHT_SUM_EPS else total


def linear(
    thetas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """Weighted average of whole parameters: ``Σ_k w_k θ_k / Σ_k w_k``.

    Model soups (Wortsman et al. 2022, arXiv 2203.05482); mergekit ``linear``
    (``normalize: true`` by default). With ``normalize=False`` returns ``Σ w θ``.
    The DARE paper's "average merging" is the unweighted case.

    Args:
        thetas: K tensors of the same shape.
        weights: K weights.
        normalize: Divide by ``Σ w``.

    Returns:
        float32 tensor of the common shape.

    Raises:
        ValueError: On mismatched counts/shapes, or ``Σ w = 0`` with normalize.
    """
    thetas = _check_tensors(thetas, weights, "linear")
    merged = _weighted_sum(thetas, weights)
    if normalize:
        merged = merged / _weight_total(weights, "linear")
    return merged


def task_arithmetic(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Task arithmetic: ``θ_base + λ Σ_k w_k δ_k`` (``/ Σ_k w_k`` when normalize).

    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv
    2212.04089; mergekit ``task_arithmetic`` (``normalize: false`` default, its
    ``lambda`` is our ``scale``). With normalize, ``|Σ w| < 1e-8`` divides by 1
    (:func:`delta_divisor`, as mergekit).

    Args:
        base: The base parameter, shape S.
        deltas: K (sparsified) deltas of shape S.
        weights: K weights.
        scale: λ, applied after the (normalized) sum.
        normalize: Divide the weighted sum by ``Σ w``.

    Returns:
        float32 tensor of shape S.
    """
    deltas = _check_tensors(deltas, weights, "task_arithmetic")
    (base,) = _check_tensors([base], [1.0], "task_arithmetic base")
    if base.shape != deltas[0].shape:
        raise ValueError(
            f"task_arithmetic: base has shape {tuple(base.shape)}, deltas {tuple(deltas[0].shape)}"
        )
    merged = _weighted_sum(deltas, weights)
    if normalize:
        merged = merged / delta_divisor(weights)
    return base + scale * merged


def elect_sign(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], mode: SignElection = "sum"
) -> torch.Tensor:
    """TIES step 2, elect sign: the consensus sign of every entry.

    Args:
        deltas: K trimmed/sparsified deltas of shape S.
        weights: K weights (ignored by ``"sum"``, the paper's rule).
        mode: ``"sum"`` (paper, peft ``total``), ``"weighted_sum"`` (mergekit
            ``sum``) or ``"count"`` (mergekit ``count``, peft ``frequency``).
            See the module docstring for the exact peer mapping.

    Returns:
        float32 tensor of shape S with values in {+1, −1}; a zero total gives +1.
    """
    if mode not in _SIGN_ELECTIONS:
        raise ValueError(f"sign_election must be one of {list(_SIGN_ELECTIONS)}, got {mode!r}")
    deltas = _check_tensors(deltas, weights, "elect_sign")
    # elect sign
    if mode == "sum":
        total = _weighted_sum(deltas, [1.0] * len(deltas))
    elif mode == "weighted_sum":
        total = _weighted_sum(deltas, weights)
    else:
        total = torch.zeros_like(deltas[0])
        for delta, weight in zip(deltas, weights):
            total.add_(torch.sign(delta * float(weight)))
    return torch.where(total >= 0, 1.0, -1.0).to(torch.float32)


def disjoint_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    sign: torch.Tensor,
    mode: DisjointMerge = "mean",
) -> torch.Tensor:
    """TIES step 3, disjoint merge: combine only the contributions that agree.

    Args:
        deltas: K trimmed/sparsified deltas of shape S.
        weights: K weights.
        sign: Elected sign from :func:`elect_sign`, shape S, values ±1.
        mode: ``"mean"`` (paper, peft), ``"weight"`` (mergekit normalize=true)
            or ``"sum"`` (mergekit normalize=false).

    Returns:
        float32 merged delta of shape S (0 where no model agrees).
    """
    if mode not in _DISJOINT_MERGES:
        raise ValueError(f"disjoint_merge must be one of {list(_DISJOINT_MERGES)}, got {mode!r}")
    deltas = _check_tensors(deltas, weights, "disjoint_merge")
    if sign.shape != deltas[0].shape:
        raise ValueError(
            f"disjoint_merge: sign has shape {tuple(sign.shape)}, deltas {tuple(deltas[0].shape)}"
        )
    sign = sign.to(torch.float32)
    # disjoint merge
    merged = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        contribution = delta * float(weight)
        agree = (contribution * sign) > 0
        merged.add_(torch.where(agree, contribution, 0.0))
        if mode == "mean":
            denominator.add_(agree.to(torch.float32))
        elif mode == "weight":
            denominator.add_(agree.to(torch.float32) * float(weight))
    if mode == "sum":
        return merged
    denominator = torch.where(denominator == 0, 1.0, denominator)
    return merged / denominator


def ties_consensus(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    sign_election: SignElection = "sum",
    disjoint: DisjointMerge = "mean",
) -> torch.Tensor:
    """TIES consensus on already trimmed deltas: elect sign, then disjoint merge.

    Returns:
        float32 merged delta (add ``λ ·`` it to the base yourself).
    """
    sign = elect_sign(deltas, weights, sign_election)
    return disjoint_merge(deltas, weights, sign, disjoint)
