"""Where a merge publishes: one run per output at a time, a staging folder of its own,
and one atomic step.

:func:`reserve`, before any heavy work:

- takes the lock ``<out>.dareflow-lock`` beside the output, created exclusively
  (``os.link`` locally, a conditional PUT on S3; ``dareflow.io.storage.create_exclusive``)
  and holding the run id, host and pid. It is renewed as a unit lease is
  (``dareflow.io.leases``), so a second run into the same ``--out`` is refused, naming the
  holder. A lock whose holder is gone (a process of this host that no longer exists, or
  not renewed for ``DAREFLOW_LEASE_TTL`` seconds) is taken over, and what that run left
  beside the output (its staging folder, a previous output it had moved aside) is cleaned
  up or put back. A file there that is not such a lock is never touched: refused.
- local outputs: creates the staging folder ``<out>.partial-<run id>`` beside the output
  with ``os.mkdir`` (exclusive). Only this run writes into it or deletes it; it goes when
  the run fails. Creating lock and folder is the probe of the output's filesystem: a
  read-only or full one is reported as the output's, before anything is merged.
  Object stores have no rename: the model is assembled in place and ``manifest.json``,
  written last, marks it complete.

:func:`publish` then makes the finished model visible in one step that cannot leave a
half folder: a rename of the complete staging folder onto ``out`` (refused, replacing
nothing, when a non-empty ``out`` appeared meanwhile); with ``--overwrite`` an atomic swap
of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``) after which the previous model,
now under the staging name, is deleted, so a reader sees the old or the new complete model.
Where the swap is not available: the old folder is renamed aside, the new one in, the old
one deleted (a reader may find no folder between the two renames; a run killed there is
undone by the next run's takeover).

:func:`check_space` compares the output filesystem's free space with the merged model's
size (the pre-flight runs it); :func:`output_errors` reports a full or read-only output
as the output's, never as the store's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dareflow.errors import fault_point
from dareflow.io import leases, localdisk, storage

logger = logging.getLogger(__name__)

#: Suffix of the lock beside an output; the staging and aside folders' markers.
LOCK_SUFFIX = ".dareflow-lock"
STAGING_MARK = ".partial-"
ASIDE_MARK = ".old-"
_RUN_ID = re.compile(r"[0-9a-f]{16}")
_LOCK_KEYS = {"owner", "host", "pid", "renewed", "ttl"}


@dataclass(frozen=True)
class Reservation:
    """An output this run holds: where it assembles the model and under which id."""

    out_uri: str
    staging_uri: str
    run_id: str


def is_local(uri: str) -> bool:
    """Whether ``uri`` is on the local disk (plain path or ``file://``)."""
    return localdisk.is_local(storage.get_fs(uri)[0])


def private_staging(uri: str) -> str | None:
    """The local path of ``uri`` if it is a run's own staging folder visible here, else None.

    A run's own staging folder (:func:`staging_uri` beside a local output) is read by
    nobody until :func:`publish`, so shards may be written into it as units finish
    (``dareflow.merge.units.merge_unit``) and a shard found there with its recorded size
    was written by this run. An object-store output is its own staging folder and may
    still hold the previous model: never that. A worker on another machine does not
    see the folder: None there.
    """
    if not uri or not is_local(uri):
        return None
    path = storage.get_fs(uri)[1].rstrip("/")
    name = os.path.basename(path)
    mark = name.rfind(STAGING_MARK)
    if mark <= 0 or not _RUN_ID.fullmatch(name[mark + len(STAGING_MARK):]):
        return None
    return path if os.path.isdir(path) else None


def lock_uri(out_uri: str) -> str:
    """The lock of an output: ``<out>.dareflow-lock`` beside it."""
    return out_uri.rstrip("/") + LOCK_SUFFIX


def staging_uri(out_uri: str, run_id: str) -> str:
    """Where run ``run_id`` assembles the model: ``<out>.partial-<run id>`` beside a local
    output; the output itself on an object store (no rename there)."""
    return out_uri.rstrip("/") + STAGING_MARK + run_id if is_local(out_uri) else out_uri


@contextlib.contextmanager
def reserve(out_uri: str, *, wait_s: float = 0.0) -> Iterator[Reservation]:
    """Hold ``out_uri`` for this run: its lock, and a staging folder of this run's own.

    On exit the staging folder is removed if it is still there (the run failed before
    :func:`publish`) and the lock is released.

    Args:
        out_uri: The output folder or URI.
        wait_s: How long to wait for another run's lock before refusing (0: refuse now).

    Raises:
        FileExistsError: another run holds the output's lock, or a file that is not a
            dareflow lock has the lock's name.
        PermissionError: the output's filesystem is read-only or not writable by us.
        OSError: the output's filesystem is full (errno ENOSPC).
    """
    run_id = uuid.uuid4().hex[:16]
    with output_errors(out_uri, probe=True):
        lock = _acquire(out_uri, run_id, wait_s)
    staging, created = staging_uri(out_uri, run_id), False
    try:
        if staging != out_uri:
            path = storage.get_fs(staging)[1]
            with output_errors(out_uri, probe=True):
                os.mkdir(path)  # exclusive: never an existing folder (the id is new)
            created = True
        yield Reservation(out_uri, staging, run_id)
    finally:
        try:
            path = storage.get_fs(staging)[1]
            if created and os.path.lexists(path):  # published: renamed away
                _remove_own(path)
        finally:
            lock.release()


def publish(staging: str, out_uri: str, *, overwrite: bool) -> None:
    """Make the finished model in ``staging`` visible at ``out_uri`` in one step.

    Raises:
        FileExistsError: without ``overwrite``, a non-empty ``out_uri`` appeared while the
            model was assembled (nothing is replaced).
    """
    if staging == out_uri:
        return  # object store: assembled in place, manifest.json written last
    src, dst = storage.get_fs(staging)[1], storage.get_fs(out_uri)[1]
    with output_errors(out_uri):
        if overwrite and os.path.lexists(dst):
            _replace(src, dst)
        else:
            _rename_into_place(src, dst, out_uri)
        localdisk.fsync_dir(os.path.dirname(os.path.abspath(dst)))


def check_space(out_uri: str, nbytes: int) -> None:
    """Refuse an output whose filesystem cannot hold ``nbytes`` (the merged shards).

    Raises:
        OSError: errno ENOSPC, the message naming the output.
    """
    if not is_local(out_uri):
        return
    folder = _existing(_parent(out_uri))
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise os_error(OSError, errno.ENOSPC, (
            f"the output is full: '{out_uri}' needs about {_size(nbytes)} for the merged "
            f"shards and its filesystem ({folder}) has {_size(free)} free; free space there "
            "or choose another --out (nothing was merged)"))


@contextlib.contextmanager
def output_errors(out_uri: str, *, probe: bool = False) -> Iterator[None]:
    """Report a full or read-only filesystem under ``out_uri`` as the output's.

    Args:
        out_uri: The output being written.
        probe: The first writes of a run (its lock and staging folder), before anything is
            merged: permission errors are the output's too (later, a read of an input
            may fail with EACCES as well).
    """
    try:
        yield
    except OSError as e:
        code = _errno(e)
        then = (" (nothing was merged)" if probe else ", and run again: units already "
                "merged are kept in the store, so the rerun only assembles")
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise os_error(OSError, errno.ENOSPC, (
                f"cannot write the output '{out_uri}': the output is full "
                f"({os.strerror(code)}); free space there or choose another --out{then}"
            )) from e
        if code == errno.EROFS:
            raise os_error(PermissionError, code, (
                f"cannot write the output '{out_uri}': its filesystem is read-only; choose "
                f"a --out on a writable filesystem{then}")) from e
        if probe and code in (errno.EACCES, errno.EPERM):
            raise os_error(PermissionError, code, (
                f"cannot write the output '{out_uri}': permission denied in "
                f"'{_parent(out_uri)}'; choose a --out you can write, or fix the permissions "
                f"there{then}")) from e
        raise


# ------------------------------------------------------------------------------ the lock


def _acquire(out_uri: str, run_id: str, wait_s: float) -> leases.Lease:
    """Create the output's lock, take over a dead holder's, or wait up to ``wait_s``."""
    uri, ttl = lock_uri(out_uri), leases.lease_ttl()
    deadline, delay = time.monotonic() + wait_s, 0.05
    while True:
        if storage.create_exclusive(uri, _lock_body(run_id, ttl)):
            if not storage.is_s3_uri(uri):
                break
            doc = leases.read_lease(uri)  # a server that ignores If-None-Match: the last
            if doc is not None and doc.get("owner") == run_id:  # writer wins, so read back
                break
        doc = leases.read_lease(uri)
        if doc is None:
            continue  # released between our attempt and the read: try again
        if not _LOCK_KEYS <= set(doc):
            raise FileExistsError(
                f"'{uri}' exists and is not a dareflow lock (dareflow locks the output "
                f"'{out_uri}' under that name); move that file away or choose another --out")
        if leases.is_stale(doc, ttl):
            _take_over(out_uri, uri, doc)
            continue
        if time.monotonic() >= deadline:
            raise FileExistsError(_busy(out_uri, uri, doc, ttl))
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    return leases.Lease(uri, run_id, ttl).start()


def _lock_body(run_id: str, ttl: float) -> bytes:
    """What the heartbeat of ``dareflow.io.leases`` rewrites: owner (the run id), host, pid."""
    return json.dumps({"owner": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "renewed": time.time(), "ttl": ttl}, sort_keys=True).encode()


def _busy(out_uri: str, uri: str, doc: dict[str, Any], ttl: float) -> str:
    age = max(0.0, time.time() - float(doc.get("renewed", 0)))
    return (
        f"another merge is writing to '{out_uri}' (run {doc.get('owner')}, pid "
        f"{doc.get('pid')} on {doc.get('host')}; its lock '{uri}' was renewed {age:.0f} s "
        "ago); wait for it to finish and run again, or choose another --out. A lock whose "
        f"run died is taken over (at once on this host, else after {ttl:g} s without "
        "renewal: DAREFLOW_LEASE_TTL)"
    )


def _take_over(out_uri: str, uri: str, doc: dict[str, Any]) -> None:
    """Remove a dead run's lock, after undoing what it left beside a local output."""
    owner = str(doc.get("owner", ""))
    logger.warning("taking over the lock of '%s' from run %s (pid %s on %s), which is gone",
                   out_uri, owner, doc.get("pid"), doc.get("host"))
    if is_local(out_uri) and _RUN_ID.fullmatch(owner):
        out = storage.get_fs(out_uri)[1].rstrip("/")
        aside = out + ASIDE_MARK + owner
        # (another run taking the same lock over at once may have done it already)
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(aside) and not os.path.lexists(out):
                os.rename(aside, out)  # it died between moving the old model aside and in
            for left in (aside, out + STAGING_MARK + owner):
                if os.path.lexists(left):
                    _remove_own(left)
    if leases.read_lease(uri) == doc:  # not already taken over by another run meanwhile
        storage.remove(uri, missing_ok=True)


# ----------------------------------------------------------------------------- publishing


def _rename_into_place(src: str, dst: str, out_uri: str) -> None:
    """``rename(src, dst)``: atomic, and it replaces at most an empty folder."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise FileExistsError(
            f"output '{out_uri}' appeared while this run was merging (written by another "
            "process); nothing was replaced. Run again with --overwrite to replace it, or "
            "choose another --out: the merged units are kept, so the rerun only assembles"
        ) from e


def _replace(src: str, dst: str) -> None:
    """Put the folder ``src`` at ``dst`` in place of what is there, then delete that."""
    if _exchange(src, dst):
        fault_point("output-swapped")
        _remove_own(src)  # now the previous output
        return
    aside = src.replace(STAGING_MARK, ASIDE_MARK)
    os.rename(dst, aside)
    fault_point("output-moved-aside")
    os.rename(src, dst)
    _remove_own(aside)


def _remove_own(path: str) -> None:
    """Delete a folder this run created or replaced (a link: only the link)."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.remove(path)
    else:
        shutil.rmtree(path)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False where this system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a kernel or filesystem without RENAME_EXCHANGE (e.g. NFS)
    raise OSError(code, os.strerror(code), b)


_RENAMEAT2: list[Any] = []


def _renameat2() -> Any:
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    if not _RENAMEAT2:
        fn = None
        with contextlib.suppress(OSError, AttributeError):
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


# -------------------------------------------------------------------------------- helpers


def _errno(e: BaseException | None) -> int | None:
    """The errno of the first OSError in ``e``'s cause chain that has one
    (``dareflow.io.retry.storage_errors`` re-raises without it)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        e = e.__cause__
    return None


def _parent(out_uri: str) -> str:
    """The folder that holds a local output (and its lock and staging folder)."""
    return os.path.dirname(os.path.abspath(storage.get_fs(out_uri)[1].rstrip("/")))


def os_error(kind: type[OSError], code: int, message: str) -> OSError:
    """``kind(message)`` with ``errno`` set: its text reads as the message alone (no
    ``[Errno n]`` prefix in the ``error:`` line)."""
    error = kind(message)
    error.errno = code
    return error


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
