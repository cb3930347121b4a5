"""Errors reach the user as one clear ``error:`` line: a command that fails inside a flow
prints its progress and that line, followed by the path of the log file that holds the
tracebacks; ``dareflow --debug`` prints the tracebacks as well; an offline run prints no
``Failed to send telemetry``.

Each command runs as a real ``python -m dareflow.cli`` process. Those that check the
telemetry line start their own temporary Prefect server (no ``PREFECT_API_URL``, as a
user's first run: ~10-20 s each on 2 cores); the others use this test process's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.reliability.cli_runs import error_lines, prefect_api_url
from tests.reliability.conftest import variant, write_recipe

ROOT = Path(__file__).resolve().parents[2]
FOLLOW_UP = re.compile(r"^\(full log with tracebacks: (\S+\.log); or rerun with dareflow --debug\)$",
                       re.MULTILINE)


def _dareflow(argv: list[str], tmp_path: Path, *, own_server: bool,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m dareflow.cli ARGV`` as a user runs it: Prefect's default settings (no
    test overrides), analytics as installed, logs under ``tmp_path``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    clean.update(PREFECT_HOME=str(tmp_path / "prefect"), DAREFLOW_CACHE=str(tmp_path / "cache"),
                 **(env or {}))
    if not own_server:
        clean["PREFECT_API_URL"] = prefect_api_url()
    return subprocess.run([sys.executable, "-m", "dareflow.cli", *argv], check=False,
                          capture_output=True, text=True, env=clean, cwd=ROOT, timeout=300)


def _other_architecture(pico_family, tmp_path: Path) -> Path:
    """A recipe the merge flow's pre-flight task refuses (a Mistral among Llamas)."""
    other = variant(pico_family["a"], tmp_path / "mistral", config={"model_type": "mistral"})
    return write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(pico_family["base"]),
        "models": [{"model": str(other)}], "dtype": "float32"})


def _log_file(stderr: str) -> Path:
    [path] = FOLLOW_UP.findall(stderr)
    return Path(path)


def test_refused_merge_prints_one_error_line_and_keeps_the_traceback_in_the_log(
        pico_family, tmp_path):
    recipe = _other_architecture(pico_family, tmp_path)
    argv = ["merge", str(recipe), "--out", str(tmp_path / "out"), "--store",
            str(tmp_path / "store")]
    run = _dareflow(argv, tmp_path, own_server=True)
    assert run.returncode == 2, run.stderr
    [error] = error_lines(run.stderr)
    assert error.startswith(f"error: models cannot be merged with base '{pico_family['base']}'")
    assert "model_type 'mistral' differs from the base's 'llama'" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert "telemetry" not in (run.stderr + run.stdout).lower()
    assert "Beginning flow run" in run.stderr  # progress is still shown
    assert "Finished in state Failed" not in run.stderr  # the error line says it once
    log = _log_file(run.stderr)
    assert log.parent == tmp_path / "cache" / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text
    assert "dareflow merge failed: models cannot be merged" in text
    assert "raise ValueError(" in text  # down to the check that refused it

    debug = _dareflow(["--debug", *argv], tmp_path, own_server=True)
    assert debug.returncode == 2
    assert len(error_lines(debug.stderr)) == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "telemetry" not in (debug.stderr + debug.stdout).lower()


def test_unexpected_error_in_a_task_is_one_error_line_too(pico_family, tmp_path):
    """Not a user's mistake (an injected RuntimeError in a unit task): one line naming
    the exception's type, exit code 1; ``--debug`` after the subcommand also works."""
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"])}], "dtype": "float32"})
    argv = ["merge", str(recipe), "--out", str(tmp_path / "out"), "--store",
            str(tmp_path / "store"), "--max-workers", "1"]
    fault = {"DAREFLOW_FAULT": "shard-written:raise"}
    run = _dareflow(argv, tmp_path, own_server=False, env=fault)
    assert run.returncode == 1, run.stderr
    assert error_lines(run.stderr) == [(
        "error: unexpected RuntimeError: injected fault at shard-written "
        "(DAREFLOW_FAULT=shard-written:raise)")]
    assert "Traceback" not in run.stderr
    assert "RuntimeError: injected fault" in _log_file(run.stderr).read_text()
    debug = _dareflow([*argv, "--debug"], tmp_path, own_server=False, env=fault)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_failed_evaluation_prints_one_error_line(pico_family, tmp_path):
    """The evaluation flow fails in its first task (the store lies under a file)."""
    (tmp_path / "file").write_text("not a folder\n")
    suite = tmp_path / "one_v1.yaml"
    suite.write_text("name: one_v1\ndescription: one task\ntasks:\n"
                     "  - name: winogrande\n    shots: 5\n    metric: acc\n")
    run = _dareflow(["eval", f"m={pico_family['base']}", "--suite", str(suite), "--limit", "2",
                     "--store", str(tmp_path / "file" / "store"), "--offline-mirror"],
                    tmp_path, own_server=False)
    assert run.returncode == 2, run.stderr
    assert len(error_lines(run.stderr)) == 1, run.stderr
    assert str(tmp_path / "file") in error_lines(run.stderr)[0]
    assert "Traceback" not in run.stderr
