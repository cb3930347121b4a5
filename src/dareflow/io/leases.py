"""Leases: at most one worker computes a given unit at a time, in the normal case.

A lease is a small JSON object ``{owner, host, pid, renewed, ttl}`` at a lock URI
(``{store}/units/xx/KEY.lock``), created exclusively:

- local store: ``os.link`` of a complete temporary file onto the name (fails if the name
  exists, see ``dareflow.io.storage.create_exclusive``);
- s3: a conditional PUT (``If-None-Match: *``) that AWS S3 and moto refuse when the key
  exists; the object is read back afterwards, so on a server that ignores the header
  (nanio 0.1.7) only the last writer keeps the lease, except in a small window.

The holder renews the lease every ``ttl / 4`` seconds from a daemon thread and deletes it
when done. A worker that finds a fresh lease held by someone else waits (polling) until
``done()`` reports the result, the lease disappears (then it tries to take it), or the
lease goes stale; it stops waiting after ``wait_s`` and computes anyway. A lease is stale
when it was not renewed for ``ttl`` seconds, or its holder was a process on this host that
no longer exists (a SIGKILLed run is taken over at once on the same machine).

Correctness never depends on the lease: outputs are content-addressed, deterministic and
written atomically, so two workers that both compute a unit write identical bytes. The
lease only avoids duplicated work. Settings: ``DAREFLOW_LEASE_TTL`` (seconds, default
120) and ``DAREFLOW_LEASE_WAIT`` (seconds, default 3600).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dareflow.io import storage

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 120.0
DEFAULT_WAIT_S = 3600.0
_MAX_POLL_S = 2.0

T = TypeVar("T")

_HELD: dict[tuple[str, int], Lease] = {}
_HELD_LOCK = threading.Lock()


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(
            f"{name}={raw!r} is not a positive number of seconds; unset it or give e.g. "
            f"{name}={int(default)}"
        )
    return value


def lease_ttl() -> float:
    """Seconds without renewal after which a lease is stale (``DAREFLOW_LEASE_TTL``)."""
    return _env_seconds("DAREFLOW_LEASE_TTL", DEFAULT_TTL_S)


def lease_wait() -> float:
    """Longest wait for another holder's result (``DAREFLOW_LEASE_WAIT``)."""
    return _env_seconds("DAREFLOW_LEASE_WAIT", DEFAULT_WAIT_S)


@dataclass
class Lease:
    """A lease this process holds; ``release()`` it when the work is committed."""

    uri: str
    owner: str
    ttl: float
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                doc = read_lease(self.uri)
                if doc is None or doc.get("owner") != self.owner:
                    logger.warning("lease %s was taken over; stop renewing it", self.uri)
                    return
                storage.write_bytes_atomic(self.uri, _body(self.owner, self.ttl))
            except OSError as e:  # a transient store error: try again at the next beat
                logger.warning("could not renew lease %s: %s", self.uri, e)

    def start(self) -> Lease:
        """Renew the lease every ``ttl / 4`` seconds from a daemon thread until released."""
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name=f"lease-{self.uri[-12:]}")
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (idempotent)."""
        self._stop.set()
        with _HELD_LOCK:
            for k in [k for k, v in _HELD.items() if v is self]:
                del _HELD[k]
        try:
            doc = read_lease(self.uri)
            if doc is not None and doc.get("owner") == self.owner:
                storage.remove(self.uri, missing_ok=True)
        except OSError as e:
            logger.warning("could not delete lease %s (it will go stale): %s", self.uri, e)


def _body(owner: str, ttl: float) -> bytes:
    return json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "renewed": time.time(), "ttl": ttl}, sort_keys=True).encode()


def read_lease(uri: str) -> dict[str, Any] | None:
    """The lease document at ``uri``, None if there is none; ``{}`` if unreadable."""
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(doc: dict[str, Any], ttl: float, now: float | None = None) -> bool:
    """Whether a lease document no longer protects its unit (see the module docstring).

    Clocks of the machines sharing a store must agree to well within ``ttl``.
    """
    now = time.time() if now is None else now
    try:
        renewed = float(doc["renewed"])
    except (KeyError, TypeError, ValueError):
        return True  # unreadable: never written by this code, or corrupted
    if now - renewed > ttl:
        return True
    if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int):
        return not _pid_alive(doc["pid"])
    return False


def try_acquire(uri: str, ttl: float) -> Lease | None:
    """Take the lease at ``uri`` if it is free or stale; None if someone else holds it."""
    owner = uuid.uuid4().hex
    created = storage.create_exclusive(uri, _body(owner, ttl))
    if not created:
        doc = read_lease(uri)
        if doc is not None and not is_stale(doc, ttl):
            return None
        logger.warning("taking over stale lease %s (holder %s, pid %s)", uri,
                       (doc or {}).get("host"), (doc or {}).get("pid"))
        storage.remove(uri, missing_ok=True)
        created = storage.create_exclusive(uri, _body(owner, ttl))
    if not created:
        return None
    if storage.is_s3_uri(uri):
        # Servers that ignore If-None-Match let the last writer win: read back.
        doc = read_lease(uri)
        if doc is None or doc.get("owner") != owner:
            return None
    lease = Lease(uri, owner, ttl).start()
    with _HELD_LOCK:
        _HELD[(uri, threading.get_ident())] = lease
    _test_hold()
    return lease


def acquire_or_wait(uri: str, done: Callable[[], T | None], *, ttl: float | None = None,
                    wait_s: float | None = None) -> tuple[Lease | None, T | None]:
    """Take the lease at ``uri``, or wait until ``done()`` returns a result.

    Args:
        uri: The lock URI.
        done: Returns the committed result, or None while there is none.
        ttl: Staleness threshold in seconds (default ``lease_ttl()``).
        wait_s: Longest wait (default ``lease_wait()``).

    Returns:
        ``(lease, None)``: this caller must do the work, then ``lease.release()``.
        ``(None, result)``: another holder finished it.
        ``(None, None)``: waited ``wait_s`` in vain; do the work without a lease.
    """
    ttl = lease_ttl() if ttl is None else ttl
    wait_s = lease_wait() if wait_s is None else wait_s
    _test_barrier()
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        lease = try_acquire(uri, ttl)
        if lease is not None:
            # Another holder may have committed and released between our check and claim.
            result = done()
            if result is not None:
                lease.release()
                return None, result
            return lease, None
        result = done()
        if result is not None:
            return None, result
        if time.monotonic() > deadline:
            logger.warning("waited %.0f s for the holder of %s; computing it here too "
                           "(same bytes, atomic writes)", wait_s, uri)
            return None, None
        time.sleep(delay)
        delay = min(delay * 1.5, _MAX_POLL_S)


def release_held(uri: str) -> None:
    """Release the lease at ``uri`` if this thread still holds it (after an error)."""
    with _HELD_LOCK:
        lease = _HELD.get((uri, threading.get_ident()))
    if lease is not None:
        lease.release()


# -- test hooks (fault-injection tests of concurrent runs) -----------------------------------------

_BARRIER_DONE = threading.Event()


def _test_hold() -> None:
    """``DAREFLOW_TEST_LEASE_HOLD=<seconds>``: sleep after taking a lease, so that tests can
    observe another run waiting for it."""
    hold = os.environ.get("DAREFLOW_TEST_LEASE_HOLD")
    if hold:
        time.sleep(float(hold))


def _test_barrier() -> None:
    """``DAREFLOW_TEST_BARRIER=<dir>:<n>``: before its first claim, each process marks
    itself in ``dir`` and waits (up to 120 s) until ``n`` processes have, so that runs
    started at once reach their units at once whatever their start-up times."""
    spec = os.environ.get("DAREFLOW_TEST_BARRIER")
    if not spec or _BARRIER_DONE.is_set():
        return
    folder, n = spec.rsplit(":", 1)
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(folder)) < int(n) and time.monotonic() < deadline:
        time.sleep(0.05)
    _BARRIER_DONE.set()
