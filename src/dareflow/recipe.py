"""Merge recipes: a typed, validated superset of mergekit's YAML.

A mergekit config for ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear`` or
``dare_ties`` loads unchanged; dareflow adds ``drop_rate`` (the paper's p, as an
alternative to ``density`` = 1 - p), ``rescale``, the TIES variant options, ``seed`` and
``output``. Unknown keys are rejected and every problem is reported in one error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from dareflow.errors import ProblemsError, unknown_choice
from dareflow.methods import METHODS
from dareflow.schema import StrictModel, read_yaml, validation_problems

DTYPES = ("float32", "bfloat16", "float16")
Rescale = Literal["inverse", "l1", "none"]
SignElection = Literal["sum", "weighted_sum", "count"]
DisjointMerge = Literal["mean", "weight", "sum"]
# What to do when a fine-tune's vocabulary (embedding/lm_head rows) differs from the
# base's: refuse (default); exclude_embeddings keeps the base's embedding and head rows
# (those tensors are not merged); pad_to_union (the DARE authors' mean-initialised rows)
# is reserved and not supported yet.
VocabMismatch = Literal["refuse", "exclude_embeddings", "pad_to_union"]




class ModelParameters(StrictModel):
    """Per-model parameters (mergekit's ``models[].parameters``)."""

    weight: float | None = None
    density: float | None = Field(default=None, ge=0.0, le=1.0)
    drop_rate: float | None = Field(default=None, ge=0.0, le=1.0)


class ModelEntry(StrictModel):
    """One fine-tuned model: a Hub repo id (``org/name`` or ``org/name@rev``), an
    ``s3://`` prefix or a local folder."""

    model: str = Field(min_length=1)
    parameters: ModelParameters = ModelParameters()
    # Opt in to converting a pickle-only checkpoint (.bin/.pt) to safetensors when it is
    # mirrored (loaded with torch.load(weights_only=True)); trusted sources only. For the
    # base model, list it under models: with allow_pickle: true.
    allow_pickle: bool = False


class MergeParameters(StrictModel):
    """Method-wide parameters (mergekit's top-level ``parameters``).

    ``weight``, ``density`` and ``drop_rate`` here are defaults for every model.
    """

    weight: float | None = None
    density: float | None = Field(default=None, ge=0.0, le=1.0)
    drop_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    # mergekit spells the task-arithmetic scaling factor λ as `lambda`.
    scale: float = Field(default=1.0, alias="lambda")
    normalize: bool | None = None
    # None: the method's default ("inverse" for DARE, the paper; "none" for magnitude).
    rescale: Rescale | None = None
    # TIES variants; None: the paper's ("sum" and "mean"). See `dareflow ls`.
    sign_election: SignElection | None = None
    disjoint_merge: DisjointMerge | None = None
    # dare_ties only: TIES magnitude trim (a drop rate) after DARE. None: the DARE
    # authors' code (MergeLM runs full TIES, trim 0.8, after DARE); 0 = mergekit/peft.
    trim_after_dare: float | None = Field(default=None, ge=0.0, le=1.0)
    # mergekit's int8_mask only saves memory there; masks here are always exact.
    int8_mask: bool = False
    # vocabulary-size differences (added tokens); None: refuse. See VocabMismatch.
    vocab_mismatch: VocabMismatch | None = None


    @field_validator("rescale", mode="before")
    @classmethod
    def _mergekit_rescale(cls, value: Any) -> Any:
        # mergekit spells it as a bool: true = its L1-norm rescale, false = DropOnly.
        if isinstance(value, bool):
            return "l1" if value else "none"
        return value


class GateConfig(StrictModel):
    """The DARE applicability gate (``dareflow.delta_stats``): before merging, estimate each
    fine-tune's delta statistics against the base and refuse (or warn) when they are too
    large for DARE. Defaults: SFT deltas are mostly within 0.002-0.005 (DARE paper §4.6),
    so a 99th percentile of |delta| above 0.03 (6x the top of that band) or a relative norm
    ||delta|| / ||base|| above 0.15 means continued pre-training or the wrong base.
    Measured on the demo family: its SFT fine-tunes have p99 0.008-0.010 and rel norm
    0.02-0.03 (pass with 3x margin); the same fine-tunes against the demo "wrong base"
    (300 steps of continued pre-training) have p99 0.069 and rel norm 0.18 (fail both).
    """

    mode: Literal["refuse", "warn", "off"] = "refuse"
    max_abs_delta_p99: float = Field(default=0.03, gt=0)
    max_relative_norm: float = Field(default=0.15, gt=0)
    # methods the gate applies to; magnitude pruning and plain task arithmetic keep the
    # largest deltas, so they do not break the same way
    methods: list[str] = Field(default_factory=lambda: ["dare_linear", "dare_ties"])
    # elements read per tensor (16 contiguous windows): the gate stays cheap on 70B models
    # (16384 x ~300 tensors of a 7B model pool ~5M elements: the overall p99 is tight)
    sample_elements: int = Field(default=16384, ge=1024)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown merge method(s) {unknown}; choices: {', '.join(METHODS)}")
        return value


class Recipe(StrictModel):
    """A merge recipe. See ``configs/`` for examples and ``dareflow ls`` for methods."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: MergeParameters = MergeParameters()
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    tokenizer_source: Literal["base"] | None = None
    seed: int = Field(default=0, ge=0, lt=2**63)
    output: str | None = None
    name: str | None = None
    # the DARE applicability gate; None: its defaults (see GateConfig)
    gate: GateConfig | None = None

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(unknown_choice("merge method", value, METHODS))
        return value


def _semantic_problems(recipe: Recipe) -> list[str]:
    """Cross-field checks that pydantic's per-field validation cannot express."""
    problems: list[str] = []
    row = METHODS[recipe.merge_method]
    params = recipe.parameters
    sparsifies = row.sparsification != "none"
    if row.needs_base and not recipe.base_model:
        problems.append(
            f"merge_method '{row.id}' needs base_model (deltas are taken against it); "
            "add base_model: <the common base of the fine-tunes>"
        )
    for where, p in [("parameters", params)] + [
        (f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models)
    ]:
        if p.density is not None and p.drop_rate is not None:
            problems.append(
                f"{where}: give either drop_rate (p, the fraction of delta parameters "
                f"dropped) or density (= 1 - p), not both (got drop_rate={p.drop_rate}, "
                f"density={p.density})"
            )
        if not sparsifies and (p.density is not None or p.drop_rate is not None):
            key = "density" if p.density is not None else "drop_rate"
            problems.append(
                f"{where}.{key}: merge_method '{row.id}' does not sparsify deltas, so "
                f"{key} would be ignored; remove it, or use "
                f"{'dare_linear' if row.consensus == 'none' else 'dare_ties'} for DARE"
            )
        if p.weight is not None and p.weight < 0:
            problems.append(f"{where}.weight: must be >= 0, got {p.weight}")
    if row.sparsification == "dare" or row.sparsification == "magnitude":
        for i, m in enumerate(_fine_tunes(recipe)):
            if _rate(m.parameters, params) is None:
                problems.append(
                    f"model '{m.model}': merge_method '{row.id}' needs a drop rate; set "
                    "drop_rate (p) or density (1 - p) in its parameters or in the "
                    "top-level parameters"
                )
    if params.rescale is not None and not sparsifies:
        problems.append(
            f"parameters.rescale: merge_method '{row.id}' does not sparsify deltas, so "
            "rescale would be ignored; remove it"
        )
    if row.consensus != "ties":
        for key in ("sign_election", "disjoint_merge"):
            if getattr(params, key) is not None:
                problems.append(
                    f"parameters.{key}: only TIES methods (ties, dare_ties) elect signs; "
                    f"remove it for '{row.id}'"
                )
    elif params.normalize is not None and params.disjoint_merge is not None:
        problems.append(
            "parameters: give either normalize (mergekit: true = disjoint_merge 'weight', "
            "false = 'sum') or disjoint_merge for TIES methods, not both"
        )
    if params.vocab_mismatch == "pad_to_union":
        problems.append(
            "parameters.vocab_mismatch: 'pad_to_union' (pad every model's embedding rows "
            "to the union vocabulary with the mean of its rows) is not supported yet; use "
            "'exclude_embeddings' (keep the base's embedding and lm_head rows) or resize "
            "the embeddings of every model to one vocabulary first"
        )
    elif params.vocab_mismatch == "exclude_embeddings" and not row.needs_base:
        problems.append(
            f"parameters.vocab_mismatch: 'exclude_embeddings' keeps the base model's "
            f"embeddings, but merge_method '{row.id}' has no base; use a method with "
            "base_model (task_arithmetic, dare_linear, ties, dare_ties)"
        )
    if params.trim_after_dare is not None and row.id != "dare_ties":
        problems.append(
            f"parameters.trim_after_dare: only applies to dare_ties, not '{row.id}'"
        )
    if not _fine_tunes(recipe):
        problems.append(
            "models: no fine-tuned model besides base_model; list at least one model to merge"
        )
    seen: set[str] = set()
    for m in _fine_tunes(recipe):
        if m.model in seen:
            problems.append(
                f"models: '{m.model}' is listed twice; list each model once and give it "
                "the combined weight"
            )
        seen.add(m.model)
    weights = [_weight(m.parameters, params) for m in _fine_tunes(recipe)]
    if weights and all(w == 0 for w in weights):
        problems.append("models: every weight is 0, so the merge would ignore all models")
    return problems


def _fine_tunes(recipe: Recipe) -> list[ModelEntry]:
    """Models to merge. As in mergekit, an entry naming the base model is the base
    itself, not a fine-tune, for methods that take deltas."""
    if not METHODS[recipe.merge_method].needs_base:
        return list(recipe.models)
    return [m for m in recipe.models if m.model != recipe.base_model]


def _rate(own: ModelParameters, default: MergeParameters) -> float | None:
    for p in (own, default):
        if p.drop_rate is not None:
            return p.drop_rate
        if p.density is not None:
            # round away float noise: density 0.7 is p = 0.3, not 0.30000000000000004
            return round(1.0 - p.density, 12)
    return None


def _weight(own: ModelParameters, default: MergeParameters) -> float:
    for w in (own.weight, default.weight):
        if w is not None:
            return w
    return 1.0


def fine_tunes(recipe: Recipe) -> list[ModelEntry]:
    """The models whose deltas are merged (see ``_fine_tunes``)."""
    return _fine_tunes(recipe)


def mask_id(model: str) -> str:
    """The model id that seeds a model's DARE masks: its name without the location.

    A Hub id keeps ``org/name`` (no revision); a local folder or an ``s3://`` prefix
    keeps its last path component. So the same recipe gives the same bytes whether a
    model is read from the Hub, a mirror, or a folder on another machine.
    """
    text = model.rstrip("/")
    text = text.removeprefix("hf://")
    local_or_s3 = "://" in text or text.startswith(("/", ".", "~")) or text.count("/") != 1
    if local_or_s3:
        return text.rsplit("/", 1)[-1]
    return text.split("@", 1)[0]


def mask_ids(recipe: Recipe) -> dict[str, str]:
    """``mask_id`` of every fine-tuned model; full strings if two short ids collide."""
    models = [m.model for m in fine_tunes(recipe)]
    short = {m: mask_id(m) for m in models}
    if len(set(short.values())) < len(short):
        return {m: m for m in models}
    return short


def drop_rate_of(recipe: Recipe, entry: ModelEntry) -> float:
    """Effective sparsification rate p of one model (0 when the method does not sparsify,
    1 - density for TIES trimming)."""
    row = METHODS[recipe.merge_method]
    rate = _rate(entry.parameters, recipe.parameters)
    if row.sparsification == "none":
        return 0.0
    # TIES without an explicit density keeps everything, as mergekit does.
    return 0.0 if rate is None else rate


def weight_of(recipe: Recipe, entry: ModelEntry) -> float:
    """Effective weight of one model (default 1.0)."""
    return _weight(entry.parameters, recipe.parameters)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a mapping.

    Raises:
        ProblemsError: listing every problem found, each naming the key and the fix.
    """
    if not isinstance(data, dict):
        raise ProblemsError(source, [f"expected a mapping of keys, got {type(data).__name__}"])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise ProblemsError(source, validation_problems(e)) from None
    problems = _semantic_problems(recipe)
    if problems:
        raise ProblemsError(source, problems)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file.

    Raises:
        FileNotFoundError: the file does not exist.
        ProblemsError: the YAML is malformed or the recipe is invalid.
    """
    return parse_recipe(read_yaml(path, "recipe"), str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (mergekit spelling, defaults filled in)."""
    return recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
