"""No orphans: a ``dareflow merge`` killed with SIGKILL takes its temporary Prefect server
(a uvicorn child process, ~230 MB) with it; it used to live on under pid 1, one per kill.

The merge runs as a real process without ``PREFECT_API_URL``, so it starts its own
temporary server (``dareflow.flows.runtime``); ``DAREFLOW_FAULT`` SIGKILLs it in the
middle of the flow, when the first unit's shard is written. Its descendants are found
through /proc while it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import write_recipe

ROOT = Path(__file__).resolve().parents[2]
#: How long the server may take to notice and shut down (it polls every 0.25 s).
EXIT_WITHIN_S = 10.0

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int, known: dict[int, tuple[int, str]]) -> None:
    """Add every live descendant of ``root`` to ``known`` (pid -> start time, command)."""
    parents = {root, *known}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in known:
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] in parents:
                known[int(entry.name)] = stat[2], _cmdline(int(entry.name))


def _alive(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (a zombie
    waiting for pid 1 to reap it does not)."""
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[1] != "Z"


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def test_killed_merge_takes_its_temporary_server_with_it(pico_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"])}], "dtype": "float32"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), DAREFLOW_CACHE=str(tmp_path / "cache"),
               DAREFLOW_FAULT="shard-written:1")
    argv = [sys.executable, "-m", "dareflow.cli", "merge", str(recipe), "--out",
            str(tmp_path / "out"), "--store", str(tmp_path / "store"), "--max-workers", "1"]
    seen: dict[int, tuple[int, str]] = {}
    with open(tmp_path / "merge.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            _descendants(proc.pid, seen)
            time.sleep(0.05)
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "merge.log").read_text()
        assert any("uvicorn" in command or "dareflow.flows.runtime" in command
                   for _, command in seen.values()), f"no temporary server among {seen}"
        killed = time.monotonic()
        while time.monotonic() - killed < EXIT_WITHIN_S and any(
                _alive(pid, started) for pid, (started, _) in seen.items()):
            time.sleep(0.1)
        survivors = {pid: command for pid, (started, command) in seen.items()
                     if _alive(pid, started)}
        assert survivors == {}, f"outlived the killed merge by {EXIT_WITHIN_S} s: {survivors}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid, (started, _) in seen.items():  # this test's, should it have failed
            if _alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
