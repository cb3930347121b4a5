"""Recipes for both tools, output comparisons and the results table (pure helpers)."""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

#: The merges of the benchmark. For each: the mergekit config keys, and the dareflow
#: variant options that make dareflow compute what mergekit computes (see the peer
#: notes in src/dareflow/methods/table.py and configs/examples/dare_ties_as_mergekit.yaml).
MERGES: dict[str, dict] = {
    "dare_ties": {
        "density": 0.5,
        "dareflow": {"sign_election": "weighted_sum", "disjoint_merge": "sum",
                     "trim_after_dare": 0.0, "rescale": "l1"},
    },
    "dare_linear": {"density": 0.5, "dareflow": {"rescale": "l1", "normalize": False}},
    "task_arithmetic": {"density": None, "dareflow": {}},
    "ties": {"density": 0.5, "dareflow": {"sign_election": "weighted_sum",
                                          "disjoint_merge": "weight"}},
}
WEIGHT = 0.5


def _models(paths: Sequence[str], density: float | None) -> list[dict]:
    params: dict = {"weight": WEIGHT}
    if density is not None:
        params["density"] = density
    return [{"model": p, "parameters": dict(params)} for p in paths]


def dareflow_recipe(method: str, base: str, fine_tunes: Sequence[str]) -> dict:
    """The dareflow recipe of one benchmark merge (mergekit-equivalent variant)."""
    merge = MERGES[method]
    recipe = {"merge_method": method, "base_model": base,
              "models": _models(fine_tunes, merge["density"]), "dtype": "bfloat16"}
    if merge["dareflow"]:
        recipe["parameters"] = dict(merge["dareflow"])
    return recipe


def mergekit_config(method: str, base: str, fine_tunes: Sequence[str]) -> dict:
    """The mergekit config of the same merge (its defaults for everything else)."""
    merge = MERGES[method]
    return {"merge_method": method, "base_model": base,
            "models": [{"model": base}] + _models(fine_tunes, merge["density"]),
            "dtype": "bfloat16"}


# ----------------------------------------------------------------------------- compare


def bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at |values| (2**(exponent - 7)); subnormal floor included."""
    magnitude = values.float().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - 7)


@dataclass
class Agreement:
    """How close two merged tensors are, element by element.

    "Within bf16 rounding": ``|a − b| <= 2 ulp`` of the largest operand (base or a
    fine-tune) at that entry. mergekit rounds its deltas and sums to bf16 on the way,
    so its error scales with the operands, not with the (possibly cancelled) result.
    """

    elements: int = 0
    within: int = 0
    max_ulps: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, operands: Sequence[torch.Tensor]) -> None:
        scale = torch.stack([o.float().abs() for o in operands]).amax(dim=0)
        ulps = (a.float() - b.float()).abs() / bf16_ulp(scale)
        self.elements += a.numel()
        self.within += int((ulps <= 2.0).sum())
        self.max_ulps = max(self.max_ulps, float(ulps.max()) if a.numel() else 0.0)

    @property
    def fraction(self) -> float:
        return self.within / self.elements if self.elements else float("nan")


@dataclass
class DareStats:
    """Statistics of a DARE merge against its inputs.

    ``changed``: fraction of entries where the merge differs from the base (DARE
    dropped every model's delta elsewhere, or the consensus zeroed it). ``slope``:
    least-squares slope of (merged − base) on Σ_k w_k δ_k: E[δ̂] = δ makes it ≈ 1 for
    dare_linear; both tools must agree within sampling error.
    """

    n: int = 0
    changed: int = 0
    xy: float = 0.0
    xx: float = 0.0
    yy: float = 0.0

    def add(self, base: torch.Tensor, merged: torch.Tensor, fine_tunes: Sequence[torch.Tensor],
            weights: Sequence[float]) -> None:
        b = base.float()
        y = merged.float() - b
        x = sum(w * (f.float() - b) for f, w in zip(fine_tunes, weights))
        self.n += y.numel()
        self.changed += int((y != 0).sum())
        self.xy += float((x.double() * y.double()).sum())
        self.xx += float((x.double() ** 2).sum())
        self.yy += float((y.double() ** 2).sum())

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.n if self.n else float("nan")

    @property
    def slope(self) -> float:
        return self.xy / self.xx if self.xx else float("nan")

    def changed_sigma(self) -> float:
        p = self.changed_fraction
        return math.sqrt(max(p * (1 - p), 1e-12) / max(self.n, 1))

    def slope_sigma(self) -> float:
        # residual scale over the regressor's energy (ordinary least squares)
        if not self.xx or self.n < 2:
            return float("nan")
        residual = max(self.yy - self.slope**2 * self.xx, 0.0) / (self.n - 1)
        return math.sqrt(residual / self.xx)


def dare_agrees(a: DareStats, b: DareStats, sigmas: float = 5.0) -> tuple[bool, str]:
    """Whether two DARE merges agree in kept fraction and E[δ̂] (``sigmas`` bounds)."""
    d_changed = abs(a.changed_fraction - b.changed_fraction)
    s_changed = math.hypot(a.changed_sigma(), b.changed_sigma())
    d_slope = abs(a.slope - b.slope)
    s_slope = math.hypot(a.slope_sigma(), b.slope_sigma())
    ok = d_changed <= sigmas * s_changed and d_slope <= sigmas * s_slope
    text = (f"changed {a.changed_fraction:.5f} vs {b.changed_fraction:.5f} "
            f"(|Δ| {d_changed / s_changed:.1f}σ), slope {a.slope:.4f} vs {b.slope:.4f} "
            f"(|Δ| {d_slope / s_slope:.1f}σ)")
    return ok, text


# ----------------------------------------------------------------------------- phases

_STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| (.*)$")


def dareflow_phases(log_lines: Sequence[str], started: float, wall: float) -> dict[str, float]:
    """Where a ``dareflow merge`` run's wall time went, from its Prefect log.

    Phases (seconds): ``startup`` (process start to the flow's first log line:
    imports, Prefect client/server), ``gate+plan`` (sources, the DARE applicability
    gate, headers and the plan), ``merge`` (the unit tasks), ``finish`` (assemble,
    publish, exit). ``started`` is the launch time (epoch seconds, local clock).
    """
    day = time.localtime(started)
    midnight = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0, 0, 0, -1))
    marks: dict[str, float] = {}
    for line in log_lines:
        m = _STAMP.match(line)
        if not m:
            continue
        t = midnight + int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) - started
        if t < -3600:  # the log crossed midnight
            t += 86400
        text = m[4]
        if "Beginning flow run" in text:
            marks.setdefault("flow", t)
        elif "planned" in text and "units" in text:
            marks["planned"] = t
        elif "published merged model" in text:
            marks["published"] = t
    if not {"flow", "planned", "published"} <= set(marks):
        return {}
    return {"startup": marks["flow"], "gate+plan": marks["planned"] - marks["flow"],
            "merge": marks["published"] - marks["planned"],
            "finish": wall - marks["published"]}


# ----------------------------------------------------------------------------- table


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


#: What the table's two dareflow modes are (printed under it).
MODES_LEGEND = (
    "plain: `dareflow merge` as a user runs it, no Prefect server running (the command "
    "starts a temporary one; its process tree's memory includes that server, its CPU "
    "does not). server: the same command with PREFECT_API_URL naming a Prefect server "
    "started beforehand (how a team runs it).")


def format_table(rows: Sequence[Mapping[str, float]]) -> str:
    """The results table: one row per merge, medians over repeats.

    Each row has ``merge``, ``dareflow_wall`` (the plain command), ``dareflow_server_wall``
    (against a running server), ``mergekit_wall``, ``io_floor_wall`` (buffered write),
    ``direct_floor_wall`` (``O_DIRECT`` write, optional), ``dareflow_cpu``,
    ``mergekit_cpu``, ``dareflow_rss``, ``mergekit_rss``, ``dareflow_anon``,
    ``mergekit_anon`` (seconds, MiB; dareflow's of the plain command, or of the server
    mode where the plain one did not run); missing values print as —.
    """
    header = ["merge", "dareflow s plain / server", "mergekit s", "speedup plain / server",
              "IO floor s", "dareflow/floor plain / server", "direct floor s",
              "CPU s df/mk", "peak RSS MiB df/mk", "peak anon MiB df/mk"]
    lines = []
    nan = float("nan")

    def ratio(a: float | None, b: float | None, spec: str) -> str:
        return _fmt(a / b if a and b else nan, spec) + "x"

    for r in rows:
        df, server = r.get("dareflow_wall"), r.get("dareflow_server_wall")
        mk, floor = r.get("mergekit_wall"), r.get("io_floor_wall")
        lines.append([
            r["merge"], f"{_fmt(df, '.1f')} / {_fmt(server, '.1f')}", _fmt(mk, ".1f"),
            f"{ratio(mk, df, '.1f')} / {ratio(mk, server, '.1f')}",
            _fmt(floor, ".1f"), f"{ratio(df, floor, '.2f')} / {ratio(server, floor, '.2f')}",
            _fmt(r.get("direct_floor_wall"), ".1f"),
            f"{_fmt(r.get('dareflow_cpu'), '.1f')} / {_fmt(r.get('mergekit_cpu'), '.1f')}",
            f"{_fmt(r.get('dareflow_rss'), '.0f')} / {_fmt(r.get('mergekit_rss'), '.0f')}",
            f"{_fmt(r.get('dareflow_anon'), '.0f')} / {_fmt(r.get('mergekit_anon'), '.0f')}",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"
            for line in lines]
    return "\n".join(out)
