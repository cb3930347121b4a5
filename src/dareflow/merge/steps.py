"""The merge job: recipe → plan → one shard per layer unit → assembled HF folder.

Plain functions, no Prefect: ``tasks/prefect_tasks.py`` wraps them. Everything that
crosses a task boundary is small JSON-able data (URIs, names, numbers), never tensors,
so a unit can run on any worker that sees the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import platform
import shutil
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dareflow.errors import fault_point
from dareflow.io import leases, storage
from dareflow.io.checkpoints import Checkpoint, check_family, vocab_tensor_names, with_tensors_from
from dareflow.merge import assemble
from dareflow.merge.layers import plan_units
from dareflow.methods import MERGELM_TIES_TRIM, METHODS, MergeSpec, ModelParams, merge_tensor
from dareflow.recipe import (
    Recipe,
    drop_rate_of,
    fine_tunes,
    mask_ids,
    recipe_to_dict,
    weight_of,
)

#: Bump when a change to the merge math or shard layout changes output bytes; it is
#: part of every cache key and recorded in the model card.
#: "2": the l1 rescale's float64 sums run in fixed 32768-element blocks (before: one
#: torch reduction whose order followed the thread count); other outputs unchanged.
#: "3": DARE masks from Philox-4x32-10 by element index (before: numpy's Philox-4x64
#: streams in 4 Mi-element chunks); each L1 block summed in eight lanes. Every DARE
#: output changes; methods without DARE or the l1 rescale are unchanged.
MERGE_CODE_VERSION = "3"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}


@dataclass(frozen=True)
class UnitJob:
    """What one layer-unit task needs: small, JSON-able.

    ``key`` content-addresses the unit's output: the sha256 of its input tensors'
    fingerprints, the merge spec, the seed, the output dtype and MERGE_CODE_VERSION,
    never the output location.
    """

    unit: str
    tensors: tuple[str, ...]
    key: str = ""
    elements: int = 0  # output elements (for scheduling: largest units first)


@dataclass
class MergePlan:
    """The planned merge, passed to every unit task (URIs and names only).

    Attributes:
        recipe: The validated recipe as plain data.
        base_uri: Where the base checkpoint is read from (None for ``linear``).
        model_uris: model id → checkpoint URI, in merge order.
        out_dtype: dtype name of the merged tensors.
        units: The work units, in checkpoint order.
        work_uri: Folder where the model is assembled before publishing.
        store_uri: Artifact store root; unit shards live under ``{store}/units/``.
    """

    recipe: dict[str, Any]
    base_uri: str | None
    model_uris: dict[str, str]
    out_dtype: str
    units: list[UnitJob]
    work_uri: str
    store_uri: str
    sources: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergePlan:
        data = dict(data)
        data["units"] = [UnitJob(u["unit"], tuple(u["tensors"]), u["key"], u.get("elements", 0))
                         for u in data["units"]]
        return cls(**data)


_WARM_UP_LOCK = threading.Lock()
_warming: threading.Thread | None = None


def warm_up_kernels(recipe: Recipe) -> None:
    """Start loading the compiled DARE kernels on a background thread (once per process).

    Only for DARE methods (the gate and the merge use them); the load then overlaps
    Prefect's flow-run start-up instead of delaying the gate.
    """
    global _warming
    if METHODS[recipe.merge_method].sparsification != "dare":
        return
    with _WARM_UP_LOCK:
        if _warming is None:
            from dareflow.methods.kernels import warm_up

            _warming = threading.Thread(target=warm_up, name="dareflow-kernels", daemon=True)
            _warming.start()


def build_spec(recipe: Recipe, out_dtype: str) -> MergeSpec:
    """The pure-math spec of a recipe (per-model p and weight resolved)."""
    params = recipe.parameters
    disjoint = params.disjoint_merge
    normalize = params.normalize
    ids = mask_ids(recipe)
    if METHODS[recipe.merge_method].consensus == "ties":
        if disjoint is None and normalize is not None:
            # mergekit's `normalize` on TIES is our disjoint_merge weight | sum
            disjoint = "weight" if normalize else "sum"
        normalize = None
    return MergeSpec(
        method=recipe.merge_method,
        models=tuple(
            ModelParams(
                model_id=ids[m.model],
                weight=weight_of(recipe, m),
                drop_rate=drop_rate_of(recipe, m),
            )
            for m in fine_tunes(recipe)
        ),
        scale=params.scale,
        rescale=params.rescale,
        normalize=normalize,
        sign_election=params.sign_election or "sum",
        disjoint_merge=disjoint or "mean",
        trim_after_dare=_trim_after_dare(recipe),
        seed=recipe.seed,
        out_dtype=_DTYPES[out_dtype],
    )


def _trim_after_dare(recipe: Recipe) -> float:
    """dare_ties defaults to the DARE authors' trim; 0 elsewhere."""
    if recipe.parameters.trim_after_dare is not None:
        return recipe.parameters.trim_after_dare
    return MERGELM_TIES_TRIM if recipe.merge_method == "dare_ties" else 0.0


def _default_dtype(base: Checkpoint) -> str:
    """The base checkpoint's most common floating dtype."""
    counts = Counter(
        _SAFETENSORS_DTYPES[t.dtype] for t in base.tensors.values() if t.dtype in _SAFETENSORS_DTYPES
    )
    return counts.most_common(1)[0][0] if counts else "float32"


def resolved_recipe(recipe: Recipe, out_dtype: str) -> dict[str, Any]:
    """The recipe with every default made explicit (what the output records).

    Still a valid recipe: parsing it gives the same merge. Per-model ``density`` becomes
    ``drop_rate``; rescale, TIES options, trim, dtype and seed are spelled out.
    """
    spec = build_spec(recipe, out_dtype)
    row = spec.row
    data = recipe_to_dict(recipe)
    params: dict[str, Any] = {"lambda": spec.scale} if row.needs_base else {}
    if row.sparsification != "none":
        params["rescale"] = spec.resolved_rescale
    if row.consensus == "ties":
        params["sign_election"] = spec.sign_election
        params["disjoint_merge"] = spec.disjoint_merge
    elif spec.resolved_normalize is not None:
        params["normalize"] = spec.resolved_normalize
    if row.id == "dare_ties":
        params["trim_after_dare"] = spec.trim_after_dare
    if recipe.parameters.vocab_mismatch not in (None, "refuse"):
        params["vocab_mismatch"] = recipe.parameters.vocab_mismatch
    models = []
    for entry, m in zip(fine_tunes(recipe), spec.models):
        model_params: dict[str, Any] = {"weight": m.weight}
        if row.sparsification != "none":
            model_params["drop_rate"] = m.drop_rate
        models.append({"model": entry.model, "parameters": model_params,
                       **({"allow_pickle": True} if entry.allow_pickle else {})})
    data.update(models=models, parameters=params, dtype=out_dtype, seed=spec.seed)
    return data


def plan_merge(recipe: Recipe, *, base_uri: str | None, model_uris: dict[str, str],
               work_uri: str, store_uri: str,
               sources: list[dict[str, Any]] | None = None) -> MergePlan:
    """Open every checkpoint's header, check the family, and split it into units.

    Reads only headers (and config.json), never tensor data.

    Raises:
        ValueError: the models are not a homologous family (every problem listed), or
            the spec is invalid.
    """
    checkpoints = {mid: Checkpoint.open(uri) for mid, uri in model_uris.items()}
    reference = Checkpoint.open(base_uri) if base_uri else next(iter(checkpoints.values()))
    checkpoints = apply_vocab_policy(recipe, reference if base_uri else None, checkpoints)
    check_family(reference, checkpoints if base_uri else
                 {k: v for k, v in list(checkpoints.items())[1:]})
    out_dtype = recipe.dtype or _default_dtype(reference)
    build_spec(recipe, out_dtype)  # fail now, not in the first unit task
    resolved = resolved_recipe(recipe, out_dtype)
    inputs = ({"base": Checkpoint.open(base_uri)} if base_uri else {}) | checkpoints
    units = [
        UnitJob(u.name, tuple(u.tensors), unit_key(resolved, u.tensors, inputs),
                sum(reference.info(t).numel for t in u.tensors))
        for u in plan_units(reference.tensors)
    ]
    return MergePlan(
        recipe=resolved,
        base_uri=base_uri,
        model_uris=dict(model_uris),
        out_dtype=out_dtype,
        units=units,
        work_uri=work_uri,
        store_uri=store_uri,
        sources=sources or [],
    )


def apply_vocab_policy(recipe: Recipe, base: Checkpoint | None,
                       models: dict[str, Checkpoint]) -> dict[str, Checkpoint]:
    """``parameters.vocab_mismatch: exclude_embeddings``: every fine-tune's embedding
    and output-head tensors are read from the base, so they merge to the base's rows
    exactly (deltas of 0) and added tokens are no obstacle. Otherwise: unchanged (a
    vocabulary-size difference is refused by ``check_family``)."""
    if recipe.parameters.vocab_mismatch != "exclude_embeddings" or base is None:
        return models
    names = vocab_tensor_names(base)
    return {mid: with_tensors_from(m, base, names) for mid, m in models.items()}


def unit_key(resolved: dict[str, Any], tensors: tuple[str, ...] | list[str],
             inputs: dict[str, Checkpoint]) -> str:
    """Content address of one unit's output (see ``UnitJob``).

    Only what changes the output bytes enters: the math parameters of the resolved
    recipe (not ``output``/``name``), the unit's tensor names, and each input tensor's
    fingerprint (file identity + byte range, no data read).
    """
    math = {k: v for k, v in resolved.items() if k not in ("output", "name", "gate")}
    payload = {
        "code": MERGE_CODE_VERSION,
        "recipe": math,
        "tensors": list(tensors),
        "inputs": {role: [ckpt.fingerprint(t) for t in tensors]
                   for role, ckpt in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def unit_uris(store_uri: str, key: str) -> tuple[str, str]:
    """(shard URI, sidecar URI) of a unit output in the store."""
    base = storage.join(store_uri, "units", key[:2], key)
    return base + ".safetensors", base + ".json"


def committed_unit(plan: MergePlan, job: UnitJob) -> dict[str, Any] | None:
    """The recorded result of a committed unit, or None if it must be (re)computed.

    A unit is committed when its sidecar exists (written after the shard) and the shard
    exists with the recorded size; a deleted or truncated shard is recomputed.
    """
    shard, sidecar = unit_uris(plan.store_uri, job.key)
    try:
        record = json.loads(storage.read_bytes(sidecar))
        if storage.size(shard) != record["nbytes"]:
            return None
    except (FileNotFoundError, ValueError, KeyError):
        return None
    return record


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
    Peak memory: the unit's merged tensors (output dtype) and their serialised shard;
    inputs in a local store are memory-mapped (page cache, not process memory) and the
    math runs in cache-sized blocks (``dareflow.methods.blockwise``). Inputs elsewhere
    are read one tensor at a time.

    Returns:
        ``{"unit", "key", "file", "uri", "sha256", "nbytes", "tensors", "cached"}``.
    """
    record = committed_unit(plan, job)
    if record is not None:
        return {**record, "cached": True}
    lease, record = claim_unit(plan, job)
    if record is not None:  # another run computed it while we waited for its lease
        return {**record, "cached": True}
    from dareflow.recipe import parse_recipe

    recipe = parse_recipe(plan.recipe, "<plan>")
    spec = build_spec(recipe, plan.out_dtype)
    base = Checkpoint.open(plan.base_uri) if plan.base_uri else None
    models = list(apply_vocab_policy(recipe, base, {
        m.model: Checkpoint.open(plan.model_uris[m.model]) for m in fine_tunes(recipe)
    }).values())
    reference = base if base is not None else models[0]
    views, buffer, size = _shard_buffer(
        {name: reference.info(name).shape for name in job.tensors}, spec.out_dtype)
    with _one_torch_thread():
        for name in job.tensors:
            base_t = _input_tensor(base, name) if base is not None else None
            finetuned = [_input_tensor(ckpt, name) for ckpt in models]
            merge_tensor(name, base_t, finetuned, spec, out=views[name])
            del base_t, finetuned
    shard, sidecar = unit_uris(plan.store_uri, job.key)
    sha256, nbytes = _write_shard_bytes(shard, buffer, size)
    del views, buffer
    fault_point("shard-written")
    record = {"unit": job.unit, "key": job.key, "file": shard_name(job.unit), "uri": shard,
              "sha256": sha256, "nbytes": nbytes, "tensors": list(job.tensors)}
    storage.write_bytes_atomic(sidecar, json.dumps(record, sort_keys=True).encode())
    fault_point("unit-committed")
    release_unit(plan, job, lease)
    return {**record, "cached": False}


_SHARD_BUFFERS = threading.local()
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


def _shard_buffer(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
                  ) -> tuple[dict[str, torch.Tensor], memoryview, int]:
    """The unit's whole shard file laid out in memory before the math runs.

    Returns a view per tensor into the buffer, the buffer and the file's size. The
    buffer holds exactly the bytes ``assemble.write_shard`` writes for these tensors
    and ``{"format": "pt"}`` (one dtype, so safetensors orders them by name): the
    header first, then the data the math writes straight into through the views, so
    the unit is never copied to be serialised. The buffer is page-aligned for direct
    IO (``storage.write_buffer_atomic``) and reused by the next unit of the same
    worker thread: faulting in fresh memory for every output costs more than the math
    on the benchmark VM.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    entries, offsets, offset = {}, {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name]) * itemsize
        entries[name] = {"dtype": code, "shape": list(shapes[name]),
                         "data_offsets": [offset, offset + size]}
        offsets[name] = offset
        offset += size
    header = {"__metadata__": {"format": "pt"}, **entries}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    total = len(head) + offset
    capacity = -(-total // storage.DIRECT_ALIGN) * storage.DIRECT_ALIGN
    buffer = getattr(_SHARD_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < capacity:
        _SHARD_BUFFERS.buffer = buffer = None  # free the old one first
        _SHARD_BUFFERS.buffer = buffer = storage.aligned_buffer(capacity)
    buffer[: len(head)] = head
    data = torch.frombuffer(buffer, dtype=torch.uint8, count=offset, offset=len(head)) \
        if offset else torch.empty(0, dtype=torch.uint8)
    views = {name: data[offsets[name]:offsets[name] + math.prod(shapes[name]) * itemsize]
             .view(dtype).reshape(shapes[name]) for name in shapes}
    return views, buffer, total


def _write_shard_bytes(uri: str, buffer: memoryview, size: int) -> tuple[str, int]:
    """Write ``buffer[:size]`` atomically; (sha256, size) as ``assemble.write_shard``."""
    sha256 = hashlib.sha256(buffer[:size]).hexdigest()
    storage.write_buffer_atomic(uri, buffer, size,
                                midway=lambda: fault_point("shard-half-written"))
    return sha256, size


def _input_tensor(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """One input tensor: a read-only view of the mapped file when it is local, else read.

    Mapping keeps the inputs in the page cache instead of copying ~3 x 23 MB per MLP
    weight into fresh process memory; the merge only reads them.
    """
    info = ckpt.info(name)
    fs, path = storage.get_fs(info.file, **ckpt.storage_options)
    if not storage._is_local(fs) or info.nbytes == 0 or os.path.getsize(path) < info.end:
        return ckpt.read(name)  # (a truncated file: read() names the problem)
    begin = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        # ACCESS_COPY: a private mapping torch accepts as writable; nothing writes to it
        mapped = mmap.mmap(f.fileno(), info.end - begin, access=mmap.ACCESS_COPY, offset=begin)
    data = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes,
                            offset=info.start - begin)
    return data.view(info.torch_dtype).reshape(info.shape)


def versions() -> dict[str, str]:
    """Versions recorded in the model card (what produced the bytes)."""
    import safetensors

    import dareflow

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
    assemble.copy_model_files(reference, out_uri, plan.out_dtype)
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
    assemble.write_model_card(out_uri, recipe=plan.recipe, sources=plan.sources,
                              shards=shards, versions=manifest["versions"])
    assemble.write_manifest(out_uri, manifest)
    return manifest


def _link_or_copy(src: str, dst: str) -> None:
    """Place a committed unit shard in the output folder: a hard link on one local
    filesystem (no bytes copied; shards are never modified in place), else a copy."""
    src_fs, src_path = storage.get_fs(src)
    dst_fs, dst_path = storage.get_fs(dst)
    if storage._is_local(src_fs) and storage._is_local(dst_fs):
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
    return storage._is_local(storage.get_fs(uri)[0])


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
    if storage._is_local(fs):
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
