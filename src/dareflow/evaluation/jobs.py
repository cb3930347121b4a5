"""Evaluation orchestration without Prefect: fingerprints, cached runs, results in the store.

``dareflow.tasks.evaluate`` wraps these functions in Prefect tasks; ``flows/evaluate.py`` wires them.

- A model's *revision* is a fingerprint of what it would be evaluated on: for a folder that
  dareflow merged, its ``manifest.json`` shard sha256s; otherwise the sha256 of every weight file
  (safetensors headers alone are the same for a base and its fine-tunes: same names, shapes,
  offsets). ``config.json``, ``generation_config.json`` and the tokenizer files enter too.
- One benchmark of one model runs in a child process (``python -m dareflow.evaluation.jobs REQUEST``):
  ``run_task`` sets process-wide Hugging Face variables, and a fresh process per model frees
  its memory and isolates crashes. The raw lm-eval JSON is committed to
  ``{store}/eval-results/<key[:2]>/<key>.json``, where the key hashes (revision, suite entry,
  shots, limit, lm-eval version, backend, mirror data, batch size, code version): an unchanged
  model is not evaluated again while that object exists.
- Results: raw JSON per run, a tidy table (parquet + CSV) and the comparison (markdown + CSV)
  under ``{store}/results/<suite>-<time>-<run>/`` or a given URI.

Store layout added here::

    {store}/eval-mirror/                  offline v1 data (dareflow.evaluation.prepare_mirror)
    {store}/eval-results/xx/KEY.json      one committed lm-eval run (raw JSON + dareflow meta)
    {store}/results/NAME/                 results.parquet, results.csv, comparison.{md,csv},
                                          summary.json, raw/<model>__<task>.json
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dareflow.errors import fault_point, is_transient_name
from dareflow.evaluation.mirror import MIRROR_TASKS, prepare_mirror, read_manifest, verify_mirror
from dareflow.evaluation.results import (
    COLUMNS,
    best_per_column,
    comparison_table,
    tidy_results,
)
from dareflow.evaluation.runner import BACKENDS, vllm_available
from dareflow.evaluation.suite import Suite, SuiteTask
from dareflow.io import storage
from dareflow.settings import cache_dir

#: Bump when the way a run is made changes its numbers (invalidates cached results).
EVAL_CODE_VERSION = "1"
MIRROR_DIR = "eval-mirror"
RESULTS_DIR = "eval-results"
#: Extra columns of the tidy table written by the flow (after ``COLUMNS``).
STATUS_COLUMNS = ["status", "error"]
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "chat_template.jinja")


class EvaluationError(RuntimeError):
    """A benchmark run failed; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple:  # keep ``transient`` through pickling (result storage)
        return _evaluation_error, (self.args[0], self.transient)


def _evaluation_error(message: str, transient: bool) -> EvaluationError:
    return EvaluationError(message, transient=transient)


# --------------------------------------------------------------------------- checks


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, or vllm where it cannot run, before any heavy work.

    Raises:
        ValueError: not ``hf`` or ``vllm``.
        ValueError: ``vllm`` without the vllm package or without a CUDA GPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)} "
                         "(hf: transformers, CPU or GPU; vllm: GPU only)")
    if backend == "vllm":
        if not vllm_available():
            raise ValueError("backend 'vllm' needs the vllm package (an NVIDIA GPU machine: "
                              "`pip install -e '.[vllm]'`); use --backend hf on the CPU")
        import torch

        if not torch.cuda.is_available():
            raise ValueError("backend 'vllm' needs a CUDA GPU and torch sees none; "
                              "use --backend hf on the CPU")


def check_mirrored(suite: Suite) -> None:
    """With the offline mirror, every lm-eval entry of ``suite`` must be a mirrored task.

    Raises:
        KeyError: an entry whose task the mirror does not hold (names it and the choices).
    """
    missing = [f"{t.name} (task {t.task})" for t in suite.tasks
               if t.data is None and t.task not in MIRROR_TASKS]
    if missing:
        raise KeyError(f"suite {suite.name!r}: {', '.join(missing)} not in the offline mirror "
                       f"(it holds {', '.join(MIRROR_TASKS)}); drop --offline-mirror to read "
                       "the Hub datasets, or remove the entry")


def check_limit(limit: int | None) -> None:
    """Raises ValueError unless ``limit`` is None or a positive int."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents or None, got {limit!r}")


def check_options(suite: str | os.PathLike, *, limit: int | None, backend: str,
                  mirror: bool) -> Suite:
    """Check the suite, limit, backend and mirror choice; return the parsed suite."""
    from dareflow.evaluation.suite import load_suite

    parsed = load_suite(suite)
    check_limit(limit)
    check_backend(backend)
    if mirror:
        check_mirrored(parsed)
    return parsed


def check_request(models: Mapping[str, str], suite: str | os.PathLike, *, limit: int | None,
                  backend: str, mirror: bool, merged: str | None = None) -> Suite:
    """Every check of an evaluation request, before anything heavy runs.

    Returns:
        The parsed suite.

    Raises:
        ValueError, FileNotFoundError, KeyError: naming the bad value and the fix.
    """
    parsed = check_options(suite, limit=limit, backend=backend, mirror=mirror)
    if not models:
        raise ValueError("no models to evaluate: pass at least one LABEL=PATH or PATH")
    for label, uri in models.items():
        if not label or "/" in label:
            raise ValueError(f"model label {label!r} must be a non-empty name without '/'")
        _local_dir(uri)
    if merged is not None and merged not in models:
        raise KeyError(f"merged={merged!r} is not one of the model labels {list(models)}")
    return parsed


def parse_model_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["merged=out/m", "path/to/wizardmath"]`` -> ``{"merged": "out/m", "wizardmath": ...}``
    (a bare path is labelled by its folder name; a repeated label is an error)."""
    models: dict[str, str] = {}
    for spec in specs:
        label, sep, uri = spec.partition("=")
        if not sep or "/" in label:
            label, uri = Path(spec.rstrip("/")).name, spec
        if label in models:
            raise ValueError(f"model label {label!r} given twice ({models[label]!r} and "
                             f"{uri!r}): name them with LABEL=PATH")
        models[label] = uri
    return models


def check_local_output(out: str) -> None:
    """Raises ValueError if ``out`` is a remote URI (lm-eval reads local folders)."""
    if "://" in out and not out.startswith("file://"):
        raise ValueError(f"out={out!r}: merge-and-evaluate needs a local output folder "
                         "(lm-eval reads local folders); merge to a folder, then upload")


def merge_eval_models(manifest: Mapping[str, Any], out: str) -> dict[str, str]:
    """The models a merge is compared with: ``{"merged": out, <base>: uri, <fine-tune>: uri}``.

    Args:
        manifest: the merge flow's result (its ``sources``: role, model, uri of each input,
            as mirrored into the store).
        out: the merged model's local folder.

    Returns:
        Labels are the models' names without their location (``org/name`` -> ``name``, a
        folder's last component), made unique with ``-2``, ``-3``...
    """
    check_local_output(out)
    models = {"merged": out}
    ordered = sorted(manifest["sources"], key=lambda s: s["role"] != "base")
    for source in ordered:
        name = Path(str(source["model"]).rstrip("/")).name or "model"
        label, n = name, 2
        while label in models:
            label, n = f"{name}-{n}", n + 1
        models[label] = source["uri"]
    return models


# --------------------------------------------------------------------------- fingerprints


def _local_dir(uri: str) -> Path:
    path = Path(uri.removeprefix("file://")).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {uri!r} is not a local Hugging Face folder ({path.resolve()}/config.json "
            "not found): pass the folder with config.json, *.safetensors and the tokenizer"
        )
    return path.resolve()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_uri: str) -> dict[str, Any]:
    """What identifies a model for the results cache.

    Args:
        model_uri: a local HF model folder (``file://`` accepted).

    Returns:
        ``{"model_dir", "revision", "kind"}``: ``revision`` is ``"sha256:<64 hex>"`` over the
        weights (the manifest's shard sha256s for a dareflow-merged folder whose shard sizes
        match it, else every weight file's sha256) and the config and tokenizer files;
        ``kind`` is ``manifest`` or ``content``.

    Raises:
        FileNotFoundError: not a local model folder, or one without weights.
    """
    folder = _local_dir(model_uri)
    weights = sorted(p for p in folder.iterdir()
                     if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    if not weights:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors (or *.bin) weights")
    parts: dict[str, str] = {}
    kind = "content"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            shards = json.loads(manifest_path.read_text("utf-8"))["shards"]
            if sorted(shards) == sorted(p.name for p in weights if p.suffix == ".safetensors") \
                    and all((folder / n).stat().st_size == s["bytes"] for n, s in shards.items()):
                parts = {n: s["sha256"] for n, s in shards.items()}
                kind = "manifest"
    if not parts:
        parts = {p.name: _file_sha256(p) for p in weights}
    for name in _MODEL_FILES:
        if (folder / name).is_file():
            parts[name] = _file_sha256(folder / name)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {"model_dir": str(folder), "revision": f"sha256:{digest}", "kind": kind}


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


def run_key(revision: str, entry: Mapping[str, Any], *, limit: int | None, backend: str,
            mirror_sha: str | None, batch_size: int | str = 1) -> str:
    """Content key of one run: same key, same numbers (64 hex characters).

    ``mirror_sha`` identifies the mirrored data of the task (None: the Hub's, or a JSONL
    task, whose file content enters here through its sha256).
    """
    data = dict(entry)
    if data.get("data"):
        data["data"] = {**data["data"], "sha256": _file_sha256(Path(data["data"]["path"]))}
    payload = {"revision": revision, "entry": data, "limit": limit, "backend": backend,
               "mirror": mirror_sha, "batch_size": batch_size, "lm_eval": lm_eval_version(),
               "code": EVAL_CODE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def result_uri(store: str, key: str) -> str:
    return storage.join(store, RESULTS_DIR, key[:2], f"{key}.json")


def committed_result(store: str, key: str) -> str | None:
    """The URI of the committed run ``key``, or None if absent or not a complete result."""
    uri = result_uri(store, key)
    if not storage.exists(uri):
        return None
    try:
        raw = json.loads(storage.read_bytes(uri))
    except (ValueError, OSError):
        return None
    return uri if isinstance(raw, dict) and "results" in raw else None


# --------------------------------------------------------------------------- mirror


def mirror_sha(mirror_dir: str | os.PathLike, task: str) -> str:
    """sha256 of a mirrored task's manifest entry (its files' sha256s and row counts)."""
    info = read_manifest(mirror_dir)["tasks"][task]
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()


def _local_cache_dir(store: str) -> Path:
    return cache_dir() / MIRROR_DIR / hashlib.sha256(store.encode()).hexdigest()[:16]


def ensure_mirror(store: str, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Prepare the offline mirror in the store (if missing or damaged) and return a local copy.

    A local store holds it in ``{store}/eval-mirror/`` and that folder is used as it is. For
    an object store (``s3://``) the mirror is built in a local cache folder (``$DAREFLOW_CACHE``
    or ``$TMPDIR/dareflow-cache``), uploaded to ``{store}/eval-mirror/``, and on a machine that
    has no verified local copy yet, downloaded from there: lm-eval reads local files.

    Returns:
        ``{"mirror_uri", "mirror_dir", "tasks", "prepared"}`` (``prepared``: built now).
    """
    names = list(MIRROR_TASKS) if tasks is None else list(tasks)
    uri = storage.join(store, MIRROR_DIR)
    fs, path = storage.get_fs(uri)
    local = storage._is_local(fs)
    mirror_dir = Path(path) if local else _local_cache_dir(store)
    if _verified(mirror_dir, names):
        return {"mirror_uri": uri, "mirror_dir": str(mirror_dir), "tasks": names,
                "prepared": False}
    prepared = False
    if not local and storage.exists(storage.join(uri, "manifest.json")):
        _download_mirror(uri, mirror_dir)
    if not _verified(mirror_dir, names):
        prepare_mirror(mirror_dir, tasks=names)
        prepared = True
        if not local:
            _upload_mirror(mirror_dir, uri)
    return {"mirror_uri": uri, "mirror_dir": str(mirror_dir), "tasks": names,
            "prepared": prepared}


def _verified(mirror_dir: Path, names: Sequence[str]) -> bool:
    try:
        verify_mirror(mirror_dir, names)
    except (FileNotFoundError, KeyError, ValueError):
        return False
    return True


def _mirror_files(mirror_dir: Path) -> list[str]:
    manifest = read_manifest(mirror_dir)
    return [f["path"] for t in manifest["tasks"].values() for f in t["files"].values()]


def _upload_mirror(mirror_dir: Path, uri: str) -> None:
    for rel in _mirror_files(mirror_dir):
        storage.copy_file(str(mirror_dir / rel), storage.join(uri, rel))
    # the manifest last: a reader that sees it finds every file it lists
    storage.copy_file(str(mirror_dir / "manifest.json"), storage.join(uri, "manifest.json"))


def _download_mirror(uri: str, mirror_dir: Path) -> None:
    mirror_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
    for task in manifest["tasks"].values():
        for f in task["files"].values():
            storage.copy_file(storage.join(uri, f["path"]), str(mirror_dir / f["path"]))
    storage.write_bytes_atomic(str(mirror_dir / "manifest.json"),
                               json.dumps(manifest, indent=2, sort_keys=True).encode())


# --------------------------------------------------------------------------- one run


def evaluate_benchmark(
    model: Mapping[str, Any], entry: Mapping[str, Any], *, store: str, limit: int | None,
    backend: str, mirror_dir: str | None, batch_size: int | str = 1,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Evaluate one model on one suite entry, in a child process, unless already committed.

    Args:
        model: ``{"label", "model_dir", "revision"}`` (see ``model_fingerprint``).
        entry: a suite entry as ``SuiteTask.model_dump(mode="json")``.
        store: artifact store root (folder or URI) where the run is committed.
        limit: documents per (sub)task; None for all.
        backend: ``hf`` or ``vllm``.
        mirror_dir: local offline mirror folder, or None for the Hub datasets.
        batch_size: lm-eval batch size.
        timeout_s: kill the child after this many seconds (a transient failure).

    Returns:
        ``{"label", "task", "key", "uri", "revision", "launched", "seconds"}``;
        ``launched`` is False when a committed result was reused.

    Raises:
        EvaluationError: the run failed (``transient`` when the child was killed, timed out,
            ran out of memory or lost its connection).
    """
    parsed = SuiteTask.model_validate(entry)
    sha = None
    if parsed.data is None and mirror_dir is not None:
        sha = mirror_sha(mirror_dir, parsed.task)
    key = run_key(model["revision"], entry, limit=limit, backend=backend, mirror_sha=sha,
                  batch_size=batch_size)
    out = {"label": model["label"], "task": parsed.name, "key": key,
           "uri": result_uri(store, key), "revision": model["revision"]}
    if committed_result(store, key) is not None:
        return {**out, "launched": False, "seconds": 0.0}
    started = time.perf_counter()
    raw = run_in_subprocess({
        "model_dir": model["model_dir"], "entry": entry, "backend": backend, "limit": limit,
        "mirror_dir": mirror_dir, "batch_size": batch_size, "revision": model["revision"],
    }, timeout_s=timeout_s, what=f"{model['label']}/{parsed.name}")
    raw["dareflow"]["key"] = key
    storage.write_bytes_atomic(out["uri"], json.dumps(raw, indent=1).encode())
    return {**out, "launched": True, "seconds": round(time.perf_counter() - started, 3)}


def run_in_subprocess(request: Mapping[str, Any], *, timeout_s: float | None = None,
                      what: str = "run") -> dict:
    """``run_task(**request)`` in ``python -m dareflow.evaluation.jobs`` and its raw results.

    Raises:
        EvaluationError: the child failed (its error type, message and the tail of its log).
    """
    with tempfile.TemporaryDirectory(prefix="dareflow-run-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        err, log = Path(tmp) / "error.json", Path(tmp) / "log.txt"
        req.write_text(json.dumps(dict(request)))
        env = dict(os.environ)
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dareflow.evaluation.jobs", str(req), str(res), str(err)],
                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise EvaluationError(f"{what}: killed after {timeout_s} s (timeout)",
                                      transient=True) from None
        if code == 0 and res.is_file():
            return json.loads(res.read_text("utf-8"))
        tail = log.read_text("utf-8", errors="replace")[-2000:]
        if err.is_file():
            info = json.loads(err.read_text("utf-8"))
            raise EvaluationError(f"{what}: {info['type']}: {info['message']}",
                                  transient=is_transient_name(info["type"]))
        # no error report: killed by a signal (OOM killer, SIGKILL) or died in native code
        raise EvaluationError(f"{what}: the evaluation process exited with code {code}; "
                              f"last output:\n{tail}", transient=code < 0 or code >= 128)


def _child_main(argv: Sequence[str]) -> int:
    """Entry point of the child process: run one benchmark, write results or the error."""
    req_path, res_path, err_path = (Path(a) for a in argv)
    request = json.loads(req_path.read_text("utf-8"))
    try:
        entry = SuiteTask.model_validate(request.pop("entry"))
        fault_point(f"eval-{entry.name}")
        from dareflow.evaluation.runner import run_task

        raw = run_task(request.pop("model_dir"), entry, **request)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides on retries
        err_path.write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        import traceback

        traceback.print_exc()
        return 1
    res_path.write_text(json.dumps(raw))
    return 0


# --------------------------------------------------------------------------- results


def results_table(outcomes: Sequence[Mapping[str, Any]], entries: Mapping[str, Mapping],
                  store: str | None = None) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The tidy table of all runs, failed ones as rows with ``status == "failed"``.

    Args:
        outcomes: one per run: ``evaluate_benchmark``'s result plus ``status`` (``ok`` or
            ``failed``) and, when failed, ``error``, ``label``, ``task``, ``revision``.
        entries: ``{task name: suite entry dict}``.

    Returns:
        ``(table, raws)``: columns ``COLUMNS + STATUS_COLUMNS``; ``raws`` maps
        ``"<label>__<task>"`` to the raw lm-eval JSON of each successful run.
    """
    raws: dict[str, dict] = {}
    by_model: dict[str, list[dict]] = {}
    failed_rows = []
    version = lm_eval_version()
    for o in outcomes:
        if o["status"] == "ok":
            raw = json.loads(storage.read_bytes(o["uri"]))
            raws[f"{o['label']}__{o['task']}"] = raw
            by_model.setdefault(o["label"], []).append(raw)
        else:
            entry = entries[o["task"]]
            failed_rows.append({
                "model": o["label"], "task": o["task"], "metric": entry["metric"],
                "value": float("nan"), "stderr": float("nan"), "n": float("nan"),
                "shots": float(entry["shots"]), "revision": o.get("revision"),
                "lm_eval_version": version, "status": "failed", "error": o.get("error", ""),
            })
    table = tidy_results(by_model) if by_model else pd.DataFrame(columns=COLUMNS)
    table["status"], table["error"] = "ok", ""
    if failed_rows:
        table = pd.concat([table, pd.DataFrame(failed_rows)], ignore_index=True)
    for col in ("value", "stderr", "n", "shots"):
        table[col] = table[col].astype(float)
    return table[COLUMNS + STATUS_COLUMNS], raws


def comparison(table: pd.DataFrame, suite: Suite, merged: str,
               sources: Sequence[str]) -> tuple[pd.DataFrame, set[tuple[str, str]]]:
    """The comparison table (models x tasks [+ average]) and the failed (model, task) cells."""
    ok = table[table["status"] == "ok"]
    bad = table[table["status"] == "failed"]
    failed = set(zip(bad["model"], bad["task"]))
    models = [merged, *[s for s in sources if s != merged]]
    if ok.empty:
        wide = pd.DataFrame(index=pd.Index(models, name="model"),
                            columns=[*suite.primary_metrics()] +
                            (["average"] if suite.average else []), dtype=float)
        return wide, failed
    present = set(ok["model"])
    # a model whose every run failed still gets its row of failures
    fill = pd.DataFrame([{"model": m, "task": "__none__", "metric": "__none__",
                          "value": float("nan")} for m in models if m not in present])
    data = pd.concat([ok, fill], ignore_index=True) if not fill.empty else ok
    wide = comparison_table(data, merged, sources, metrics=suite.primary_metrics(),
                            average=suite.average)
    return wide, failed


def comparison_markdown(wide: pd.DataFrame, failed: set[tuple[str, str]], *,
                        scale: float = 100.0, digits: int = 2) -> str:
    """Markdown of the comparison: best per column in bold, failed runs marked ``failed``."""
    best = best_per_column(wide)
    cols = list(wide.columns)
    lines = ["| model | " + " | ".join(map(str, cols)) + " |", "|---|" + "---:|" * len(cols)]
    for model, row in wide.iterrows():
        cells = []
        for col in cols:
            value = row[col]
            if (model, col) in failed:
                cells.append("failed")
            elif pd.isna(value):
                cells.append("–")
            else:
                text = f"{value * scale:.{digits}f}"
                cells.append(f"**{text}**" if model in best[col] else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_rows(wide: pd.DataFrame, failed: set[tuple[str, str]], *,
                    scale: float = 100.0, digits: int = 2) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: values in percent, the best per column suffixed
    with `` ★`` (best), ``failed`` for failed runs, ``None`` for absent ones."""
    best = best_per_column(wide)
    rows = []
    for model, row in wide.iterrows():
        out: dict[str, Any] = {"model": model}
        for col in wide.columns:
            value = row[col]
            if (model, col) in failed:
                out[col] = "failed"
            elif pd.isna(value):
                out[col] = None
            else:
                text = f"{value * scale:.{digits}f}"
                out[col] = text + " ★" if model in best[col] else text
        rows.append(out)
    return rows


def default_results_uri(store: str, suite: str, run_id: str | None = None) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{suite}-{stamp}" + (f"-{run_id[:8]}" if run_id else "")
    return storage.join(store, "results", name)


def write_results(results_uri: str, table: pd.DataFrame, raws: Mapping[str, dict],
                  markdown: str, wide: pd.DataFrame, summary: Mapping[str, Any]) -> dict[str, str]:
    """Write raw JSON per run, the tidy table (parquet, CSV), the comparison (markdown, CSV)
    and ``summary.json`` under ``results_uri``; each file atomically.

    Returns:
        ``{"parquet", "csv", "markdown", "comparison_csv", "summary", "raw"}`` URIs.
    """
    uris = {name: storage.join(results_uri, file) for name, file in (
        ("parquet", "results.parquet"), ("csv", "results.csv"), ("markdown", "comparison.md"),
        ("comparison_csv", "comparison.csv"), ("summary", "summary.json"), ("raw", "raw"))}
    for name, raw in raws.items():
        storage.write_bytes_atomic(storage.join(uris["raw"], f"{name}.json"),
                                   json.dumps(raw, indent=1).encode())
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    storage.write_bytes_atomic(uris["parquet"], buf.getvalue())
    storage.write_bytes_atomic(uris["csv"], table.to_csv(index=False).encode())
    storage.write_bytes_atomic(uris["comparison_csv"], wide.to_csv().encode())
    storage.write_bytes_atomic(uris["markdown"], markdown.encode())
    storage.write_bytes_atomic(uris["summary"],
                               json.dumps(dict(summary), indent=2, default=str).encode())
    return uris


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
