"""The error toolkit: problem lists, "did you mean", transient errors, fault injection.

Every module reports bad input through these few pieces, so messages look the same
everywhere and retries follow one rule:

- :class:`ProblemsError` / :func:`format_problems`: all problems of one input at once
  (``path: 3 problems:`` then one ``  - line`` each);
- :func:`unknown_choice` and :func:`did_you_mean`: the one place that calls difflib;
- :func:`is_transient`: whether an error is worth retrying (network, throttling, 5xx,
  an out-of-memory child), never a full disk, a missing file or refused credentials;
- :func:`fault_point`: the fault-injection hook the reliability tests drive through
  ``DAREFLOW_FAULT``.
"""

import difflib
import errno
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

# ------------------------------------------------------------------------------ problems


def format_problems(source: str, problems: list[str]) -> str:
    """``source: N problem(s):`` followed by one indented ``- line`` per problem."""
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{source}: {count}:\n{lines}"


class ProblemsError(ValueError):
    """An input (a recipe, a suite, a sweep file) with one or more problems.

    Attributes:
        source: the file or label the problems are about.
        problems: one line per problem, each naming the key, what is wrong and the fix.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(format_problems(source, problems))

    def __reduce__(self) -> tuple:  # pickles through Prefect results and Dask workers
        return type(self), (self.source, self.problems)


# ------------------------------------------------------------------------- did you mean


def did_you_mean(value: object, choices: Iterable[str]) -> str | None:
    """The choice closest to ``value``, if any is close enough to suggest."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return close[0] if close else None


def unknown_choice(what: str, value: object, choices: Iterable[str]) -> str:
    """``unknown <what> 'x'; did you mean 'y'? choices: a, b, c`` (no suggestion when none
    is close)."""
    choices = sorted(choices)
    close = did_you_mean(value, choices)
    hint = f"did you mean '{close}'? " if close else ""
    return f"unknown {what} {quote(str(value))}; {hint}choices: {', '.join(choices)}"


#: Characters of a user's value that a message quotes (the rest is cut, with "…").
QUOTE_CHARS = 200


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (``…`` and the full length follow), so a
    message never echoes a huge value back (a 1 MB string, a list expanded by YAML
    aliases)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


# ------------------------------------------------------------------------------ retries

#: Exception type names that mean "try again later": connection and timeout errors of
#: the standard library, botocore, aiohttp, requests and fsspec, and an out-of-memory
#: child (the same run may fit once the machine is less loaded). By name, because a
#: child process reports only the name of the error it died of.
TRANSIENT_TYPES = frozenset({
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError",
    "ConnectionAbortedError", "BrokenPipeError", "TimeoutError",
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ClientConnectorError", "ClientConnectionError",
    "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError",
    "ClientPayloadError", "IncompleteReadError", "FSTimeoutError",
    "ReadTimeout", "ConnectTimeout", "HTTPError",
    "MemoryError", "OutOfMemoryError",
    "TransientError",
})
#: S3 error codes (and HTTP statuses as codes) that mean "slow down" or "server trouble".
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "RequestTimeout", "ServiceUnavailable", "InternalError",
    "503", "500", "502", "504",
})
#: OS errors that retrying cannot fix, whatever else the chain says.
_PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                               errno.EPERM, errno.ENOENT, errno.EEXIST, errno.EISDIR,
                               errno.ENOTDIR})


class TransientError(OSError):
    """An IO error that may pass on a second try (e.g. a file that changed in transit)."""


def is_transient(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error in its cause chain) is worth retrying.

    Yes: connection refused/reset/closed, timeouts, HTTP 5xx and 429, S3 SlowDown and
    throttling, :class:`TransientError`, an out-of-memory error. No: a full or read-only
    disk, a missing or existing file, refused permissions, anything else.
    """
    seen: set[int] = set()
    e = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _PERMANENT_ERRNOS:
            return False
        if isinstance(e, ConnectionError | TimeoutError | MemoryError | TransientError):
            return True
        if is_transient_name(type(e).__name__):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in TRANSIENT_CODES or (isinstance(status, int) and (
                    status >= 500 or status == 429)):
                return True
        e = e.__cause__ or e.__context__
    return False


def is_transient_name(type_name: str) -> bool:
    """:func:`is_transient` for an error known only by its type name (a child's report)."""
    return type_name in TRANSIENT_TYPES


# ------------------------------------------------------------------------ fault injection

FAULT_ENV = "DAREFLOW_FAULT"
_FAULT_LOCK = threading.Lock()
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Test hook: injects a fault where ``point`` is reached, as ``$DAREFLOW_FAULT`` says.

    ``DAREFLOW_FAULT=<point>:<n>`` SIGKILLs the process the n-th time ``point`` is
    reached; ``<point>:raise`` raises ``RuntimeError`` every time; ``<point>:kill-once:<file>``
    SIGKILLs the first process to reach it (creating ``<file>``), as the OOM killer
    would; ``<point>:sleep:<seconds>`` sleeps that long, as a hung process would (timeouts).
    Unset (always, outside tests), this returns at once.
    """
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith(point + ":"):
        return
    action = spec[len(point) + 1:]
    if action == "raise":
        raise RuntimeError(f"injected fault at {point} ({FAULT_ENV}={spec})")
    if action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
        return
    if action.startswith("kill-once:"):
        marker = Path(action.split(":", 1)[1])
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return
    with _FAULT_LOCK:
        _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
        if _FAULT_COUNTS[point] >= int(action):
            os.kill(os.getpid(), signal.SIGKILL)
