"""Storage errors named after their URI, and retries of transient remote failures.

:func:`storage_errors` turns what a filesystem or an object-store client raises into a
built-in exception (``FileNotFoundError``, ``PermissionError``, ``OSError``) whose message
names the URI, what failed and what to check. :func:`call` runs one remote operation under
it and retries transient failures (``dareflow.errors.is_transient``) with exponential
backoff, bounded both in attempts and in total time (:func:`retry_policy`).
``dareflow.io.storage`` and ``dareflow.io.localdisk`` use both.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from dareflow.errors import is_transient

# Exceptions of object-store client libraries that are not OSError subclasses
# (botocore's NoCredentialsError, EndpointConnectionError, ...): turned into OSError.
_BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "google", "azure")


@contextlib.contextmanager
def storage_errors(uri: str, action: str) -> Iterator[None]:
    """Re-raise storage errors as built-in exceptions whose message names ``uri``."""
    try:
        yield
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"cannot {action} {uri!r}: no such file, folder or object ({reason(e)}); "
            "check the path (bucket, prefix and key for object stores)"
        ) from e
    except IsADirectoryError as e:
        raise IsADirectoryError(
            f"cannot {action} {uri!r}: it is a folder, not a file ({reason(e)}); "
            "pass the URI of a file inside it"
        ) from e
    except NotADirectoryError as e:
        raise NotADirectoryError(
            f"cannot {action} {uri!r}: a parent is a file, not a folder ({reason(e)})"
        ) from e
    except PermissionError as e:
        raise PermissionError(
            f"cannot {action} {uri!r}: permission denied ({reason(e)}); check the "
            "credentials (for s3:// the AWS_* variables or the key/secret storage "
            "options) and the access rights on the path"
        ) from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC, f"cannot {action} {uri!r}: the store is full ({reason(e)}); "
                "free space there, or point the store elsewhere (--store or "
                "DAREFLOW_STORE) and run again: committed units are kept"
            ) from e
        raise OSError(f"cannot {action} {uri!r}: {reason(e)}") from e
    except Exception as e:  # only client-library errors are translated, others re-raised
        if type(e).__module__.split(".")[0] not in _BACKEND_MODULES:
            raise
        raise OSError(
            f"cannot {action} {uri!r}: {type(e).__name__}: {e}; check the endpoint, "
            "network and credentials of the store"
        ) from e


def reason(e: BaseException) -> str:
    """``"ExceptionType: message"`` (just the type when the message is empty)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------- retries
# Remote stores fail transiently (a restarted server, a dropped connection, 5xx,
# throttling). botocore and s3fs retry a little on their own; on top of that every
# remote read/write/listing is retried with exponential backoff, bounded both in
# attempts and in total time. Local files are never retried (ENOSPC does not heal).

#: Environment variables: attempts (>= 1), total seconds, first delay in seconds.
RETRY_ATTEMPTS_ENV = "DAREFLOW_STORAGE_RETRIES"
RETRY_SECONDS_ENV = "DAREFLOW_STORAGE_RETRY_SECONDS"
RETRY_DELAY_ENV = "DAREFLOW_STORAGE_RETRY_DELAY"
RETRY_DEFAULTS = {RETRY_ATTEMPTS_ENV: 6.0, RETRY_SECONDS_ENV: 60.0, RETRY_DELAY_ENV: 0.5}

_log = logging.getLogger(__name__)


def retry_policy() -> tuple[int, float, float]:
    """``(attempts, total_seconds, first_delay)`` from the environment (see RETRY_*).

    Raises:
        ValueError: a variable is not a number in its range (the message names it).
    """
    values = {}
    for var, default in RETRY_DEFAULTS.items():
        raw = os.environ.get(var, "")
        try:
            value = float(raw) if raw.strip() else default
        except ValueError:
            value = -1.0
        low = 1.0 if var == RETRY_ATTEMPTS_ENV else 0.0
        if not value >= low:
            raise ValueError(
                f"{var}={raw!r} is not a number >= {low:g}; set it to e.g. "
                f"{default:g} (or unset it for the default)"
            )
        values[var] = value
    return (int(values[RETRY_ATTEMPTS_ENV]), values[RETRY_SECONDS_ENV],
            values[RETRY_DELAY_ENV])


def call(uri: str, action: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` (a remote operation) with storage errors named after ``uri``; transient
    errors are retried with exponential backoff (see ``retry_policy``)."""
    attempts, budget, delay = retry_policy()
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            with storage_errors(uri, action):
                return fn()
        except OSError as e:
            elapsed = time.monotonic() - started
            if not is_transient(e):
                raise
            if attempt == attempts or elapsed + delay > budget:
                raise OSError(
                    f"{e}; gave up after {attempt} attempt(s) in {elapsed:.1f} s "
                    f"({RETRY_ATTEMPTS_ENV}={attempts}, {RETRY_SECONDS_ENV}={budget:g}); "
                    "check that the store is up and reachable, or raise these limits"
                ) from e
            _log.warning("cannot %s %s (attempt %d/%d): %s; retrying in %.1f s",
                         action, uri, attempt, attempts, reason(e.__cause__ or e), delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
