"""Cached benchmark runs: the content key of a run, its committed result in the store, and
``evaluate_benchmark``, which runs one model on one suite entry unless already committed.

The raw lm-eval JSON of a run is committed to ``{store}/eval-results/<key[:2]>/<key>.json``,
where the key (:func:`benchmark_key`, the one place it is computed) hashes everything a run's
numbers depend on: the model revision, the suite entry (a JSONL task's file by content),
limit, backend, device, batch size, lm-eval's model arguments (dtype, engine options), the
mirror data, the generated task YAMLs, the lm-eval / transformers / torch / datasets (/ vllm)
versions and :data:`EVAL_CODE_VERSION`. An unchanged model is not evaluated again while that
object exists. Each run happens in a child process (``dareflow.evaluation.child``), pinned to
its GPU slot (``dareflow.evaluation.backends``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

from dareflow.evaluation.backends import child_env, run_slot
from dareflow.evaluation.child import run_in_subprocess
from dareflow.evaluation.mirror_store import mirror_sha
from dareflow.evaluation.runner import (
    library_versions,
    lm_eval_version,  # noqa: F401 - report.py reads it from here
    model_spec,
    task_config_digest,
)
from dareflow.evaluation.suite import SuiteTask
from dareflow.io import storage

#: Bump when the way a run is made changes its numbers (invalidates cached results).
#: 2: hf on a GPU in bfloat16 with batch size auto; vllm batched; the key covers device,
#: model arguments, task YAMLs and library versions.
EVAL_CODE_VERSION = "2"
RESULTS_DIR = "eval-results"
#: A run's settings when none are given: hf on the CPU as CI runs it.
CPU_RUN: dict[str, Any] = {"device": "cpu", "batch_size": 1, "model_args": {}, "slots": [],
                           "timeout_s": None}


def run_key(revision: str, entry: Mapping[str, Any], *, limit: int | None, backend: str,
            mirror_sha: str | None, batch_size: int | str = 1, device: str = "cpu",
            model_args: Mapping[str, Any] | None = None, task_configs: str | None = None,
            versions: Mapping[str, str | None] | None = None) -> str:
    """Content key of one run from its parts: same key, same numbers (64 hex characters).

    ``mirror_sha`` identifies the mirrored data of the task (None: the Hub's, or a JSONL
    task, whose file content enters here through its sha256); ``model_args`` are lm-eval's
    (without the model path); ``task_configs`` the digest of the generated task YAMLs;
    ``versions`` the libraries' (default: those installed, ``library_versions``).
    """
    data = dict(entry)
    if data.get("data"):
        data["data"] = {**data["data"], "sha256": storage.sha256_of(data["data"]["path"])}
    payload = {"revision": revision, "entry": data, "limit": limit, "backend": backend,
               "mirror": mirror_sha, "batch_size": batch_size, "device": device,
               "model_args": dict(model_args or {}), "task_configs": task_configs,
               "versions": dict(versions if versions is not None
                                else library_versions(backend)),
               "code": EVAL_CODE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def benchmark_key(model: Mapping[str, Any], entry: Mapping[str, Any], *, limit: int | None,
                  backend: str, mirror_dir: str | None,
                  run: Mapping[str, Any] | None = None) -> str:
    """The results cache key of ``model`` on ``entry`` with the run settings ``run``.

    Args:
        model: ``{"revision", ...}`` (see ``model_fingerprint``).
        entry: a suite entry as ``SuiteTask.model_dump(mode="json")``.
        limit: documents per (sub)task; None for all.
        backend: ``hf`` or ``vllm``.
        mirror_dir: local offline mirror folder, or None for the Hub datasets.
        run: ``{"device", "batch_size", "model_args"}`` from ``backends.plan_run``
            (default :data:`CPU_RUN`).
    """
    run = run or CPU_RUN
    parsed = SuiteTask.model_validate(entry)
    sha = None
    if parsed.data is None and mirror_dir is not None:
        sha = mirror_sha(mirror_dir, parsed.task)
    # the model arguments lm-eval will get, whatever sets them (defaults, suite, options)
    _, lm_args = model_spec("<model>", backend, run["device"],
                            {**parsed.model_args, **run["model_args"]})
    lm_args.pop("pretrained")
    return run_key(model["revision"], entry, limit=limit, backend=backend, mirror_sha=sha,
                   batch_size=run["batch_size"], device=run["device"], model_args=lm_args,
                   task_configs=task_config_digest(parsed, mirror_dir))


def result_path(key: str) -> str:
    """Where run ``key`` is committed relative to the store root (what cached records keep:
    a moved or copied store stays valid)."""
    return f"{RESULTS_DIR}/{key[:2]}/{key}.json"


def result_uri(store: str, key: str) -> str:
    return storage.join(store, result_path(key))


def in_store(outcome: Mapping[str, Any], store: str) -> dict[str, Any]:
    """A run's record with ``uri``: its result in ``store`` (the store of this run, whatever
    store the record was cached in)."""
    return {**outcome, "uri": result_uri(store, outcome["key"])}


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


def evaluate_benchmark(
    model: Mapping[str, Any], entry: Mapping[str, Any], *, store: str, limit: int | None,
    backend: str, mirror_dir: str | None, run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate one model on one suite entry, in a child process, unless already committed.

    Args:
        model: ``{"label", "model_dir", "revision"}`` (see ``model_fingerprint``).
        entry: a suite entry as ``SuiteTask.model_dump(mode="json")``.
        store: artifact store root (folder or URI) where the run is committed.
        limit: documents per (sub)task; None for all.
        backend: ``hf`` or ``vllm``.
        mirror_dir: local offline mirror folder, or None for the Hub datasets.
        run: ``backends.plan_run``'s plan (device, batch size, model args, slots,
            ``timeout_s``); default :data:`CPU_RUN`. The child waits for a free slot, is
            pinned to its GPUs and killed after ``timeout_s`` (not retried).

    Returns:
        ``{"label", "task", "key", "uri", "revision", "launched", "seconds"}`` (and
        ``gpus``, the slot's GPU ids, when launched); ``launched`` is False when a committed
        result was reused.

    Raises:
        EvaluationError: the run failed (``transient`` when the child was killed, ran out of
            memory or lost its connection).
    """
    run = run or CPU_RUN
    parsed = SuiteTask.model_validate(entry)
    key = benchmark_key(model, entry, limit=limit, backend=backend, mirror_dir=mirror_dir,
                        run=run)
    out = {"label": model["label"], "task": parsed.name, "key": key,
           "uri": result_uri(store, key), "revision": model["revision"]}
    if committed_result(store, key) is not None:
        return {**out, "launched": False, "seconds": 0.0}
    with run_slot(run["slots"]) as slot:
        started = time.perf_counter()
        raw = run_in_subprocess({
            "model_dir": model["model_dir"], "entry": entry, "backend": backend,
            "limit": limit, "mirror_dir": mirror_dir, "device": run["device"],
            "batch_size": run["batch_size"], "model_args": run["model_args"],
            "revision": model["revision"],
        }, timeout_s=run.get("timeout_s"), what=f"{model['label']}/{parsed.name}",
            env=child_env(slot))
    raw["dareflow"]["key"] = key
    raw["dareflow"]["gpus"] = slot or []
    storage.write_bytes_atomic(out["uri"], json.dumps(raw, indent=1).encode())
    return {**out, "launched": True, "seconds": round(time.perf_counter() - started, 3),
            "gpus": slot or []}
