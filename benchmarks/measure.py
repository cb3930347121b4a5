"""Measuring a command: wall time, CPU time, peak RSS and peak anonymous memory.

CPU time is the child's rusage (user + system, its waited-for descendants
included). Memory is sampled from ``/proc/<pid>/status`` of the whole process tree
(every process whose parent chain leads to the child) every ``interval`` seconds:
``VmRSS`` summed is the tree's resident set, ``RssAnon`` summed its anonymous memory
(heap, tensors; not the page cache of memory-mapped files). Sampling can miss a
spike shorter than the interval. ``ru_maxrss`` (the largest single process) is kept
but not shown: it includes the pages the child shared with this process between fork
and exec, so after this process built a family it says nothing about the child.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class RunStats:
    """What one measured run cost."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float  # sampled, whole process tree
    peak_anon_mb: float  # sampled, whole process tree
    maxrss_mb: float  # exact, largest single process
    returncode: int
    phases: dict[str, float] = field(default_factory=dict)  # where the wall time went


def _status_kb(pid: int) -> tuple[int, int]:
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, anon


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant (from ``/proc/*/stat`` parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # the command name may hold spaces and parentheses: split after the last ')'
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(parents.get(pid, []))
    return tree


def tree_memory_kb(root: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) summed over the tree of ``root``, in KiB."""
    rss = anon = 0
    for pid in process_tree(root):
        r, a = _status_kb(pid)
        rss += r
        anon += a
    return rss, anon


def run_measured(cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: str | None = None, log_path: str | None = None,
                 interval: float = 0.05) -> RunStats:
    """Run ``cmd`` to completion and measure it (see the module docstring).

    Output goes to ``log_path`` (or is discarded).
    """
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None,
                                cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        peak = [0, 0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss, anon = tree_memory_kb(proc.pid)
                peak[0] = max(peak[0], rss)
                peak[1] = max(peak[1], anon)
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_path:
            out.close()
    return RunStats(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=peak[0] / 1024,
        peak_anon_mb=peak[1] / 1024,
        maxrss_mb=usage.ru_maxrss / 1024,
        returncode=proc.returncode,
    )


def warm_inputs(inputs: Sequence[str], block: int = 8 << 20) -> None:
    """Read every input once (untimed) so each measured run starts with them in the page
    cache: otherwise whichever run goes first after the cache lost them pays the disk."""
    view = memoryview(bytearray(block))
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def drop_from_cache(paths: Sequence[str]) -> None:
    """Evict every file of ``paths`` from the page cache (``POSIX_FADV_DONTNEED``; no root
    needed; clean pages only: call after :func:`os.sync`), so the next run reads them
    from the disk: a cold cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def io_floor(inputs: Sequence[str], out_path: str, out_bytes: int,
             block: int = 8 << 20, direct: bool = False) -> RunStats:
    """The IO floor of a merge: read every input file once, write ``out_bytes`` with
    fsync (what any merge must at least do), timed in this process.

    ``direct``: write with ``O_DIRECT`` from a page-aligned buffer (as dareflow writes
    its shards on a local disk), skipping the page cache; falls back to a buffered
    write where the filesystem refuses it.
    """
    before = os.times()
    started = time.perf_counter()
    buffer = mmap.mmap(-1, block)  # page-aligned, so O_DIRECT accepts it
    view = memoryview(buffer)
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = -1
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(out_path, flags | os.O_DIRECT, 0o644)
        except OSError:
            fd = -1
    if fd < 0:
        fd = os.open(out_path, flags, 0o644)
    try:
        left = -(-out_bytes // 4096) * 4096 if direct else out_bytes
        while left:
            left -= os.write(fd, view[: min(left, block)])
        os.ftruncate(fd, out_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - started
    after = os.times()
    os.remove(out_path)
    view.release()
    buffer.close()
    cpu = (after.user - before.user) + (after.system - before.system)
    return RunStats(wall, cpu, 0.0, 0.0, 0.0, 0)
