"""Delta statistics of a fine-tuned model against its base, and the DARE applicability gate.

DARE works when the delta ``δ = θ_ft − θ_base`` is an SFT delta: small and redundant
(the paper, §4.6 and Table 6: |δ| mostly within 0.002–0.005). A model whose delta
includes continued pre-training (WizardCoder-Python measured against Llama-2 instead of
CodeLlama-Python) has large deltas, and dropping 90 % of them destroys it. These
statistics say which case a pair is in, before anything is merged.

Per tensor and overall:

* percentiles of δ at 0 %, 10 %, …, 100 % (the paper's Table 6), and the 99th percentile
  of |δ| (what the gate reads);
* max |δ|; relative norm ‖δ‖₂ / ‖θ_base‖₂;
* fraction of |δ| above 0.002 and 0.005 (the paper's SFT band);
* fraction of exact zeros (a source that is itself a DARE merge has ~p of them; an SFT
  without weight decay has zeros in rows it never touched).

Streaming: tensors are read one at a time through ``dareflow.io.checkpoints.Checkpoint``; peak
memory is one tensor of each model in float32 plus its delta.

Exactness and error bounds:

* Per-tensor statistics are exact (numpy selection over the whole tensor), unless a
  ``per_tensor_sample`` is asked for (the gate): then the percentiles, max, fractions
  and norms are estimated from ``n`` elements read as a few contiguous windows at keyed
  positions (deterministic: the same pair gives the same numbers on every machine).
* Overall percentiles pool a Bernoulli subsample of every tensor with one inclusion rate
  ``r = min(1, overall_sample / total elements)``, keyed per tensor like the DARE masks,
  so the pool is a uniform sample of all elements. With ``n`` pooled elements the
  Dvoretzky–Kiefer–Wolfowitz inequality bounds the rank error of every reported
  percentile at once: ``P(sup |F̂ − F| > ε) ≤ 2 exp(−2 n ε²)``; ``rank_error_bound(n)``
  gives ε at 99.9 % confidence (n = 10⁶: ε = 0.0019, i.e. the reported 10 % point lies
  between the true 9.81 % and 10.19 % points). When ``r = 1`` the pool is every element
  and the overall percentiles are exact. Overall max |δ|, norms and fractions are
  always exact sums over all (read) elements.

No Prefect here: ``tasks/experiments.py`` wraps the gate for the merge flow.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from dareflow.io import buffers, storage
from dareflow.io.checkpoints import Checkpoint
from dareflow.methods.masks import derive_key, keep_mask
from dareflow.recipe import GateConfig

#: Percentiles of δ reported, as in the paper's Table 6.
PERCENTILES: tuple[int, ...] = tuple(range(0, 101, 10))
#: |δ| thresholds of the paper's SFT band (§4.6).
THRESHOLDS: tuple[float, ...] = (0.002, 0.005)
#: Default size of the pooled sample behind the overall percentiles.
DEFAULT_OVERALL_SAMPLE = 1_000_000
#: Windows a per-tensor sample is read as (one ranged read each).
SAMPLE_WINDOWS = 16
#: Model id under which sample positions are keyed (never a real model id).
_SAMPLE_DOMAIN = "dareflow/delta_stats/sample"
#: Methods the gate applies to by default: those that drop deltas at random.
DARE_METHODS: tuple[str, ...] = ("dare_linear", "dare_ties")


@dataclass(frozen=True)
class TensorDeltaStats:
    """Statistics of one tensor's delta (or of all tensors: ``name == "(all)"``).

    Attributes:
        name: Tensor name.
        numel: Elements of the tensor (all tensors, for the overall row).
        sampled: Elements the percentiles were computed on (``== numel``: exact).
        percentiles: δ at ``PERCENTILES`` (signed, float32 values as float).
        abs_p99: 99th percentile of |δ|.
        max_abs: max |δ| over the elements read.
        delta_sq: Σ δ² over the elements read (scaled to ``numel`` when sampled).
        base_sq: Σ θ_base² likewise.
        above: ``{threshold: fraction of |δ| > threshold}`` for ``THRESHOLDS``.
        zero_fraction: Fraction of δ exactly 0.
    """

    name: str
    numel: int
    sampled: int
    percentiles: tuple[float, ...]
    abs_p99: float
    max_abs: float
    delta_sq: float
    base_sq: float
    above: dict[float, float]
    zero_fraction: float

    @property
    def relative_norm(self) -> float:
        """‖δ‖₂ / ‖θ_base‖₂ (inf when the base tensor is all zeros and δ is not)."""
        if self.base_sq == 0:
            return 0.0 if self.delta_sq == 0 else math.inf
        return math.sqrt(self.delta_sq / self.base_sq)

    @property
    def exact(self) -> bool:
        """Whether the percentiles used every element."""
        return self.sampled == self.numel

    def row(self) -> dict[str, Any]:
        """One flat table row (column names as printed by ``dareflow inspect``)."""
        out: dict[str, Any] = {"tensor": self.name, "numel": self.numel, "sampled": self.sampled}
        out.update({f"p{q}": v for q, v in zip(PERCENTILES, self.percentiles)})
        out.update(abs_p99=self.abs_p99, max_abs=self.max_abs, rel_norm=self.relative_norm)
        out.update({f"frac>{t}": self.above[t] for t in THRESHOLDS})
        out["zero_frac"] = self.zero_fraction
        return out


@dataclass
class DeltaStats:
    """Delta statistics of one fine-tuned model against one base.

    Attributes:
        base_uri, finetuned_uri: The two checkpoints.
        tensors: Per-tensor statistics, in checkpoint order.
        overall: Statistics over every compared element (``name == "(all)"``).
        skipped: ``(tensor, reason)`` for tensors not compared (integer buffers,
            shape mismatch, missing in the fine-tune).
        rank_error: DKW bound (99.9 %) on the rank error of the overall percentiles;
            0 when they are exact.
    """

    base_uri: str
    finetuned_uri: str
    tensors: list[TensorDeltaStats]
    overall: TensorDeltaStats
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rank_error: float = 0.0

    def to_frame(self):
        """A pandas DataFrame: one row per tensor, then the ``(all)`` row."""
        import pandas as pd  # heavy: pandas (~0.3 s), only when a table is asked for

        return pd.DataFrame([t.row() for t in self.tensors] + [self.overall.row()])

    def worst(self, k: int = 3, key: str = "rel_norm") -> list[TensorDeltaStats]:
        """The ``k`` tensors with the largest ``key`` (``rel_norm`` or ``abs_p99``)."""
        score = (lambda t: t.relative_norm) if key == "rel_norm" else (lambda t: t.abs_p99)
        return sorted(self.tensors, key=score, reverse=True)[:k]


# ------------------------------------------------------------------------- pure math


def rank_error_bound(n: int, confidence: float = 0.999) -> float:
    """DKW bound ε: with probability ``confidence`` every empirical percentile of an
    i.i.d. sample of size ``n`` is within ε (in rank, a fraction) of the true one."""
    if n < 1:
        raise ValueError(f"sample size must be >= 1, got {n}")
    return math.sqrt(math.log(2 / (1 - confidence)) / (2 * n))


def _quantiles(values: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    # Linear interpolation between order statistics (numpy's default, = torch.quantile);
    # numpy selects (O(n)) instead of sorting and has no 16M-element limit.
    return np.quantile(values, np.asarray(qs, dtype=np.float64), method="linear")


def _accumulate(delta: torch.Tensor, base: torch.Tensor) -> dict[str, float]:
    """Exact sums over float32 ``delta`` and ``base`` (same shape); sums in float64."""
    absd = delta.abs()
    return {
        "max_abs": float(absd.max()) if delta.numel() else 0.0,
        "delta_sq": float(delta.double().square().sum()),
        "base_sq": float(base.double().square().sum()),
        **{f"above{t}": int((absd > t).sum()) for t in THRESHOLDS},
        "zeros": int((delta == 0).sum()),
    }


def _from_parts(name: str, numel: int, values: np.ndarray, sums: dict[str, float],
                read: int) -> TensorDeltaStats:
    """Build stats from the δ values the percentiles use and the sums over ``read``
    elements (scaled to ``numel`` when only a sample was read)."""
    scale = numel / read if read else 0.0
    if values.size:
        pct = _quantiles(values, [q / 100 for q in PERCENTILES])
        abs_p99 = float(_quantiles(np.abs(values), [0.99])[0])
    else:
        pct, abs_p99 = np.zeros(len(PERCENTILES)), 0.0
    return TensorDeltaStats(
        name=name,
        numel=numel,
        sampled=int(values.size),
        percentiles=tuple(float(v) for v in pct),
        abs_p99=abs_p99,
        max_abs=sums["max_abs"],
        delta_sq=sums["delta_sq"] * scale,
        base_sq=sums["base_sq"] * scale,
        above={t: sums[f"above{t}"] / read if read else 0.0 for t in THRESHOLDS},
        zero_fraction=sums["zeros"] / read if read else 0.0,
    )


def tensor_delta_stats(name: str, base: torch.Tensor, finetuned: torch.Tensor) -> TensorDeltaStats:
    """Exact statistics of ``δ = finetuned − base`` for one tensor.

    Args:
        name: Tensor name (recorded).
        base, finetuned: Same shape, any float dtype (computed in float32).

    Returns:
        Exact statistics (``sampled == numel``).

    Raises:
        ValueError: the shapes differ.
    """
    if base.shape != finetuned.shape:
        raise ValueError(
            f"tensor {name!r}: base shape {tuple(base.shape)} != fine-tuned shape "
            f"{tuple(finetuned.shape)}; statistics need homologous tensors"
        )
    base32 = base.to(torch.float32)
    delta = finetuned.to(torch.float32) - base32
    sums = _accumulate(delta, base32)
    return _from_parts(name, delta.numel(), delta.flatten().numpy(), sums, delta.numel())


def _weighted_overall(numel: int, values: np.ndarray, weights: np.ndarray,
                      sums: dict[str, float], read: int) -> TensorDeltaStats:
    """Overall row from per-tensor samples of unequal rates: weighted percentiles
    (inverted CDF), so a small tensor read whole does not outweigh a large one."""
    stats = _from_parts("(all)", numel, values, sums, read)
    pct = np.quantile(values, [q / 100 for q in PERCENTILES], weights=weights,
                      method="inverted_cdf")
    p99 = np.quantile(np.abs(values), [0.99], weights=weights, method="inverted_cdf")
    return replace(stats, percentiles=tuple(float(v) for v in pct), abs_p99=float(p99[0]))


# --------------------------------------------------------------------- checkpoint IO


def _window_starts(name: str, numel: int, windows: int, width: int, seed: int) -> list[int]:
    """Start offsets (elements) of ``windows`` non-overlapping windows of ``width``,
    one per equal stretch of the tensor, at a keyed position inside it."""
    rng = np.random.Generator(np.random.Philox(key=derive_key(seed, _SAMPLE_DOMAIN, name)))
    stretch = numel // windows
    return [i * stretch + int(rng.integers(0, stretch - width + 1)) for i in range(windows)]


def read_sample(ckpt: Checkpoint, name: str, n: int, *, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` elements of tensor ``name`` as a flat tensor, read as
    ``SAMPLE_WINDOWS`` contiguous windows (one ranged read each) at keyed positions.

    The positions depend only on ``(seed, name, numel, n)``, so the same elements are
    read from the base and the fine-tune. Tensors with at most ``n`` elements are read
    whole.
    """
    info = ckpt.info(name)
    if info.numel <= n:
        return ckpt.read(name).flatten()
    width = max(1, n // SAMPLE_WINDOWS)
    itemsize = info.nbytes // info.numel
    ranges = [(info.start + start * itemsize, info.start + (start + width) * itemsize)
              for start in _window_starts(name, info.numel, SAMPLE_WINDOWS, width, seed)]
    raw = buffers.read_ranges(info.file, ranges, **ckpt.storage_options)
    if any(len(part) != end - begin for part, (begin, end) in zip(raw, ranges)):
        raise ValueError(f"{info.file!r} ends inside tensor {name!r} (truncated since it was "
                         "opened); download it again")
    return torch.frombuffer(bytearray(b"".join(raw)), dtype=info.torch_dtype)


def _compared(base: Checkpoint, ft: Checkpoint) -> tuple[list[str], list[tuple[str, str]]]:
    names, skipped = [], []
    for name, info in base.tensors.items():
        if not info.is_floating_point:
            skipped.append((name, f"dtype {info.dtype} is not floating point"))
        elif name not in ft:
            skipped.append((name, "missing in the fine-tuned model"))
        elif ft.info(name).shape != info.shape:
            why = f"shape {info.shape} in the base but {ft.info(name).shape} in the fine-tuned model"
            skipped.append((name, why))
        else:
            names.append(name)
    return names, skipped


def delta_stats(
    base_uri: str,
    finetuned_uri: str,
    *,
    overall_sample: int = DEFAULT_OVERALL_SAMPLE,
    per_tensor_sample: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> DeltaStats:
    """Delta statistics of a fine-tuned checkpoint against a base, tensor by tensor.

    Args:
        base_uri, finetuned_uri: Checkpoint folders (any fsspec URI).
        overall_sample: Size of the pooled uniform sample behind the overall
            percentiles (every element when the model is smaller).
        per_tensor_sample: None for exact per-tensor statistics; else read only this
            many elements per tensor (``read_sample``), for a cheap estimate (the gate).
        seed: Keys the sample positions (a fixed default: same numbers everywhere).
        progress: Called with one line per tensor.

    Returns:
        The statistics (see ``DeltaStats``).

    Raises:
        FileNotFoundError: a checkpoint is missing.
        ValueError: no floating-point tensor is shared by the two checkpoints, or a
            sample size is < 1.
    """
    if overall_sample < 1 or (per_tensor_sample is not None and per_tensor_sample < 1):
        raise ValueError(
            f"sample sizes must be >= 1, got overall_sample={overall_sample}, "
            f"per_tensor_sample={per_tensor_sample}"
        )
    base, ft = Checkpoint.open(base_uri), Checkpoint.open(finetuned_uri)
    names, skipped = _compared(base, ft)
    if not names:
        raise ValueError(
            f"{finetuned_uri!r} and {base_uri!r} share no floating-point tensor of the same "
            "shape; pass a fine-tuned model and the base it was fine-tuned from"
        )
    total = sum(base.info(n).numel for n in names)
    rate = min(1.0, overall_sample / total)
    per_tensor: list[TensorDeltaStats] = []
    # exact sums over the elements read; *_sq scaled per tensor to its numel
    totals = {"max_abs": 0.0, "delta_sq": 0.0, "base_sq": 0.0, "zeros": 0,
              **{f"above{t}": 0 for t in THRESHOLDS}}
    pooled: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for i, name in enumerate(names):
        numel = base.info(name).numel
        if per_tensor_sample is None:
            b, f = base.read(name).flatten(), ft.read(name).flatten()
        else:
            b = read_sample(base, name, per_tensor_sample, seed=seed)
            f = read_sample(ft, name, per_tensor_sample, seed=seed)
        b32 = b.to(torch.float32)
        delta = f.to(torch.float32) - b32
        del b, f
        sums = _accumulate(delta, b32)
        values = delta.numpy()
        per_tensor.append(_from_parts(name, numel, values, sums, delta.numel()))
        totals["max_abs"] = max(totals["max_abs"], sums["max_abs"])
        for k in totals:
            if k != "max_abs":  # scaled to the whole tensor when only a sample was read
                totals[k] += sums[k] * (numel / delta.numel())
        if rate < 1.0:
            keep = keep_mask(delta.shape, 1.0 - rate, derive_key(seed, _SAMPLE_DOMAIN, name))
            values = values[keep.numpy()]
        pooled.append(values.copy())
        # each pooled value stands for numel / read elements of its tensor
        weights.append(np.full(values.size, numel / delta.numel(), dtype=np.float64))
        del delta, b32
        if progress is not None:
            progress(f"[{i + 1}/{len(names)}] {name}")
    pool = np.concatenate(pooled)
    # totals are already per whole tensor: "read" = total
    if per_tensor_sample is None:
        overall = _from_parts("(all)", total, pool, totals, total)
    else:
        overall = _weighted_overall(total, pool, np.concatenate(weights), totals, total)
    exact_overall = rate >= 1.0 and per_tensor_sample is None
    return DeltaStats(base_uri, finetuned_uri, per_tensor, overall, skipped,
                      0.0 if exact_overall else rank_error_bound(max(1, pool.size)))


# ------------------------------------------------------------------------------ gate


@dataclass(frozen=True)
class GateVerdict:
    """Outcome of the applicability gate for one fine-tuned model.

    Attributes:
        model: Model id as written in the recipe.
        passed: Whether the deltas look like SFT deltas.
        abs_p99: Overall 99th percentile of |δ| (estimated).
        relative_norm: Overall ‖δ‖ / ‖θ_base‖ (estimated).
        message: Empty when passed; else what is wrong, the worst tensors and the fix.
    """

    model: str
    passed: bool
    abs_p99: float
    relative_norm: float
    message: str = ""


def gate_verdict(model: str, base_model: str, stats: DeltaStats, *, max_abs_delta_p99: float,
                 max_relative_norm: float, declared_base: str | None = None) -> GateVerdict:
    """Judge whether DARE applies to ``model``'s deltas against ``base_model``.

    Fails when the overall 99th percentile of |δ| exceeds ``max_abs_delta_p99`` or the
    overall relative norm exceeds ``max_relative_norm``; the message names the worst
    tensors and suggests the likely right base.
    """
    o = stats.overall
    problems = []
    if o.abs_p99 > max_abs_delta_p99:
        problems.append(f"99th percentile of |delta| is {o.abs_p99:.4g} > "
                        f"max_abs_delta_p99 {max_abs_delta_p99:g}")
    if o.relative_norm > max_relative_norm:
        problems.append(f"||delta|| / ||base|| is {o.relative_norm:.4g} > "
                        f"max_relative_norm {max_relative_norm:g}")
    if not problems:
        return GateVerdict(model, True, o.abs_p99, o.relative_norm)
    worst = ", ".join(f"{t.name} (rel norm {t.relative_norm:.3g}, |delta| p99 {t.abs_p99:.3g})"
                      for t in stats.worst(3))
    hint = (f" Its own files name {declared_base!r} as its base: merge against that."
            if declared_base and declared_base != base_model else "")
    message = (
        f"DARE does not apply to '{model}' measured against base '{base_model}': "
        f"{'; '.join(problems)} (SFT deltas are mostly within 0.002-0.005, the DARE paper "
        f"§4.6). Worst tensors: {worst}. This looks like continued pre-training or a "
        f"different base: merge '{model}' against the model it was fine-tuned from, not "
        f"against '{base_model}'.{hint} To merge anyway set "
        "gate: {mode: warn} (or off) in the recipe; see "
        f"`dareflow inspect {base_model} {model}`."
    )
    return GateVerdict(model, False, o.abs_p99, o.relative_norm, message)


def declared_base(model_uri: str) -> str | None:
    """The base a model folder declares: ``base_model:`` in its README front matter
    (Hub model cards), else None. Reads one small file; never raises on its absence."""
    try:
        text = storage.read_bytes(storage.join(model_uri, "README.md")).decode("utf-8", "replace")
    except (FileNotFoundError, ValueError, OSError):
        return None
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    for line in front.splitlines():
        if line.startswith("base_model:"):
            value = line.split(":", 1)[1].strip().strip("'\"")
            return value or None
    return None


# ---------------------------------------------------------------------- reporting


def format_table(stats: DeltaStats, *, max_rows: int | None = 40) -> str:
    """The statistics as a fixed-width text table (per tensor, then ``(all)``)."""
    head = ["tensor"] + [f"p{q}" for q in PERCENTILES] + ["|d|p99", "max|d|", "rel_norm",
                                                          ">0.002", ">0.005", "zeros"]
    rows = stats.tensors if max_rows is None else stats.worst(max_rows)
    rows = [t for t in stats.tensors if t in rows] + [stats.overall]
    width = max(len(t.name) for t in rows)
    lines = ["  ".join([f"{head[0]:<{width}}"] + [f"{h:>9}" for h in head[1:]])]
    for t in rows:
        cells = [f"{v:>9.5f}" for v in t.percentiles]
        cells += [f"{t.abs_p99:>9.5f}", f"{t.max_abs:>9.5f}", f"{t.relative_norm:>9.5f}"]
        cells += [f"{t.above[th]:>9.2%}" for th in THRESHOLDS] + [f"{t.zero_fraction:>9.2%}"]
        lines.append("  ".join([f"{t.name:<{width}}"] + cells))
    note = ("overall percentiles exact" if stats.rank_error == 0 else
            f"overall percentiles from a {stats.overall.sampled:,}-element uniform sample: "
            f"rank error <= {stats.rank_error:.4f} at 99.9 % (DKW)")
    if max_rows is not None and len(stats.tensors) > max_rows:
        note += f"; {max_rows} of {len(stats.tensors)} tensors shown (largest rel_norm)"
    if stats.skipped:
        note += f"; {len(stats.skipped)} tensor(s) skipped: " + ", ".join(
            f"{n} ({why})" for n, why in stats.skipped[:5])
    return "\n".join(lines + [note])


def plot_delta_stats(stats: DeltaStats, uri: str, *, title: str | None = None) -> str:
    """Save a PNG: overall percentiles of δ (Table 6 as a curve, with the ±0.002/0.005
    band) and the per-tensor relative norm and |δ| p99. Returns ``uri``."""
    # heavy: matplotlib (~0.5 s), only when plotting
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot picks its backend on import

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(PERCENTILES, stats.overall.percentiles, marker="o", label="all tensors")
    for t in THRESHOLDS:
        ax1.axhspan(-t, t, alpha=0.08 if t == THRESHOLDS[-1] else 0.12, color="green")
    ax1.set_xlabel("percentile (%)")
    ax1.set_ylabel("delta = finetuned - base")
    ax1.set_title("percentiles of delta (green: |delta| <= 0.002 / 0.005)")
    ax1.legend()
    x = np.arange(len(stats.tensors))
    ax2.bar(x, [t.relative_norm for t in stats.tensors], label="||delta|| / ||base||")
    ax2.plot(x, [t.abs_p99 for t in stats.tensors], "r.", label="|delta| p99")
    ax2.set_yscale("log")
    ax2.set_xlabel("tensor index (checkpoint order)")
    ax2.set_title("per tensor")
    ax2.legend()
    fig.suptitle(title or f"{stats.finetuned_uri} vs {stats.base_uri}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, uri)


def save_figure(fig: Any, uri: str) -> str:
    """Write a matplotlib figure as PNG to any store URI (atomically) and close it."""
    import matplotlib.pyplot as plt  # heavy: matplotlib (~0.5 s), only when plotting

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes_atomic(uri, buffer.getvalue())
    return uri


def models_to_gate(method: str, methods: Iterable[str]) -> bool:
    """Whether the gate applies to ``method`` (by default only DARE methods)."""
    return method in set(methods)


def check_gate(recipe: Any, base_uri: str | None, model_uris: dict[str, str]) -> list[GateVerdict]:
    """Run the applicability gate of a recipe (``dareflow.recipe.Recipe``) on its sources:
    :func:`measure_gate`, then :func:`enforce_gate`.

    Returns:
        One verdict per fine-tuned model (failures only warn in ``mode: warn``).

    Raises:
        ValueError: ``mode: refuse`` and a model fails; the message lists every failing
            model with its worst tensors and the fix.
    """
    verdicts = measure_gate(recipe, base_uri, model_uris)
    enforce_gate(recipe, verdicts)
    return verdicts


def measure_gate(recipe: Any, base_uri: str | None,
                 model_uris: dict[str, str]) -> list[GateVerdict]:
    """The gate's verdict on each fine-tune of a recipe, without acting on it.

    Skipped (returns ``[]``) when the gate is off or the recipe's method is not one it
    applies to (default: DARE methods). Reads ``gate.sample_elements`` elements per
    tensor of the base and of each fine-tune (``read_sample``).
    """
    gate = recipe.gate or GateConfig()
    if gate.mode == "off" or recipe.merge_method not in gate.methods or base_uri is None:
        return []
    verdicts = []
    for model_id, uri in model_uris.items():
        stats = delta_stats(base_uri, uri, per_tensor_sample=gate.sample_elements)
        verdicts.append(gate_verdict(
            model_id, recipe.base_model or base_uri, stats,
            max_abs_delta_p99=gate.max_abs_delta_p99,
            max_relative_norm=gate.max_relative_norm, declared_base=declared_base(uri),
        ))
    return verdicts


def enforce_gate(recipe: Any, verdicts: list[GateVerdict]) -> None:
    """Raise ValueError listing every failing model (its worst tensors and the fix) when
    the recipe's gate is in mode ``refuse``; nothing in modes ``warn`` and ``off``."""
    failed = [v for v in verdicts if not v.passed]
    if failed and (recipe.gate or GateConfig()).mode == "refuse":
        raise ValueError("\n".join(v.message for v in failed))
