"""Plan a merge: recipe → resolved recipe, merge spec and one job per layer unit.

The first step of the merge job (recipe → plan → one shard per layer unit → assembled
HF folder): ``dareflow.merge.units`` merges the units, ``dareflow.merge.output``
assembles and publishes the folder. Plain functions, no Prefect: ``dareflow.tasks.merge``
wraps them. Everything that crosses a task boundary is small JSON-able data (URIs,
names, numbers), never tensors, so a unit can run on any worker that sees the store.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dareflow.io.checkpoints import Checkpoint
from dareflow.io.homology import check_family, vocab_tensor_names, with_tensors_from
from dareflow.merge.layers import plan_units
from dareflow.methods import MERGELM_TIES_TRIM, METHODS, MergeSpec, ModelParams
from dareflow.methods.kernels import warm_up
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
