"""Parity with mergekit: a corpus of mergekit recipes merged by both tools, compared.

    python -m benchmarks.mergekit_parity                       # the whole corpus
    python -m benchmarks.mergekit_parity --cases '*ties*' 03_task_arithmetic
    python -m benchmarks.mergekit_parity --fresh               # rerun mergekit too

What it does (everything under ``.bench/parity/``, git-ignored):

1. Builds once the tiny float32 Llama family of ``benchmarks/parity_family.py`` (4 layers,
   hidden 64, vocab 128, fast BPE tokenizers; fine-tunes with SFT-sized deltas, one that
   adds two tokens, a tied-embeddings family).
2. Installs mergekit once into ``.bench/mergekit-venv`` (the performance benchmark's
   helper; mergekit is never a dependency of dareflow).
3. For every recipe in ``benchmarks/mergekit_corpus/`` (written as a mergekit user
   writes them, models named relative to the family folder): substitutes the model
   paths, runs ``mergekit-yaml --random-seed 0`` (on CPU; its output is cached by the
   recipe text, the mergekit version and the family) and ``dareflow merge`` (fresh
   store per script run, one Prefect server for all runs).
4. Compares the outputs (``benchmarks/parity_case.py``, bounds justified in
   ``benchmarks/parity_compare.py``): the same tensor names, shapes, dtypes,
   ``vocab_size`` and ``tie_word_embeddings``; the same token -> id map, added tokens and
   rendered chat template when a tokenizer is built; deterministic methods within 4
   float32 ulps of the operands on every element (plus the L1 rescale factor's float32
   rounding for ties with ``rescale: true``); DARE methods by kept fraction and sum of
   squares of the merged delta per tensor within 5 standard deviations, and rows of
   tokens the base lacks exactly (4 ulps) as for deterministic methods.
5. Prints a markdown table, writes it to ``.bench/parity/parity.md`` with the failure
   details, and exits 1 if any case fails.

A case whose header has ``# expect: both refuse`` passes when both tools refuse it.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks.merge_vs_mergekit import (
    BENCH,
    MERGEKIT_VENV,
    PrefectServer,
    dareflow_exe,
    ensure_mergekit,
    mergekit_version,
)
from benchmarks.parity_case import Verdict, compare_case, load_model
from benchmarks.parity_compare import format_table
from benchmarks.parity_family import MEMBERS, generate_parity_family

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "benchmarks" / "mergekit_corpus"
WORK = BENCH / "parity"


def log(*args: object) -> None:
    print(*args, flush=True)


# ----------------------------------------------------------------------------- corpus


@dataclass
class Case:
    """One corpus recipe."""

    name: str
    text: str  # the YAML as written (member names, not paths)
    data: dict
    expect_refusal: bool = False

    @property
    def method(self) -> str:
        return str(self.data.get("merge_method"))


def load_corpus(folder: Path = CORPUS, patterns: list[str] | None = None) -> list[Case]:
    """The corpus recipes, sorted by name; ``patterns``: fnmatch globs on the name."""
    cases = []
    for path in sorted(folder.glob("*.yaml")):
        if patterns and not any(fnmatch.fnmatch(path.stem, p) or p == path.stem
                                for p in patterns):
            continue
        text = path.read_text()
        expect = any(line.strip().lower() == "# expect: both refuse"
                     for line in text.splitlines())
        cases.append(Case(path.stem, text, yaml.safe_load(text), expect))
    return cases


def substitute(data, family: Path):
    """``data`` with every string that names a family member replaced by its folder."""
    if isinstance(data, dict):
        return {k: substitute(v, family) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute(v, family) for v in data]
    if isinstance(data, str) and data in MEMBERS:
        return str(family / data)
    return data


def referenced(data) -> list[str]:
    """Family members a recipe names, in order of first mention."""
    found: list[str] = []
    if isinstance(data, dict):
        for v in data.values():
            found += [m for m in referenced(v) if m not in found]
    elif isinstance(data, list):
        for v in data:
            found += [m for m in referenced(v) if m not in found]
    elif isinstance(data, str) and data in MEMBERS:
        found.append(data)
    return found


def features(data: dict) -> str:
    """What a recipe exercises, for the table."""
    out: list[str] = []
    params = [m.get("parameters") or {} for m in data.get("models", [])]
    top = data.get("parameters") or {}
    settings = [v for p in [*params, top] for v in p.values()]

    def has(value, kind: str) -> bool:
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return kind == "filter" or any(has(v.get("value"), kind) for v in value)
        if isinstance(value, list):
            return kind == "gradient"
        return kind == "negative" and isinstance(value, (int, float)) and value < 0

    for kind, label in (("gradient", "gradient"), ("filter", "filter"),
                        ("negative", "negative weight")):
        if any(has(v, kind) for v in settings):
            out.append(label)
    if data.get("base_model") in [m.get("model") for m in data.get("models", [])] \
            and data.get("merge_method") != "linear":
        out.append("base listed")
    if top:
        out.append("global " + ",".join(sorted(top)))
    block = data.get("tokenizer") or {}
    tok = data.get("tokenizer_source") or (block.get("source", "union") if block else None)
    if tok:
        out.append(f"tokenizer {tok}")
    if block.get("tokens"):
        out.append("tokens")
    if block.get("pad_to_multiple_of"):
        out.append(f"pad to {block['pad_to_multiple_of']}")
    if data.get("chat_template"):
        out.append(f"chat_template {data['chat_template']}")
    if any(m.startswith("tied-") for m in referenced(data)):
        out.append("tied")
    return "; ".join(out) or "—"


# ----------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    ok: bool
    out: Path
    reason: str = ""
    # a refusal with a message (dareflow's CLI: "error: ..."), not a crash
    clean_refusal: bool = False


def _reason(log_text: str) -> str:
    """The line of a failed run's log that says why (last error-looking line)."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if line.startswith("error:") and i + 1 < len(lines):
            return " ".join(lines[i:i + 3])[:300]
        if "Error" in line.split(":")[0] or line.startswith(("error", "RuntimeError")):
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]


def run_mergekit(case: Case, config: Path, version: str, family: Path) -> RunResult:
    """mergekit's output for a case, cached by (recipe text, mergekit version, family)."""
    key = hashlib.sha256(f"{config.read_text()}|{version}|{family.name}".encode()).hexdigest()
    folder = WORK / "mergekit" / f"{case.name}-{key[:12]}"
    out, log_path, failed = folder / "out", folder / "mergekit.log", folder / "FAILED"
    if failed.exists():
        return RunResult(False, out, _reason(log_path.read_text(errors="replace")))
    if (out / "config.json").exists():
        return RunResult(True, out)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cmd = [str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(config), str(out),
           "--random-seed", "0", "--quiet", "--no-cuda"]
    with open(log_path, "wb") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(WORK),
                            check=False).returncode
    if rc != 0:
        failed.write_text(str(rc))
        return RunResult(False, out, _reason(log_path.read_text(errors="replace")))
    return RunResult(True, out)


def run_dareflow(case: Case, config: Path, env: dict, store: Path) -> RunResult:
    folder = WORK / "runs" / case.name
    out, log_path = folder / "dareflow", folder / "dareflow.log"
    if out.exists():
        shutil.rmtree(out)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = dareflow_exe() + ["merge", str(config), "--out", str(out), "--store", str(store)]
    with open(log_path, "wb") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO),
                            env=env, check=False).returncode
    if rc != 0:
        text = log_path.read_text(errors="replace")
        # the CLI's one-line refusal; a crash ends with a bare traceback instead
        clean = any(line.startswith("error:") for line in text.splitlines())
        return RunResult(False, out, _reason(text), clean_refusal=clean)
    return RunResult(True, out)


def refusal_verdict(mk: RunResult, df: RunResult) -> Verdict:
    """The verdict of a case both tools must refuse (dareflow with its ``error:`` line)."""
    both = [f"mergekit: {mk.reason}", f"dareflow: {df.reason}"]
    if mk.ok:
        return Verdict(False, "FAIL (mergekit merged)", "expected a refusal")
    if df.ok:
        return Verdict(False, "FAIL (dareflow merged)", "mergekit refuses: " + mk.reason,
                       details=both[:1])
    if not df.clean_refusal:
        return Verdict(False, "FAIL (dareflow crashed)", df.reason, details=both)
    return Verdict(True, "ok (both refuse)", f"dareflow: {df.reason}", details=both)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mergekit_parity",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=None, metavar="PATTERN",
                   help="corpus cases to run (file stems or fnmatch globs; default: all)")
    p.add_argument("--fresh", action="store_true", help="rerun mergekit (ignore its cache)")
    p.add_argument("--ulps", type=float, default=4.0,
                   help="deterministic tolerance, float32 ulps of the operands")
    p.add_argument("--sigmas", type=float, default=5.0, help="DARE statistical bound")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = load_corpus(patterns=args.cases)
    if not cases:
        log(f"no corpus case matches {args.cases}; cases: "
            + ", ".join(c.name for c in load_corpus()))
        return 2
    family = generate_parity_family(WORK, log=log)
    ensure_mergekit()
    version = mergekit_version()
    log(f"mergekit {version}; family {family}; {len(cases)} case(s)")
    if args.fresh and (WORK / "mergekit").exists():
        shutil.rmtree(WORK / "mergekit")
    store = WORK / "runs" / "store"
    if store.exists():
        shutil.rmtree(store)  # a fresh store: no unit cached by an older dareflow
    members = {m: load_model(family / m) for m in MEMBERS}
    rows, report = [], []
    with PrefectServer(WORK / "prefect-home") as server:
        env = dict(os.environ, PREFECT_HOME=str(WORK / "prefect-home"),
                   PREFECT_API_URL=server.url)
        for case in cases:
            config = WORK / "recipes" / f"{case.name}.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.safe_dump(substitute(case.data, family), sort_keys=False))
            mk = run_mergekit(case, config, version, family)
            df = run_dareflow(case, config, env, store)
            row = {"case": case.name, "method": case.method, "features": features(case.data)}
            if case.expect_refusal:
                verdict = refusal_verdict(mk, df)
            elif not mk.ok:
                verdict = Verdict(False, "FAIL (mergekit refused)", mk.reason, details=[mk.reason])
            elif not df.ok:
                verdict = Verdict(False, "FAIL (dareflow refused)", df.reason,
                                  details=[df.reason])
            else:
                used = {m: members[m] for m in referenced(case.data)}
                verdict = compare_case(case.data, load_model(df.out), load_model(mk.out), used,
                                       args.ulps, args.sigmas)
            agreement = verdict.agreement.replace("|", "/")
            if len(agreement) > 110:
                agreement = agreement[:107] + "..."
            row.update(verdict=verdict.verdict, agreement=agreement, norm=verdict.norm)
            rows.append(row)
            log(f"{case.name}: {verdict.verdict}: {verdict.agreement}")
            for line in verdict.details[:8]:
                log(f"    {line}")
            if verdict.details:
                report.append(f"- {case.name}:\n" + "\n".join(f"  - {d}" for d in verdict.details))
    table = format_table(rows)
    passed = sum(r["verdict"].startswith("ok") for r in rows)
    head = (f"mergekit {version} vs dareflow, {datetime.date.today()}: {passed}/{len(rows)} "
            f"cases agree (float32 family, {args.ulps:g} ulp / {args.sigmas:g}σ bounds)")
    log(f"\n{head}\n\n{table}")
    text = f"{head}\n\n{table}\n"
    if report:
        text += "\nDetails:\n\n" + "\n".join(report) + "\n"
    (WORK / "parity.md").write_text(text)
    log(f"\nwritten to {WORK / 'parity.md'}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
