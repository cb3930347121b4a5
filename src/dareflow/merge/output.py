"""The merged model's folder: checked before any work, assembled in its staging folder.

:func:`check_output` refuses, before any heavy work, an output that would replace a
model without ``--overwrite``, or whose deletion could take inputs or the store with it.
:func:`assemble_model` copies the committed unit shards (``dareflow.merge.units``) into
the staging folder, except those their units already wrote there (never a hard link: an
output edited in place must not change the store) and writes the index, config, tokenizer, model card and manifest
(``dareflow.merge.assemble``). ``dareflow.merge.publish`` reserves the staging folder and
publishes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterable
from typing import Any

import safetensors
import torch

import dareflow
from dareflow.errors import fault_point
from dareflow.io import localdisk, storage
from dareflow.merge import assemble, publish
from dareflow.merge.plan import MERGE_CODE_VERSION, MergePlan
from dareflow.merge.publish import os_error
from dareflow.recipe import Recipe
from dareflow.sources import parse_source, source_specs


def versions() -> dict[str, str]:
    """Versions recorded in the model card (what produced the bytes)."""
    return {
        "dareflow": dareflow.__version__,
        "merge_code_version": MERGE_CODE_VERSION,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def assemble_model(plan: MergePlan, results: list[dict[str, Any]], out_uri: str) -> dict[str, Any]:
    """Write index, config, tokenizer and model card next to the unit shards.

    Returns:
        The manifest (also written as ``manifest.json``).
    """
    # manifest.json marks a complete model: an object store replaces the previous one in
    # place, so its manifest goes before the first shard does (a fresh local staging
    # folder has none)
    if not localdisk.is_local(storage.get_fs(out_uri)[0]):
        storage.remove(storage.join(out_uri, "manifest.json"), missing_ok=True)
    for r in results:
        if not is_staged(plan.work_uri, r["file"], r["nbytes"]):
            copy_shard(r["uri"], storage.join(plan.work_uri, r["file"]), r["nbytes"])
    fault_point("shards-copied")
    weight_map = {t: r["file"] for r in results for t in r["tensors"]}
    total = sum(r["nbytes"] for r in results)
    assemble.write_index(out_uri, weight_map, total)
    reference = plan.base_uri or next(iter(plan.model_uris.values()))
    vocab = plan.vocab or {}  # a vocabulary policy's output tokenizer and rows
    notes: list[str] = []  # what was dropped from the base's configs (remote code)
    assemble.copy_model_files(reference, out_uri, plan.out_dtype,
                              tokenizer_uri=vocab.get("tokenizer_uri"),
                              vocab_size=vocab.get("rows"), notes=notes)
    shards = {r["file"]: r["sha256"] for r in results}
    manifest = {
        "recipe": plan.recipe,
        "sources": plan.sources,
        "out_dtype": plan.out_dtype,
        "shards": {r["file"]: {"sha256": r["sha256"], "bytes": r["nbytes"]} for r in results},
        "versions": versions(),
        "recipe_sha256": hashlib.sha256(
            json.dumps(plan.recipe, sort_keys=True).encode()
        ).hexdigest(),
    }
    if plan.vocab:  # what the vocabulary policy did: rows, appended tokens, notes
        manifest["vocab"] = {k: plan.vocab[k] for k in ("policy", "rows", "appended", "notes")}
    assemble.write_model_card(out_uri, recipe=plan.recipe, sources=plan.sources,
                              shards=shards, versions=manifest["versions"], notes=notes)
    assemble.write_manifest(out_uri, manifest)
    return manifest


def is_staged(work_uri: str, file: str, nbytes: int) -> bool:
    """Whether ``file`` is already in ``work_uri`` with its recorded size: only in a run's
    own staging folder (``publish.private_staging``), where the unit that merged it
    wrote it from memory (``dareflow.merge.units.merge_unit``); anything else is copied.
    """
    folder = publish.private_staging(work_uri)
    if folder is None:
        return False
    try:
        return os.path.getsize(os.path.join(folder, file)) == nbytes
    except FileNotFoundError:
        return False


def copy_shard(src_uri: str, dst_uri: str, nbytes: int) -> None:
    """Copy a committed unit shard into the output folder.

    Never a hard link: a user who edits the output in place must not change the store.
    Local to local: a reflink where the filesystem has them (btrfs, XFS: no bytes
    copied, copy-on-write), else an ``O_DIRECT`` copy (no page cache on either side,
    as the unit was written: filling fresh page cache costs more than the disk here),
    else ``copy_file_range`` (tmpfs, filesystems without direct IO); then fsync.
    Elsewhere: ``storage.copy_file`` (a server-side copy within one object store). The
    shard's bytes were checked against its commit record when the unit was reused
    (``dareflow.merge.units.committed_unit``) or written.

    Raises:
        OSError: the copy does not have the recorded size (the shard changed meanwhile).
    """
    src_fs, src = storage.get_fs(src_uri)
    dst_fs, dst = storage.get_fs(dst_uri)
    if not (localdisk.is_local(src_fs) and localdisk.is_local(dst_fs)):
        storage.copy_file(src_uri, dst_uri)
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    # the staging folder is this run's own and published whole: no temporary name needed
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        if not (_reflink(fin.fileno(), fout.fileno()) or localdisk.copy_direct(src, dst)):
            _copy_range(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())
        copied = os.fstat(fout.fileno()).st_size
    if copied != nbytes:
        raise os_error(OSError, errno.EIO, (
            f"unit shard {src_uri!r} has {copied} bytes, its commit record says {nbytes}: "
            "it changed while being copied; run again"))


_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def _reflink(src_fd: int, dst_fd: int) -> bool:
    """Clone ``src_fd``'s extents into ``dst_fd`` (copy-on-write); False where the
    filesystem cannot."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
    except OSError:
        return False
    return True


def _copy_range(fin: Any, fout: Any) -> None:
    """Copy ``fin`` into ``fout`` in the kernel (``copy_file_range``), else through a
    buffer (older kernels, other platforms, filesystems that refuse it)."""
    size = os.fstat(fin.fileno()).st_size
    copy_range = getattr(os, "copy_file_range", None)
    done = 0
    with contextlib.suppress(OSError):
        while copy_range is not None and done < size:
            n = copy_range(fin.fileno(), fout.fileno(), size - done)
            if n == 0:
                break
            done += n
    if done < size:
        fin.seek(done)
        fout.seek(done)
        shutil.copyfileobj(fin, fout, 8 << 20)


# ------------------------------------------------------------------------- checks


def input_locations(recipe: Recipe) -> list[str]:
    """The input models' locations that an output must stay away from: resolved local
    folders and ``s3://`` prefixes (Hub models are only read through the store)."""
    found = []
    for spec in source_specs(recipe):
        try:
            source = parse_source(spec["model"])
        except (ValueError, OSError):
            continue  # the pre-flight reports it
        if source.kind != "hub":
            found.append(source.id)
    return found


MODELS_FOLDER = "models"  # {store}/models/<name>: published models may live in the store


def check_output(out_uri: str, *, overwrite: bool, inputs: Iterable[str] = (),
                 store_uri: str | None = None) -> None:
    """Refuse, before any heavy work, an output that must not be written.

    Raises:
        ValueError: ``out_uri`` is, contains or is inside an input model folder, or is,
            contains or is inside the artifact store (``--overwrite`` would delete them)
            other than a folder under ``{store}/models/``, the store's place for
            published models (the nightly deployments publish there).
        FileExistsError: ``out_uri`` holds files and ``overwrite`` is False, or is a file.
    """
    for where in inputs:
        relation = _overlap(out_uri, where)
        if relation:
            raise ValueError(
                f"--out '{out_uri}' {relation} the input model folder '{where}': a merge "
                "must never write into, or replace, its inputs (--overwrite would delete "
                "them); choose an --out outside every input folder"
            )
    if store_uri is not None:
        relation = _overlap(out_uri, store_uri)
        models = storage.join(store_uri, MODELS_FOLDER)
        if relation and _overlap(out_uri, models) != "is inside":
            raise ValueError(
                f"--out '{out_uri}' {relation} the artifact store '{store_uri}' (merged "
                "units, mirrored models and caches; --overwrite would delete them); choose "
                f"an --out outside the store, or a folder under '{models}/' (the store's "
                "place for published models), or another --store"
            )
    fs, path = storage.get_fs(out_uri)
    if localdisk.is_local(fs) and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(
            f"output '{out_uri}' is a file; a merged model is a folder: choose another --out"
        )
    if storage.exists(out_uri) and storage.listdir(out_uri) and not overwrite:
        raise FileExistsError(
            f"output '{out_uri}' already exists and is not empty; choose another --out, "
            "or pass --overwrite to replace it (it is replaced only once the new merge "
            "is complete)"
        )


def _overlap(out_uri: str, other_uri: str) -> str | None:
    """How ``out_uri`` relates to ``other_uri`` ("is", "is inside", "contains"), None
    when apart. Local paths are compared resolved (symlinks followed), URIs by prefix."""
    out, other = _canonical(out_uri), _canonical(other_uri)
    if out is None or other is None or out[0] != other[0]:
        return None
    a, b = out[1].rstrip("/") + "/", other[1].rstrip("/") + "/"
    if a == b:
        return "is"
    if a.startswith(b):
        return "is inside"
    if b.startswith(a):
        return "contains"
    return None


def _canonical(uri: str) -> tuple[str, str] | None:
    """(scheme, path) with local paths resolved through symlinks; None if unparsable."""
    try:
        fs, path = storage.get_fs(uri)
    except (ValueError, OSError, ImportError):
        return None
    if localdisk.is_local(fs):
        return "file", os.path.realpath(path)
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return scheme, path
