"""Merge one layer unit into a content-addressed shard in the store.

A unit's output lives at ``{store}/units/xx/KEY.safetensors``; its sidecar
``KEY.json``, written after the shard, is the commit record, and ``KEY.lock`` the lease
of a run computing it (``dareflow.io.leases``). Also here: the per-thread shard buffer
the math writes into, and the guard that keeps torch on one thread while units merge in
parallel. The plan comes from ``dareflow.merge.plan``; ``dareflow.merge.output``
assembles the committed shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from dareflow.errors import fault_point
from dareflow.io import buffers, leases, localdisk, storage
from dareflow.io.checkpoints import Checkpoint
from dareflow.io.headers import SAFETENSORS_DTYPES
from dareflow.merge import publish
from dareflow.merge.plan import (
    MergePlan,
    UnitJob,
    apply_vocab_policy,
    layer_count,
    tensor_spec,
)
from dareflow.merge.vocab import VocabPlan, reindex
from dareflow.merge.vocab_policy import load_vocab_plan, unit_vocab_key
from dareflow.methods import merge_tensor
from dareflow.recipe import fine_tunes, parse_recipe

logger = logging.getLogger(__name__)


def unit_path(key: str) -> str:
    """Where a unit's shard lies relative to the store root: ``units/xx/KEY.safetensors``.

    Records (sidecars, Prefect cache records) keep this, never a URI: a store that is
    moved or copied stays valid, and a copy never reads the store it was copied from.
    """
    return f"units/{key[:2]}/{key}.safetensors"


def unit_uris(store_uri: str, key: str) -> tuple[str, str]:
    """(shard URI, sidecar URI) of a unit output in the store."""
    base = storage.join(store_uri, "units", key[:2], key)
    return base + ".safetensors", base + ".json"


def in_store(record: dict[str, Any], store_uri: str) -> dict[str, Any]:
    """A unit record with ``uri``: its shard in the store at ``store_uri`` (where this run
    found it), whatever store the record was written in."""
    return {**record, "uri": unit_uris(store_uri, record["key"])[0]}


def store_relative(record: dict[str, Any]) -> dict[str, Any]:
    """A unit record without its URI (what a cache outside the library keeps): readers
    locate the shard again with :func:`in_store`."""
    return {k: v for k, v in record.items() if k != "uri"} | {"path": unit_path(record["key"])}


def committed_unit(plan: MergePlan, job: UnitJob) -> dict[str, Any] | None:
    """The recorded result of a committed unit, or None if it must be (re)computed.

    A unit is committed when its sidecar exists (written after the shard) and the shard
    has the recorded size and sha256: a deleted, truncated or modified shard is
    recomputed (a modified one with a warning naming it). The bytes are hashed once per
    process and file version (:func:`_verified`). The returned ``uri`` is the shard in
    ``plan.store_uri``, not one the record may have been written with (older sidecars
    hold an absolute ``uri``: a store moved since then still works).
    """
    shard, sidecar = unit_uris(plan.store_uri, job.key)
    try:
        record = json.loads(storage.read_bytes(sidecar))
        version = _file_version(shard)
        if version[0] != record["nbytes"]:
            return None
        if not _verified(shard, version, record["sha256"], job.unit):
            return None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return {**record, "uri": shard}


#: (shard URI, file version) -> whether its bytes matched the commit record's sha256.
_VERIFIED: dict[tuple[str, tuple], bool] = {}
_VERIFIED_MAX = 1 << 16


def _file_version(uri: str) -> tuple:
    """(size, ...what changes whenever the bytes do): inode, mtime and ctime locally
    (ctime cannot be set back by a user), ETag and modification time on object stores."""
    fs, path = storage.get_fs(uri)
    if localdisk.is_local(fs):
        st = os.stat(path)
        return st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns
    info = storage.info(uri)
    return (int(info["size"]), str(info.get("ETag") or info.get("etag")),
            str(info.get("LastModified") or info.get("mtime")))


def _verified(uri: str, version: tuple, sha256: str, unit: str) -> bool:
    """Whether the shard at ``uri`` (this ``version`` of it) has ``sha256``: hashed once,
    with a warning naming the unit when it does not."""
    known = _VERIFIED.get((uri, version))
    if known is None:
        known = _sha256(uri) == sha256
        _remember(uri, version, known)
        if not known:
            logger.warning(
                "unit %s: its shard %s no longer matches its commit record (sha256 %s...): "
                "it was changed outside dareflow; merging the unit again", unit, uri,
                sha256[:12])
    return known


def _sha256(uri: str) -> str:
    """sha256 of a shard; a local one read with ``O_DIRECT`` where possible (it was
    written so: reading it through the page cache would fill fresh memory once)."""
    fs, path = storage.get_fs(uri)
    pieces = localdisk.direct_chunks(path) if localdisk.is_local(fs) else None
    if pieces is None:
        return storage.sha256_of(uri)
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def _remember(uri: str, version: tuple, matches: bool) -> None:
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED[(uri, version)] = matches


def lock_uri(store_uri: str, key: str) -> str:
    """The lease of a unit being computed: ``{store}/units/xx/KEY.lock``."""
    return storage.join(store_uri, "units", key[:2], key) + ".lock"


def claim_unit(plan: MergePlan, job: UnitJob) -> tuple[leases.Lease | None, dict | None]:
    """Before computing a unit: take its lease, or wait for the run that holds it.

    Returns:
        ``(lease, None)`` to compute (release with ``release_unit``), ``(None, record)``
        when another run committed the unit meanwhile, ``(None, None)`` when the wait
        timed out (compute anyway: same bytes, atomic writes). See ``dareflow.io.leases``.
    """
    return leases.acquire_or_wait(lock_uri(plan.store_uri, job.key),
                                  lambda: committed_unit(plan, job))


def release_unit(plan: MergePlan, job: UnitJob, lease: leases.Lease | None = None) -> None:
    """After a unit is committed, or failed: drop this thread's lease on it (if any)."""
    if lease is not None:
        lease.release()
    else:
        leases.release_held(lock_uri(plan.store_uri, job.key))


def shard_name(unit: str) -> str:
    """File name of a unit's shard in the merged folder."""
    return f"model-{unit}.safetensors"


def merge_unit(plan: MergePlan, job: UnitJob) -> dict[str, Any]:
    """Merge every tensor of one unit into a shard in the store, unless committed.

    The shard is written atomically, then its sidecar (sha256, size, tensors): the
    sidecar is the commit record, so a killed run never leaves a unit that looks done.
    A unit merged here also writes its shard into the run's own staging folder, from
    the same buffer (:func:`_staged_copy`); both files are written as the tensors are
    merged, in file order (``buffers.FillingWrite``).
    Peak memory: the unit's merged tensors (output dtype) and their serialised shard;
    inputs in a local store are memory-mapped (page cache, not process memory) and the
    math runs in cache-sized blocks (``dareflow.methods.blockwise``). Inputs elsewhere
    are read one tensor at a time.

    Returns:
        ``{"unit", "key", "file", "path", "uri", "sha256", "nbytes", "tensors", "cached"}``:
        ``path`` relative to the store (what the sidecar records), ``uri`` the shard in
        ``plan.store_uri``.
    """
    record = committed_unit(plan, job)
    if record is not None:
        return {**record, "cached": True}
    lease, record = claim_unit(plan, job)
    if record is not None:  # another run computed it while we waited for its lease
        return {**record, "cached": True}
    recipe = parse_recipe(plan.recipe, "<plan>")
    base = Checkpoint.open(plan.base_uri) if plan.base_uri else None
    models = list(apply_vocab_policy(recipe, base, {
        m.model: Checkpoint.open(plan.model_uris[m.model]) for m in fine_tunes(recipe)
    }).values())
    reference = base if base is not None else models[0]
    # each tensor its own spec: gradients and filters resolve per tensor name and layer
    num_layers = layer_count(reference.tensors)
    specs = {name: tensor_spec(recipe, plan.out_dtype, name, num_layers)
             for name in job.tensors}
    vocab, reindexed = _vocab_plan(plan, job)  # rows re-indexed to the output vocabulary
    # non-floating tensors (buffers) keep their dtype: copied, never merged
    kept = {name: reference.info(name).torch_dtype for name in job.tensors
            if not reference.info(name).is_floating_point}
    layout = _shard_buffer(
        {name: (vocab.rows, *reference.info(name).shape[1:]) if name in reindexed
         else reference.info(name).shape for name in job.tensors},
        getattr(torch, plan.out_dtype), kept)
    size = layout.size
    shard, sidecar = unit_uris(plan.store_uri, job.key)
    with buffers.FillingWrite([shard], layout.buffer, size,
                              optional=_staged_copy(plan, shard_name(job.unit)),
                              midway=lambda: fault_point("shard-half-written")) as write:
        write.filled(layout.header)
        with _one_torch_thread():
            for name, view in layout.views.items():  # in file order: written as done
                if name in kept:  # the reference's bytes; the plan checked every model
                    view.copy_(_input_tensor(reference, name))  # that stores it agrees
                else:
                    base_t = _input_tensor(base, name) if base is not None else None
                    finetuned = [_input_tensor(ckpt, name) for ckpt in models]
                    if name in reindexed:
                        base_t, finetuned = _reindex(vocab, base_t, finetuned, recipe)
                    merge_tensor(name, base_t, finetuned, specs[name], out=view)
                    del base_t, finetuned
                write.filled(layout.ends[name])
        sha256 = write.finish()
    del layout
    fault_point("shard-written")
    # store-relative: the store can be moved or copied (see unit_path)
    record = {"unit": job.unit, "key": job.key, "file": shard_name(job.unit),
              "path": unit_path(job.key), "sha256": sha256, "nbytes": size,
              "tensors": list(job.tensors)}
    storage.write_bytes_atomic(sidecar, json.dumps(record, sort_keys=True).encode())
    _remember(shard, _file_version(shard), True)  # hashed from the buffer just written
    fault_point("unit-committed")
    release_unit(plan, job, lease)
    return {**record, "uri": shard, "cached": False}


def _staged_copy(plan: MergePlan, file: str) -> list[str]:
    """Where a merged unit's shard is also written: the run's own staging folder, when
    this worker sees it (``publish.private_staging``); none otherwise.

    Assembling the model then has nothing left to copy for it
    (``dareflow.merge.output.assemble_model`` keeps a staged shard of the recorded
    size): on the benchmark machine copying a 0.84 B model took ~2.5 s after the last
    unit. An extra copy only: if it cannot be written (a full output disk) the unit
    still commits, and assembly copies the shard and reports the output's problem.
    Elsewhere (an object-store output, a worker on another machine) the model is
    assembled from the store as before.
    """
    folder = publish.private_staging(plan.work_uri)
    return [] if folder is None else [os.path.join(folder, file)]


_SHARD_BUFFERS = threading.local()
_CODES = {torch_dtype: code for code, torch_dtype in SAFETENSORS_DTYPES.items()}
# The order in which safetensors lays out dtypes (its Rust Dtype enum, descending).
_SAFETENSORS_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                      "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
_TORCH_THREADS_LOCK = threading.Lock()
_TORCH_THREADS = {"users": 0, "saved": 1}


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Torch ops on the calling thread only while units merge.

    Units already run in parallel on the flow's workers; intra-op threads on top
    oversubscribe the cores (two workers x two OpenMP threads on two cores), and the
    blockwise merge then uses larger blocks (fewer GIL round trips). The count is
    restored when the last concurrent unit leaves. Outputs do not depend on it (the
    merge is elementwise and its sums run in a fixed order).
    """
    with _TORCH_THREADS_LOCK:
        if _TORCH_THREADS["users"] == 0:
            _TORCH_THREADS["saved"] = torch.get_num_threads()
        _TORCH_THREADS["users"] += 1
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with _TORCH_THREADS_LOCK:
            _TORCH_THREADS["users"] -= 1
            if _TORCH_THREADS["users"] == 0:
                torch.set_num_threads(_TORCH_THREADS["saved"])


class ShardLayout(NamedTuple):
    """A unit's shard file laid out in memory (:func:`_shard_buffer`)."""

    views: dict[str, torch.Tensor]  # per tensor, in file order
    ends: dict[str, int]  # the offset in the file where each tensor's bytes end
    header: int  # length of the header (8-byte length + JSON)
    buffer: memoryview
    size: int  # the file's size


def _shard_buffer(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                  dtypes: dict[str, torch.dtype] | None = None) -> ShardLayout:
    """The unit's whole shard file laid out in memory before the math runs.

    Tensors are ``dtype`` except those in ``dtypes`` (buffers copied in their own
    dtype). Returns a view per tensor into the buffer (in file order), where each
    tensor's bytes end in the file, the header's length, the buffer and the file's size.
    The buffer holds exactly the bytes ``assemble.write_shard`` writes for these tensors
    and ``{"format": "pt"}`` (safetensors orders them by dtype, then name): the
    header first, then the data the math writes straight into through the views, so
    the unit is never copied to be serialised. The buffer is page-aligned for direct
    IO (``buffers.FillingWrite``) and reused by the next unit of the same
    worker thread: faulting in fresh memory for every output costs more than the math
    on the benchmark VM.
    """
    types = {name: (dtypes or {}).get(name, dtype) for name in shapes}
    entries, offsets, offset = {}, {}, 0
    for name in sorted(shapes, key=lambda n: (_SAFETENSORS_ORDER.index(_CODES[types[n]]), n)):
        size = math.prod(shapes[name]) * types[name].itemsize
        entries[name] = {"dtype": _CODES[types[name]], "shape": list(shapes[name]),
                         "data_offsets": [offset, offset + size]}
        offsets[name] = (offset, offset + size)
        offset += size
    header = {"__metadata__": {"format": "pt"}, **entries}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    total = len(head) + offset
    capacity = -(-total // localdisk.DIRECT_ALIGN) * localdisk.DIRECT_ALIGN
    buffer = getattr(_SHARD_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < capacity:
        _SHARD_BUFFERS.buffer = buffer = None  # free the old one first
        _SHARD_BUFFERS.buffer = buffer = localdisk.aligned_buffer(capacity)
    buffer[: len(head)] = head
    data = torch.frombuffer(buffer, dtype=torch.uint8, count=offset, offset=len(head)) \
        if offset else torch.empty(0, dtype=torch.uint8)
    views = {name: data[start:end].view(types[name]).reshape(shapes[name])
             for name, (start, end) in offsets.items()}
    ends = {name: len(head) + end for name, (_, end) in offsets.items()}
    return ShardLayout(views, ends, len(head), buffer, total)


def _input_tensor(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """One input tensor: a read-only view of the mapped file when it is local, else read.

    Mapping keeps the inputs in the page cache instead of copying ~3 x 23 MB per MLP
    weight into fresh process memory; the merge only reads them.
    """
    info = ckpt.info(name)
    fs, path = storage.get_fs(info.file, **ckpt.storage_options)
    if not localdisk.is_local(fs) or info.nbytes == 0 or os.path.getsize(path) < info.end:
        return ckpt.read(name)  # (a truncated file: read() names the problem)
    begin = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        # ACCESS_COPY: a private mapping torch accepts as writable; nothing writes to it
        mapped = mmap.mmap(f.fileno(), info.end - begin, access=mmap.ACCESS_COPY, offset=begin)
    data = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes,
                            offset=info.start - begin)
    return data.view(info.torch_dtype).reshape(info.shape)


def _vocab_plan(plan: MergePlan, job: UnitJob) -> tuple[VocabPlan | None, set[str]]:
    """The re-index plan and the unit's tensors it applies to (none without a policy)."""
    if unit_vocab_key(plan.vocab, job.tensors) is None:
        return None, set()
    return load_vocab_plan(plan.vocab), set(job.tensors) & set(plan.vocab["tensors"])


def _reindex(vocab: VocabPlan, base: torch.Tensor | None, finetuned: list[torch.Tensor],
             recipe: Any) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Every input's rows in the output vocabulary (float32), keyed as the plan keys them:
    ``"base"`` and the fine-tunes' model references."""
    keys = [m.model for m in fine_tunes(recipe)]
    tensors = ({"base": base} if base is not None else {}) | dict(zip(keys, finetuned))
    out = reindex(vocab, tensors)
    return out.get("base"), [out[k] for k in keys]
