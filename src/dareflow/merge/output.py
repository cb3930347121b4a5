"""The merged model's folder: assemble it next to the unit shards, then publish it.

Staging (``<out>.partial`` locally, in place on object stores), the refusal to replace
an existing output, the shards placed by hard link or copy, the index, config,
tokenizer, model card and manifest (written by ``dareflow.merge.assemble``), and the
atomic publish. The shards come from ``dareflow.merge.units``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
from typing import Any

import safetensors
import torch

import dareflow
from dareflow.errors import fault_point
from dareflow.io import localdisk, storage
from dareflow.merge import assemble
from dareflow.merge.plan import MERGE_CODE_VERSION, MergePlan


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
    for r in results:
        _link_or_copy(r["uri"], storage.join(plan.work_uri, r["file"]))
    fault_point("shards-copied")
    weight_map = {t: r["file"] for r in results for t in r["tensors"]}
    total = sum(r["nbytes"] for r in results)
    assemble.write_index(out_uri, weight_map, total)
    reference = plan.base_uri or next(iter(plan.model_uris.values()))
    vocab = plan.vocab or {}  # a vocabulary policy's output tokenizer and rows
    assemble.copy_model_files(reference, out_uri, plan.out_dtype,
                              tokenizer_uri=vocab.get("tokenizer_uri"),
                              vocab_size=vocab.get("rows"))
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
                              shards=shards, versions=manifest["versions"])
    assemble.write_manifest(out_uri, manifest)
    return manifest


def _link_or_copy(src: str, dst: str) -> None:
    """Place a committed unit shard in the output folder: a hard link on one local
    filesystem (no bytes copied; shards are never modified in place), else a copy."""
    src_fs, src_path = storage.get_fs(src)
    dst_fs, dst_path = storage.get_fs(dst)
    if localdisk.is_local(src_fs) and localdisk.is_local(dst_fs):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        if os.path.exists(dst_path):
            os.remove(dst_path)
        try:
            os.link(src_path, dst_path)
            return
        except OSError:
            pass
    storage.copy_file(src, dst)


def _is_local_uri(uri: str) -> bool:
    return localdisk.is_local(storage.get_fs(uri)[0])


def staging_uri(out_uri: str) -> str:
    """Where the model is assembled before it is published at ``out_uri``.

    Local: a sibling ``<out>.partial`` folder, renamed onto ``out`` at the end. Object
    stores have no rename: the model is assembled in place and ``manifest.json``,
    written last, marks it complete.
    """
    return out_uri.rstrip("/") + ".partial" if _is_local_uri(out_uri) else out_uri


def check_output(out_uri: str, *, overwrite: bool) -> None:
    """Refuse, before any heavy work, to replace an existing non-empty output.

    Raises:
        FileExistsError: ``out_uri`` holds files and ``overwrite`` is False.
    """
    if storage.exists(out_uri) and storage.listdir(out_uri) and not overwrite:
        raise FileExistsError(
            f"output '{out_uri}' already exists and is not empty; choose another --out, "
            "or pass --overwrite to replace it (it is replaced only once the new merge "
            "is complete)"
        )


def clear_staging(staging: str) -> None:
    """Remove what an earlier, interrupted run left in the staging folder (local), or
    the completion marker of the model being replaced (object store)."""
    fs, path = storage.get_fs(staging)
    if localdisk.is_local(fs):
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        storage.remove(storage.join(staging, "manifest.json"), missing_ok=True)


def publish(staging: str, out_uri: str) -> None:
    """Make the finished model visible at ``out_uri``.

    Local folders: an atomic rename (a previous output is moved aside first and
    deleted only after the rename). Object stores: already in place; the manifest was
    written last.
    """
    if staging == out_uri:
        return
    _, src = storage.get_fs(staging)
    _, dst = storage.get_fs(out_uri)
    old = None
    if os.path.exists(dst):
        old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    os.replace(src, dst)
    if old:
        shutil.rmtree(old)
