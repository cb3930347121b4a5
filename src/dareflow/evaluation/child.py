"""One benchmark run in a child process, and the entry point of that process.

``run_in_subprocess`` starts ``python -m dareflow.evaluation.child REQUEST RESULT ERROR``:
``run_task`` sets process-wide Hugging Face variables, and a fresh process per model frees its
memory and isolates crashes. The child writes lm-eval's raw results, or its error's type and
message, to the files named; the parent turns a failure into an ``EvaluationError`` that says
whether retrying may help.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dareflow.errors import fault_point, is_transient_name
from dareflow.evaluation.runner import run_task
from dareflow.evaluation.suite import SuiteTask


class EvaluationError(RuntimeError):
    """A benchmark run failed; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple:  # keep ``transient`` through pickling (result storage)
        return _evaluation_error, (self.args[0], self.transient)


def _evaluation_error(message: str, transient: bool) -> EvaluationError:
    return EvaluationError(message, transient=transient)


def run_in_subprocess(request: Mapping[str, Any], *, timeout_s: float | None = None,
                      what: str = "run", env: Mapping[str, str] | None = None) -> dict:
    """``run_task(**request)`` in ``python -m dareflow.evaluation.child`` and its raw results.

    Args:
        request: ``run_task``'s arguments (JSON-able; ``entry`` as a dict).
        timeout_s: kill the child (its whole process group: vLLM's workers too) after this
            many seconds; None waits for ever.
        what: names the run in errors (``<label>/<task>``).
        env: variables set in the child's environment on top of this process's (e.g.
            ``CUDA_VISIBLE_DEVICES``: the GPUs it is pinned to).

    Raises:
        EvaluationError: the child failed (its error type, message and the tail of its log);
            timed out (``<what>: killed after N s (timeout)``, not transient: a run that
            needed longer would need longer again, so it is reported at once rather than
            retried for another N s twice).
    """
    with tempfile.TemporaryDirectory(prefix="dareflow-run-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        err, log = Path(tmp) / "error.json", Path(tmp) / "log.txt"
        req.write_text(json.dumps(dict(request)))
        child_env = {**os.environ, **(env or {})}
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dareflow.evaluation.child", str(req), str(res), str(err)],
                stdout=fh, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise EvaluationError(f"{what}: killed after {timeout_s:g} s (timeout)",
                                      transient=False) from None
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


def main(argv: Sequence[str]) -> int:
    """Entry point of the child process: run one benchmark, write results or the error."""
    req_path, res_path, err_path = (Path(a) for a in argv)
    request = json.loads(req_path.read_text("utf-8"))
    try:
        entry = SuiteTask.model_validate(request.pop("entry"))
        fault_point(f"eval-{entry.name}")
        raw = run_task(request.pop("model_dir"), entry, **request)
        # the GPUs this process was pinned to, as it saw them (None: not pinned)
        raw["dareflow"]["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides on retries
        err_path.write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        traceback.print_exc()
        return 1
    res_path.write_text(json.dumps(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
