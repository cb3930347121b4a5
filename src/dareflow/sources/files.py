"""What dareflow reads from a model folder besides weights, and how: regular files inside
the folder, of bounded size, never code.

A model folder is someone else's work (a download, a colleague's checkpoint). Its config,
tokenizer and sentence-transformers files are mirrored into the store and copied into the
merged model, which may be uploaded and published, so each such file must be:

- inside the folder: a symbolic link may point within it, or, for a Hugging Face cache
  snapshot (``…/models--org--name/snapshots/<sha>/``), into that repo's ``blobs/``
  folder; a link anywhere else (``vocab.txt -> /etc/passwd``) is refused, or it would be
  published with the model;
- a regular file: FIFOs, devices and sockets are never read (a FIFO blocks its reader
  forever); a file is opened non-blocking and checked on the open descriptor, so it
  cannot be swapped for another between the check and the read;
- at most :data:`MAX_MODEL_FILE_BYTES` (the largest tokenizer.json on the Hub is ~35 MB).

The output config carries no pointer to code: :data:`REMOTE_CODE_KEYS` are dropped
(:func:`drop_remote_code`), since a merge ships no ``*.py`` files and a loader with
``trust_remote_code=True`` would fetch and run the base repo's code.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any

from dareflow.io import localdisk, storage

__all__ = [
    "MAX_MODEL_FILE_BYTES",
    "REMOTE_CODE_KEYS",
    "drop_remote_code",
    "json_without_remote_code",
    "local_file_problem",
    "open_local_file",
    "read_model_file",
    "remote_code_note",
    "unsafe_file_error",
]

#: Largest config, tokenizer or sentence-transformers file read or copied (weights are
#: not bounded: they are read tensor by tensor).
MAX_MODEL_FILE_BYTES = 64 << 20
#: Config keys that make transformers import code shipped with a model repo.
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _allowed_roots(root: Path) -> tuple[Path, ...]:
    """Where files of the folder ``root`` may really live (links resolved)."""
    real = root.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        # a Hugging Face cache snapshot: every file links into the repo's blobs/
        return real, real.parent.parent / "blobs"
    return (real,)


def _outside(real: Path, roots: tuple[Path, ...]) -> bool:
    return not any(real == r or real.is_relative_to(r) for r in roots)


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def local_file_problem(root: str | Path, name: str) -> str | None:
    """Why ``name`` (relative, ``/``-separated) of the local folder ``root`` must not be
    read, or None: a link out of the folder, or not a regular file. Nothing is opened."""
    path = Path(root) / name
    real = path.resolve()
    if _outside(real, _allowed_roots(Path(root))):
        return f"is a symbolic link to {real}, outside the model folder"
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return "is a dangling symbolic link" if path.is_symlink() else "does not exist"
    kind = _kind(mode)
    return None if kind is None else f"is {kind}, not a regular file"


def unsafe_file_error(root: str | Path, name: str, problem: str) -> ValueError:
    """The error for a file of a model folder that must not be read (``problem``: what
    :func:`local_file_problem` says)."""
    return ValueError(
        f"model folder '{root}': {name} {problem}. dareflow reads and copies only regular "
        "files inside a model folder (a link out of it could publish any file of this "
        "machine with the merged model); replace it with a copy of the file it should be, "
        "or remove it")


def open_local_file(root: str | Path, name: str) -> IO[bytes]:
    """Open ``name`` of the local folder ``root`` for reading, safely (module docstring).

    Raises:
        ValueError: a link out of the folder, or not a regular file (the message names
            the file and the fix).
        FileNotFoundError: no such file.
    """
    path = Path(root) / name
    try:
        # O_NONBLOCK: a FIFO opens at once instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket, a device without driver
            raise unsafe_file_error(root, name, "is not a regular file") from None
        raise
    try:
        problem = _kind(os.fstat(fd).st_mode)
        if problem is not None:
            raise unsafe_file_error(root, name, f"is {problem}, not a regular file")
        # what was opened, not what the path names now: no swap between check and read
        try:
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # no /proc (not Linux): the path as resolved now
            real = path.resolve()
        if _outside(real, _allowed_roots(Path(root))):
            raise unsafe_file_error(root, name, f"is a symbolic link to {real}, outside the model folder")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_model_file(folder_uri: str, name: str, *, limit: int = MAX_MODEL_FILE_BYTES,
                    **storage_options: Any) -> bytes:
    """The bytes of the config/tokenizer file ``name`` of a model folder (local or object
    store), at most ``limit`` of them; local files are opened with :func:`open_local_file`.

    Raises:
        ValueError: larger than ``limit``, or (local) a link out of the folder or not a
            regular file; the message names the file.
        FileNotFoundError: no such file.
    """
    uri = storage.join(folder_uri, name)
    fs, root = storage.get_fs(folder_uri, **storage_options)
    if localdisk.is_local(fs):
        with open_local_file(root, name) as f:
            data = f.read(limit + 1)
    else:
        if int(storage.info(uri, **storage_options).get("size") or 0) > limit:
            raise _too_large(uri, limit)
        data = storage.read_bytes(uri, **storage_options)
    if len(data) > limit:
        raise _too_large(uri, limit)
    return data


def _too_large(uri: str, limit: int) -> ValueError:
    return ValueError(
        f"'{uri}' has more than {limit} bytes, the most dareflow reads from a config, "
        "tokenizer or sentence-transformers file; is it the right file? Remove it from the "
        "model folder if the model does not need it")


def drop_remote_code(config: MutableMapping[str, Any]) -> list[str]:
    """Remove :data:`REMOTE_CODE_KEYS` from a config mapping (in place).

    Returns:
        The keys removed, in :data:`REMOTE_CODE_KEYS` order.
    """
    dropped = [key for key in REMOTE_CODE_KEYS if key in config]
    for key in dropped:
        del config[key]
    return dropped


def json_without_remote_code(data: bytes) -> tuple[bytes, list[str]]:
    """A JSON config's bytes without :data:`REMOTE_CODE_KEYS`, and the keys dropped.

    The bytes are unchanged when it has none of them, or is not a JSON object (its
    loader reports that); else re-serialised in its key order.
    """
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data, []
    dropped = drop_remote_code(config) if isinstance(config, dict) else []
    if not dropped:
        return data, []
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(), dropped


def remote_code_note(name: str, keys: list[str]) -> str:
    """The model card's note on the remote-code ``keys`` dropped from the file ``name``."""
    return (f"`{'`, `'.join(keys)}` dropped from `{name}`: these keys make transformers "
            "import Python code shipped with the base model (`trust_remote_code=True`), and "
            "a merge ships no code, so they would point at code that is not here. If the "
            "architecture needs that code, review it, copy its `*.py` files into this "
            "folder and restore the keys from the base model.")
