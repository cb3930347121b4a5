"""What a command that runs flows prints, and the log file that keeps the rest.

Prefect's console handler prints every log record, tracebacks included: an error raised
in a task came out as one to nine Prefect tracebacks (85-311 lines) before the CLI's own
``error:`` line. During a command :func:`session`:

- the console shows progress (Prefect's run logs, warnings) without tracebacks, and not
  the engine's reports of the failed run (each repeats the exception the CLI prints
  once, as its ``error:`` line);
- a log file, ``$DAREFLOW_CACHE/logs/dareflow-<command>-<time>-<pid>.log`` (see
  ``dareflow.settings.cache_dir``), keeps every record in full, tracebacks included,
  and the traceback of the error the command ended with; the ``error:`` line is
  followed by its path;
- ``dareflow --debug`` keeps Prefect's console output as it is (every traceback).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from dareflow.settings import cache_dir

#: A record with this attribute set (``extra={FILE_ONLY: True}``) goes to the log file only.
FILE_ONLY = "dareflow_file_only"
#: Log files kept in the logs folder (the oldest are removed when a command starts).
KEEP_LOGS = 100
#: Prefect's loggers of flow and task runs (the engine's reports and get_run_logger()).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
FILE_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"


def logs_dir() -> Path:
    """Where commands keep their log files: ``{cache_dir()}/logs``."""
    return cache_dir() / "logs"


class ConsoleFilter(logging.Filter):
    """Drops from the console what the ``error:`` line says once: the engine's reports
    of a failed or crashed run (ERROR records of the run loggers; our tasks log
    warnings and progress, never errors) and their final states; and records meant
    for the log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, FILE_ONLY, False):
            return False
        if record.name.startswith(RUN_LOGGERS):
            if record.levelno >= logging.ERROR:
                return False
            if str(record.msg).startswith(("Finished in state Failed",
                                           "Finished in state Crashed")):
                return False
        return True


class WithoutTraceback(logging.Formatter):
    """Formats with ``inner``, leaving out the traceback and stack (the log file has
    them): the record's own fields are restored afterwards for the other handlers."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


@contextlib.contextmanager
def session(command: str, *, debug: bool = False) -> Iterator[Path]:
    """Console and log file of one command that runs flows (see the module docstring).

    Args:
        command: The subcommand's name (in the log file's name).
        debug: Leave Prefect's console output as it is (every traceback).

    Yields:
        The log file's path (created when the first record is logged).
    """
    # Prefect configures its logging (the console handler on the root logger) when its
    # main module is imported; before that a handler of ours on the root logger would
    # make it leave the root logger without its console
    import prefect.main  # noqa: F401

    folder = logs_dir()
    _prune(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"dareflow-{command}-{stamp}-{os.getpid()}.log"
    root = logging.getLogger()
    consoles = [] if debug else [h for h in root.handlers if _is_prefect_console(h)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        to_file: logging.Handler | None = logging.FileHandler(path, delay=True,
                                                              encoding="utf-8")
    except OSError:  # no log file: the console still shows the error line
        to_file = None
    if to_file is not None:
        to_file.setFormatter(logging.Formatter(FILE_FORMAT))
        root.addHandler(to_file)
    saved = [(h, h.formatter) for h in consoles]
    console_filter = ConsoleFilter()
    for handler, formatter in saved:
        handler.addFilter(console_filter)
        handler.setFormatter(WithoutTraceback(formatter))
    try:
        yield path
    finally:
        for handler, formatter in saved:
            handler.removeFilter(console_filter)
            handler.setFormatter(formatter)
        if to_file is not None:
            root.removeHandler(to_file)
            to_file.close()


def log_failure(message: str, exc: BaseException) -> None:
    """Write ``message`` and ``exc`` with its traceback to the log file only."""
    logging.getLogger("dareflow.cli").error(message, exc_info=exc, extra={FILE_ONLY: True})


def _is_prefect_console(handler: logging.Handler) -> bool:
    from prefect.logging.handlers import PrefectConsoleHandler

    return isinstance(handler, PrefectConsoleHandler)


def _prune(folder: Path) -> None:
    """Keep the newest ``KEEP_LOGS - 1`` log files (this command adds one)."""
    with contextlib.suppress(OSError):
        logs = sorted(folder.glob("dareflow-*.log"), key=lambda p: p.stat().st_mtime)
        for old in logs[:max(0, len(logs) - KEEP_LOGS + 1)]:
            with contextlib.suppress(OSError):
                old.unlink()
