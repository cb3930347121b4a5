"""Cached benchmark runs: the content key of a run, its committed result in the store, and
``evaluate_benchmark``, which runs one model on one suite entry unless already committed.

The raw lm-eval JSON of a run is committed to ``{store}/eval-results/<key[:2]>/<key>.json``,
where the key hashes (revision, suite entry, shots, limit, lm-eval version, backend, mirror
data, batch size, code version): an unchanged model is not evaluated again while that object
exists. Each run happens in a child process (``dareflow.evaluation.child``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

from dareflow.evaluation.child import run_in_subprocess
from dareflow.evaluation.mirror_store import mirror_sha
from dareflow.evaluation.runner import lm_eval_version
from dareflow.evaluation.suite import SuiteTask
from dareflow.io import storage

#: Bump when the way a run is made changes its numbers (invalidates cached results).
EVAL_CODE_VERSION = "1"
RESULTS_DIR = "eval-results"


def run_key(revision: str, entry: Mapping[str, Any], *, limit: int | None, backend: str,
            mirror_sha: str | None, batch_size: int | str = 1) -> str:
    """Content key of one run: same key, same numbers (64 hex characters).

    ``mirror_sha`` identifies the mirrored data of the task (None: the Hub's, or a JSONL
    task, whose file content enters here through its sha256).
    """
    data = dict(entry)
    if data.get("data"):
        data["data"] = {**data["data"], "sha256": storage.sha256_of(data["data"]["path"])}
    payload = {"revision": revision, "entry": data, "limit": limit, "backend": backend,
               "mirror": mirror_sha, "batch_size": batch_size, "lm_eval": lm_eval_version(),
               "code": EVAL_CODE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


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
