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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dareflow.io.checkpoints import Checkpoint
from dareflow.io.homology import check_buffers, vocab_tensor_names, with_tensors_from
from dareflow.merge.layers import classify, plan_units
from dareflow.merge.vocab_policy import (
    check_family_with_policy,
    plan_vocabulary,
    unit_vocab_key,
)
from dareflow.methods import METHODS, MergeSpec, ModelParams
from dareflow.methods.kernels import warm_up
from dareflow.recipe import (
    Recipe,
    fine_tunes,
    is_per_tensor,
    is_scalar,
    mask_ids,
    rate_of,
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
#: "4": options left out of a recipe take mergekit's defaults (dare_*: rescale l1, was
#: inverse; ties: weighted_sum election + 'weight' normalisation, was sum + mean;
#: dare_ties: weighted_sum + 'sum', no trim after DARE, was sum + mean + trim 0.8); a
#: magnitude trim given as a density keeps int(density·n) as mergekit (was n − ⌊p·n⌋,
#: still the count for a drop_rate); with normalize, |Σw| < 1e-8 divides by 1 (was an
#: error, or a huge result); per-tensor parameters (gradients, filters) and their
#: resolved values enter the unit keys. A recipe that sets every option explicitly
#: and gives trims as drop_rate computes the same bytes as under "3".
MERGE_CODE_VERSION = "4"

# Recipe keys that change only the vocabulary tensors (through the re-index plan's key)
# or the tokenizer files: left out of the other units' keys.
_TOKENIZER_KEYS = ("tokenizer", "tokenizer_source", "chat_template")
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
        vocab: The vocabulary policy's result (``dareflow.merge.vocab_policy.
            plan_vocabulary``): re-index plan URI and tensors, output rows, output
            tokenizer folder; None without a policy.
    """

    recipe: dict[str, Any]
    base_uri: str | None
    model_uris: dict[str, str]
    out_dtype: str
    units: list[UnitJob]
    work_uri: str
    store_uri: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    vocab: dict[str, Any] | None = None

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
    """Start loading the compiled merge kernels on a background thread (once per process).

    For every method with a base model (the DARE gate and every such merge's final pass
    use them; ``linear`` uses none); the load then overlaps Prefect's flow-run start-up
    instead of delaying the gate or the first units (0.55 s of a tiny ties merge's
    first two units, which waited for it).
    """
    global _warming
    if not METHODS[recipe.merge_method].needs_base:
        return
    with _WARM_UP_LOCK:
        if _warming is None:
            _warming = threading.Thread(target=warm_up, name="dareflow-kernels", daemon=True)
            _warming.start()


def layer_count(names: Iterable[str]) -> int:
    """Number of layers of a checkpoint: its largest layer index + 1 (0 without layers)."""
    indices = [index for kind, index in map(classify, names) if kind == "layer"]
    return max(indices) + 1 if indices else 0


def layer_position(name: str, num_layers: int) -> float:
    """A tensor's ``t`` for gradients, as mergekit: ``index / (num_layers − 1)`` for a
    layer tensor (1 when there is a single layer), 0 for every other tensor
    (embeddings, final norm, output head)."""
    kind, index = classify(name)
    if kind != "layer" or index is None:
        return 0.0
    return 1.0 if num_layers <= 1 else index / (num_layers - 1)


def _global_options(recipe: Recipe) -> dict[str, Any]:
    """The method-wide MergeSpec options of a recipe (None: the method's default)."""
    params = recipe.parameters
    disjoint, normalize = params.disjoint_merge, params.normalize
    if METHODS[recipe.merge_method].consensus == "ties":
        if disjoint is None and normalize is not None:
            # mergekit's `normalize` on TIES is our disjoint_merge weight | sum
            disjoint = "weight" if normalize else "sum"
        normalize = None
    return {"scale": params.scale, "rescale": params.rescale, "normalize": normalize,
            "sign_election": params.sign_election, "disjoint_merge": disjoint,
            "trim_after_dare": params.trim_after_dare or 0.0, "seed": recipe.seed}


def tensor_spec(recipe: Recipe, out_dtype: str, name: str, num_layers: int) -> MergeSpec:
    """The merge spec of one tensor: per-model weight, drop rate and density resolved
    for ``name`` (filters) at its layer position (gradients, :func:`layer_position`).

    Args:
        recipe: The validated recipe.
        out_dtype: Output dtype name.
        name: The tensor's checkpoint name.
        num_layers: The checkpoint's layer count (:func:`layer_count`).

    Raises:
        ValueError: the resolved spec is invalid for this tensor (the message names it),
            e.g. linear weights that sum to 0 at this layer.
    """
    t = layer_position(name, num_layers)
    ids = mask_ids(recipe)
    models = []
    for m in fine_tunes(recipe):
        drop_rate, density = rate_of(recipe, m, name, t)
        models.append(ModelParams(model_id=ids[m.model], weight=weight_of(recipe, m, name, t),
                                  drop_rate=drop_rate, density=density))
    try:
        return MergeSpec(method=recipe.merge_method, models=tuple(models),
                         out_dtype=_DTYPES[out_dtype], **_global_options(recipe))
    except ValueError as e:
        # one line per tensor: tensor_specs lists them all
        problems = str(e).replace(":\n  - ", ": ").replace("\n  - ", "; ")
        raise ValueError(f"tensor {name!r} (t = {t:g}): {problems}") from None


def build_spec(recipe: Recipe, out_dtype: str) -> MergeSpec:
    """The spec of a recipe whose per-model parameters are the same for every tensor.

    Raises:
        ValueError: the recipe has gradients or filters (use :func:`tensor_spec`), or
            the spec is invalid.
    """
    if is_per_tensor(recipe):
        raise ValueError(
            "this recipe has per-layer gradients or filtered parameters, so each tensor "
            "has its own spec; use tensor_spec(recipe, out_dtype, name, num_layers)")
    return tensor_spec(recipe, out_dtype, "", 0)


def tensor_specs(recipe: Recipe, out_dtype: str, names: Iterable[str]) -> dict[str, MergeSpec]:
    """:func:`tensor_spec` of every tensor name (the layer count taken from the names).

    Raises:
        ValueError: listing every tensor whose spec is invalid.
    """
    names = sorted(set(names))
    num_layers = layer_count(names)
    specs, problems = {}, []
    for name in names:
        try:
            specs[name] = tensor_spec(recipe, out_dtype, name, num_layers)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError(f"{len(problems)} tensor(s) get an invalid merge spec:\n  - "
                         + "\n  - ".join(problems))
    return specs


def _default_dtype(base: Checkpoint) -> str:
    """The base checkpoint's most common floating dtype."""
    counts = Counter(
        _SAFETENSORS_DTYPES[t.dtype] for t in base.tensors.values() if t.dtype in _SAFETENSORS_DTYPES
    )
    return counts.most_common(1)[0][0] if counts else "float32"


def output_dtype(recipe: Recipe, reference: Checkpoint) -> str:
    """dtype name of the merged tensors: the recipe's ``dtype``, else the reference's
    (the base's) most common floating dtype."""
    return recipe.dtype or _default_dtype(reference)


def resolved_recipe(recipe: Recipe, out_dtype: str) -> dict[str, Any]:
    """The recipe with every default made explicit (what the output records).

    Still a valid recipe: parsing it gives the same merge. The method-wide options
    (λ, rescale, TIES options or normalize, trim), dtype and seed are spelled out, and
    a model's weight (and density, for sparsifying methods) where neither the model
    nor the top-level parameters set one; gradients and filters stay as written.
    ``conventions`` says per option whose convention its value follows
    (:func:`conventions`). A base model listed among ``models`` is left out.
    """
    row = METHODS[recipe.merge_method]
    opts = _global_options(recipe)
    data = recipe_to_dict(recipe)
    params = {k: v for k, v in data.get("parameters", {}).items() if k not in _WIDE_OPTIONS}
    if row.needs_base:
        params["lambda"] = opts["scale"]
    if row.sparsification != "none":
        params["rescale"] = opts["rescale"] or row.default_rescale
    if row.consensus == "ties":
        params["sign_election"] = opts["sign_election"] or row.default_sign_election
        params["disjoint_merge"] = opts["disjoint_merge"] or row.default_disjoint_merge
    else:
        params["normalize"] = (row.default_normalize if opts["normalize"] is None
                               else opts["normalize"])
    if row.id == "dare_ties":
        params["trim_after_dare"] = opts["trim_after_dare"]
    if recipe.parameters.int8_mask:
        params["int8_mask"] = True
    top = recipe.parameters
    merged = {id(m) for m in fine_tunes(recipe)}
    models = []
    for entry, dumped in zip(recipe.models, data["models"]):
        if id(entry) not in merged:
            continue
        own = dict(dumped.get("parameters") or {})
        if entry.parameters.weight is None and top.weight is None:
            own["weight"] = 1.0
        if row.sparsification != "none" and _rate_setting(entry.parameters, top) is None:
            own["density"] = 1.0
        entry_data = {**dumped, "parameters": own}
        if not entry.allow_pickle:
            entry_data.pop("allow_pickle", None)
        models.append(entry_data)
    data.update(models=models, parameters=params, dtype=out_dtype, seed=recipe.seed,
                conventions=conventions(recipe))
    return data


#: Method-wide options resolved_recipe writes itself (the rest of ``parameters`` is
#: kept as the recipe gives it).
_WIDE_OPTIONS = ("lambda", "normalize", "rescale", "sign_election", "disjoint_merge",
                 "trim_after_dare", "int8_mask")
_SET = "set in the recipe"


def _rate_setting(*levels: Any) -> tuple[str, Any] | None:
    """(key, setting) of the first level that sets a drop rate or a density."""
    for level in levels:
        for key in ("drop_rate", "density"):
            if getattr(level, key) is not None:
                return key, getattr(level, key)
    return None


def _level(own: Any, top: Any, default: str) -> str:
    """Where a per-model value comes from: the model, the top-level parameters, or a
    default (a filtered setting falls through where none of its filters match)."""
    labels = []
    for setting, where in ((own, _SET), (top, f"{_SET} (top-level parameters)")):
        if setting is not None:
            labels.append(where)
            # a number, a gradient, or entries ending in a catch-all match every tensor
            if is_scalar(setting) or any(getattr(e, "filter", None) in (None, "*")
                                         for e in setting):
                return "; elsewhere ".join(labels)
    return "; elsewhere ".join([*labels, default])


def conventions(recipe: Recipe) -> dict[str, str]:
    """Per option of the resolved recipe, whose convention its value follows: "set in
    the recipe", "mergekit default for <method>" or "dareflow default (...)" (dareflow's
    own choices where mergekit has none or refuses: seed, dtype, a missing weight).

    Model options are keyed ``models[i].weight`` and ``models[i].density`` (or
    ``drop_rate``, the key the recipe uses), ``i`` indexing the merged models.
    """
    row = METHODS[recipe.merge_method]
    given, params = recipe.parameters.model_fields_set, recipe.parameters
    mergekit = f"mergekit default for {row.id}"
    out: dict[str, str] = {}

    def option(key: str, field: str, default: str = mergekit) -> None:
        out[key] = _SET if field in given else default

    if row.needs_base:
        option("lambda", "scale", "mergekit default")
    if row.sparsification != "none":
        option("rescale", "rescale")
    if row.consensus == "ties":
        option("sign_election", "sign_election")
        option("disjoint_merge", "disjoint_merge",
               f"{_SET} (normalize: {str(params.normalize).lower()})"
               if params.normalize is not None else mergekit)
    else:
        option("normalize", "normalize")
    if row.id == "dare_ties":
        option("trim_after_dare", "trim_after_dare")
    out["seed"] = _SET if "seed" in recipe.model_fields_set else "dareflow default"
    out["dtype"] = _SET if recipe.dtype else "dareflow default: the base checkpoint's dtype"
    for i, entry in enumerate(fine_tunes(recipe)):
        out[f"models[{i}].weight"] = _level(
            entry.parameters.weight, params.weight,
            "dareflow default 1.0 (mergekit requires a weight)")
        if row.sparsification != "none":
            own, top = _rate_setting(entry.parameters), _rate_setting(params)
            key = (own or top or ("density", None))[0]
            out[f"models[{i}].{key}"] = _level(
                own and own[1], top and top[1], f"{mergekit}: density 1, nothing dropped")
    return out


def plan_merge(recipe: Recipe, *, base_uri: str | None, model_uris: dict[str, str],
               work_uri: str, store_uri: str,
               sources: list[dict[str, Any]] | None = None) -> MergePlan:
    """Open every checkpoint's header, check the family, and split it into units.

    Reads only headers (and config.json), never tensor data, except the non-floating
    buffers (a few KB), compared to the base's (``check_buffers``).

    Raises:
        ValueError: the models are not a homologous family (every problem listed), their
            buffers differ, or the spec is invalid.
    """
    checkpoints = {mid: Checkpoint.open(uri) for mid, uri in model_uris.items()}
    reference = Checkpoint.open(base_uri) if base_uri else next(iter(checkpoints.values()))
    checkpoints = apply_vocab_policy(recipe, reference if base_uri else None, checkpoints)
    compared = checkpoints if base_uri else {k: v for k, v in list(checkpoints.items())[1:]}
    check_family_with_policy(recipe, reference, compared)
    check_buffers(reference, compared, base_role="base" if base_uri else "first model")
    out_dtype = output_dtype(recipe, reference)
    # every tensor's spec now, not in the first unit task (they also key the units)
    specs = tensor_specs(recipe, out_dtype, reference.tensors)
    resolved = resolved_recipe(recipe, out_dtype)
    inputs = ({"base": Checkpoint.open(base_uri)} if base_uri else {}) | checkpoints
    vocab = plan_vocabulary(recipe, inputs, store_uri)
    units = [
        UnitJob(u.name, tuple(u.tensors), unit_key(resolved, u.tensors, inputs, specs,
                                                   vocab=unit_vocab_key(vocab, u.tensors)),
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
        vocab=vocab,
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
             inputs: dict[str, Checkpoint],
             specs: dict[str, MergeSpec] | None = None, *, vocab: str | None = None) -> str:
    """Content address of one unit's output (see ``UnitJob``).

    Only what changes the output bytes enters: the math parameters of the resolved
    recipe (not ``output``/``name``/``gate``/``conventions``), the unit's tensor names,
    each tensor's resolved per-model (weight, drop rate, density) from ``specs``
    (:func:`tensor_specs`), and each input tensor's fingerprint (file identity + byte
    range, no data read). A unit with re-indexed vocabulary tensors adds the re-index
    plan's key (``vocab``); the tokenizer keys themselves change no other unit's bytes.
    """
    math = {k: v for k, v in resolved.items()
            if k not in ("output", "name", "gate", "conventions", *_TOKENIZER_KEYS)}
    payload = {
        "code": MERGE_CODE_VERSION,
        "recipe": math,
        "tensors": list(tensors),
        # a fine-tune may lack a buffer (copied from the base): None in its list
        "inputs": {role: [ckpt.fingerprint(t) if t in ckpt else None for t in tensors]
                   for role, ckpt in sorted(inputs.items())},
        **({"vocab": vocab} if vocab else {}),
    }
    if specs is not None:
        payload["params"] = {t: [[m.weight, m.drop_rate, m.density] for m in specs[t].models]
                             for t in tensors}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
