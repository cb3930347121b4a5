"""Comparing a dareflow merge with mergekit's, tensor by tensor (pure functions).

Deterministic methods (linear, task_arithmetic, ties): every element within ``ulps``
float32 ulps of the largest operand at that element (the inputs aligned to the output,
and both outputs). Both tools compute in float32 here; a sum of a few float32 terms
rounds each step to half an ulp of a value no larger than the operands, so two correct
orders of operations differ by at most ~2 ulps of the operands. 4 ulps leaves room and
still catches any real difference: the smallest one that matters, a wrong weight on an
SFT delta (|delta| ~ 0.002 on operands ~ 0.02), is ~10^5 ulps. With an L1 rescale (ties
with ``rescale: true``), every kept delta is multiplied by sum|delta| / sum|kept delta|:
mergekit sums in float32 (relative error ~log2(n) 2^-24 for torch's blocked sums over n
elements), dareflow in float64, so the bound adds ``rescale_rel(n)`` x |merged delta|.

DARE methods (dare_linear, dare_ties): the masks are random in both tools, so per tensor
the kept fraction (merged delta != 0) and the sum of squares of the merged delta must
agree within ``sigmas`` standard deviations of the difference. The kept fraction's
deviation is binomial, sqrt(2 p (1 - p) / n); the sum of squares' is estimated from the
spread of the squared entries of each output (an upper bound on the mask-induced
variance: it also counts the spread of the deltas themselves).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

#: tensors indexed by token id (rows), in the Llama families of the parity run
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def f32_ulp(values: torch.Tensor) -> torch.Tensor:
    """The float32 spacing at |values| (2**(exponent - 23)); subnormal floor included."""
    magnitude = values.float().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - 23)


def align_rows(tensor: torch.Tensor, vocab: dict[str, int] | None,
               out_vocab: dict[str, int] | None, rows: int) -> torch.Tensor:
    """``tensor`` (rows = token ids of ``vocab``) in the output's token order.

    Returns ``[rows, ...]``: row ``i`` is the input's row of the token with output id
    ``i``; NaN where the input lacks that token or past the output vocabulary (padding).
    Without vocabularies the rows are taken as they are (NaN past the input's end).
    """
    out = torch.full((rows, *tensor.shape[1:]), float("nan"), dtype=torch.float32)
    if vocab is None or out_vocab is None:
        n = min(rows, tensor.shape[0])
        out[:n] = tensor[:n].float()
        return out
    pairs = [(new, vocab[tok]) for tok, new in out_vocab.items()
             if new < rows and tok in vocab and vocab[tok] < tensor.shape[0]]
    if pairs:
        new_ids, old_ids = (torch.tensor(x) for x in zip(*pairs))
        out[new_ids] = tensor[old_ids].float()
    return out


def rescale_rel(numel: int) -> float:
    """Relative rounding of a float32 L1 rescale factor over ``numel`` elements."""
    return math.log2(max(numel, 2)) * 2.0**-24


@dataclass
class Exact:
    """Deterministic agreement of two merged tensors (accumulates over tensors)."""

    ulps: float = 4.0
    elements: int = 0
    within: int = 0
    max_abs: float = 0.0
    max_ulps: float = 0.0
    worst: list[str] = field(default_factory=list)  # per failing tensor, a description

    def add(self, name: str, got: torch.Tensor, expected: torch.Tensor,
            operands: Sequence[torch.Tensor], delta: torch.Tensor | None = None,
            rel: float = 0.0) -> bool:
        """Compare ``got`` (dareflow) with ``expected`` (mergekit); ``operands`` are the
        inputs aligned to the output shape (NaN where undefined); ``rel`` x |``delta``|
        (mergekit's merged delta) is added to the bound. True if all within."""
        a, b = got.float(), expected.float()
        scale = torch.stack([a.abs(), b.abs(), *(o.float().abs() for o in operands)])
        scale = torch.nan_to_num(scale, nan=0.0).amax(dim=0)
        diff = (a - b).abs()
        diff = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(diff), diff)
        diff = torch.nan_to_num(diff, nan=math.inf)
        ulps = diff / f32_ulp(scale)
        bound = self.ulps * f32_ulp(scale)
        if delta is not None and rel:
            bound = bound + rel * torch.nan_to_num(delta.float().abs(), nan=0.0)
        ok = diff <= bound
        self.elements += a.numel()
        self.within += int(ok.sum())
        if a.numel():
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_ulps = max(self.max_ulps, float(ulps.max()))
        if bool(ok.all()):
            return True
        i = int(ulps.reshape(-1).argmax())
        self.worst.append(f"{name}: {int((~ok).sum())}/{a.numel()} elements off, worst at "
                          f"flat index {i}: dareflow {a.reshape(-1)[i].item():.9g}, mergekit "
                          f"{b.reshape(-1)[i].item():.9g}")
        return False

    @property
    def fraction(self) -> float:
        return self.within / self.elements if self.elements else float("nan")


def delta_ratio(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> float:
    """Median of (dareflow − base) / (mergekit − base) over entries where mergekit's
    delta is not tiny: 1 when the merged deltas agree, 0.5 when dareflow's is half."""
    d_got, d_exp = (got.float() - base.float()), (expected.float() - base.float())
    keep = torch.isfinite(d_exp) & (d_exp.abs() > 1e-6) & torch.isfinite(d_got)
    return float((d_got[keep] / d_exp[keep]).median()) if bool(keep.any()) else float("nan")


@dataclass
class TensorDare:
    """One tensor's DARE statistics in both outputs (rows with a defined base only)."""

    name: str
    n: int
    kept_df: float
    kept_mk: float
    ss_df: float  # sum of squares of the merged delta
    ss_mk: float
    var_df: float  # variance estimate of ss (n x sample variance of the squares)
    var_mk: float

    @property
    def kept_z(self) -> float:
        p = (self.kept_df + self.kept_mk) / 2
        sd = math.sqrt(2 * p * (1 - p) / self.n) if self.n else 0.0
        gap = abs(self.kept_df - self.kept_mk)
        return gap / sd if sd else (0.0 if gap == 0 else math.inf)

    @property
    def ss_z(self) -> float:
        sd = math.sqrt(self.var_df + self.var_mk)
        gap = abs(self.ss_df - self.ss_mk)
        return gap / sd if sd else (0.0 if gap == 0 else math.inf)


def dare_tensor(name: str, got: torch.Tensor, expected: torch.Tensor,
                base: torch.Tensor) -> TensorDare:
    """DARE statistics of one tensor; ``base`` aligned to the output (NaN rows, e.g. new
    tokens, are left out here and compared exactly by the caller)."""
    defined = torch.isfinite(base)
    y_df = (got.float() - base.float())[defined].double()
    y_mk = (expected.float() - base.float())[defined].double()
    n = y_df.numel()

    def stats(y: torch.Tensor) -> tuple[float, float, float]:
        sq = y * y
        var = float(sq.var(unbiased=True)) * n if n > 1 else 0.0
        return float((y != 0).double().mean()) if n else 0.0, float(sq.sum()), var

    k_df, s_df, v_df = stats(y_df)
    k_mk, s_mk, v_mk = stats(y_mk)
    return TensorDare(name, n, k_df, k_mk, s_df, s_mk, v_df, v_mk)


@dataclass
class DareSummary:
    """DARE agreement over the tensors of one case."""

    sigmas: float = 5.0
    tensors: list[TensorDare] = field(default_factory=list)

    def add(self, t: TensorDare) -> bool:
        self.tensors.append(t)
        return t.kept_z <= self.sigmas and t.ss_z <= self.sigmas

    def _total(self, attr: str) -> float:
        return sum(getattr(t, attr) for t in self.tensors)

    @property
    def kept_df(self) -> float:
        n = self._total("n")
        return sum(t.kept_df * t.n for t in self.tensors) / n if n else float("nan")

    @property
    def kept_mk(self) -> float:
        n = self._total("n")
        return sum(t.kept_mk * t.n for t in self.tensors) / n if n else float("nan")

    @property
    def norm_ratio(self) -> float:
        mk = self._total("ss_mk")
        return math.sqrt(self._total("ss_df") / mk) if mk else float("nan")

    @property
    def max_kept_z(self) -> float:
        return max((t.kept_z for t in self.tensors), default=0.0)

    @property
    def max_ss_z(self) -> float:
        return max((t.ss_z for t in self.tensors), default=0.0)

    @property
    def total_ss_z(self) -> float:
        sd = math.sqrt(self._total("var_df") + self._total("var_mk"))
        gap = abs(self._total("ss_df") - self._total("ss_mk"))
        return gap / sd if sd else 0.0

    @property
    def ok(self) -> bool:
        return (self.max_kept_z <= self.sigmas and self.max_ss_z <= self.sigmas
                and self.total_ss_z <= self.sigmas)

    def failing(self) -> list[str]:
        """One line per tensor outside the bounds."""
        return [f"{t.name}: kept {t.kept_df:.4f} vs mergekit {t.kept_mk:.4f} "
                f"({t.kept_z:.1f}σ), ||δ|| ratio {math.sqrt(t.ss_df / t.ss_mk) if t.ss_mk else math.nan:.3f} "
                f"({t.ss_z:.1f}σ)" for t in self.tensors
                if t.kept_z > self.sigmas or t.ss_z > self.sigmas]


def vocab_difference(got: dict[str, int], expected: dict[str, int], limit: int = 5) -> str:
    """Empty when the token -> id maps are equal; else what differs (a few examples)."""
    if got == expected:
        return ""
    only_got = sorted(set(got) - set(expected), key=got.get)[:limit]
    only_exp = sorted(set(expected) - set(got), key=expected.get)[:limit]
    moved = [t for t in expected if t in got and got[t] != expected[t]][:limit]
    parts = [f"{len(got)} vs mergekit's {len(expected)} tokens"]
    if only_exp:
        parts.append("missing " + ", ".join(f"{t!r}={expected[t]}" for t in only_exp))
    if only_got:
        parts.append("extra " + ", ".join(f"{t!r}={got[t]}" for t in only_got))
    if moved:
        parts.append("other ids " + ", ".join(f"{t!r} {got[t]} vs {expected[t]}"
                                              for t in moved))
    return "; ".join(parts)


#: a conversation rendered with both outputs' chat templates
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}]


def render_chat_template(template: str, add_generation_prompt: bool) -> str:
    """``CONVERSATION`` rendered as transformers renders chat templates (jinja2 with
    trim_blocks and lstrip_blocks)."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=CONVERSATION, add_generation_prompt=add_generation_prompt,
        bos_token="<s>", eos_token="</s>")


def chat_template_difference(got: str | None, expected: str | None) -> str:
    """Empty when both are unset or render ``CONVERSATION`` identically (with and without
    the generation prompt); else what differs."""
    if not got and not expected:
        return ""
    if not got or not expected:
        return f"{'set' if got else 'none'} vs mergekit's {'set' if expected else 'none'}"
    for prompt in (False, True):
        a, b = render_chat_template(got, prompt), render_chat_template(expected, prompt)
        if a != b:
            return (f"renders {a!r} vs mergekit's {b!r} (add_generation_prompt={prompt})")
    return ""


# ----------------------------------------------------------------------------- table


def format_table(rows: Sequence[dict[str, str]]) -> str:
    """A markdown table of the cases (keys: case, method, features, verdict, agreement,
    norm)."""
    header = ["case", "method", "features", "verdict", "agreement with mergekit",
              "‖δ‖ df/mk"]
    keys = ["case", "method", "features", "verdict", "agreement", "norm"]
    lines = [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"
            for line in lines]
    return "\n".join(out)
