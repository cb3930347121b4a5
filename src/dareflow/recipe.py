"""Merge recipes: a typed, validated superset of mergekit's YAML.

A mergekit config for ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear`` or
``dare_ties`` loads unchanged and computes what mergekit computes: every option left
out takes mergekit's default for the method (``dareflow.methods.table``). dareflow adds
``drop_rate`` (the paper's p, as an alternative to ``density`` = 1 - p), ``rescale``
(``inverse`` | ``l1`` | ``none``), the TIES variant options, ``trim_after_dare``,
``seed``, ``gate`` and ``output``. Unknown keys are rejected and every problem is
reported in one error.

Per-model numbers (``weight``, ``density``, ``drop_rate``), per model or in the
top-level ``parameters``, may be a number, a gradient (a list of numbers interpolated
over the layers) or a list of ``{filter, value}`` entries, with mergekit's rules
(``dareflow.parameters``; README, "Merging").
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from dareflow.errors import ProblemsError, quote, unknown_choice
from dareflow.methods import METHODS
from dareflow.parameters import (
    PER_MODEL_KEYS,
    Setting,
    check_setting,
    evaluate_setting,
    is_scalar,
)
from dareflow.schema import StrictModel, read_yaml, validation_problems

DTYPES = ("float32", "bfloat16", "float16")
Rescale = Literal["inverse", "l1", "none"]
SignElection = Literal["sum", "weighted_sum", "count"]
DisjointMerge = Literal["mean", "weight", "sum"]
# What to do when a fine-tune's vocabulary (embedding/lm_head rows) differs from the
# base's: refuse (default); exclude_embeddings keeps the base's embedding and head rows
# (those tensors are not merged); pad_to_union pads every model with fewer rows than the
# largest with rows equal to the mean of its own rows (the DARE authors' policy for
# WizardMath's added [PAD] token; dareflow.merge.vocab). mergekit's `tokenizer:` keys are
# the other way (a union or chosen tokenizer, rows re-indexed by token).
VocabMismatch = Literal["refuse", "exclude_embeddings", "pad_to_union"]


class ModelParameters(StrictModel):
    """Per-model parameters (mergekit's ``models[].parameters``): each a :data:`Setting`."""

    weight: Setting | None = None
    density: Setting | None = None
    drop_rate: Setting | None = None

    @field_validator(*PER_MODEL_KEYS, mode="before")
    @classmethod
    def _setting(cls, value: Any, info: Any) -> Any:
        return check_setting(value, info.field_name)


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

    ``weight``, ``density`` and ``drop_rate`` here are defaults for every model (used
    where a model's own setting is unset or no filter of it matches). Every other key
    is method-wide and one value. Unset options take mergekit's default for the method.
    """

    weight: Setting | None = None
    density: Setting | None = None
    drop_rate: Setting | None = None
    # mergekit spells the task-arithmetic scaling factor λ as `lambda`.
    scale: float = Field(default=1.0, alias="lambda")
    normalize: bool | None = None
    # None: mergekit's default ("l1" for DARE methods, "none" for magnitude);
    # "inverse" is the DARE paper's 1/(1 - p).
    rescale: Rescale | None = None
    # TIES variants; None: mergekit's ("weighted_sum"; "weight" for ties, "sum" for
    # dare_ties, or as `normalize` says). The TIES paper's: "sum" and "mean".
    sign_election: SignElection | None = None
    disjoint_merge: DisjointMerge | None = None
    # dare_ties only: TIES magnitude trim (a drop rate) after DARE. None: 0, mergekit's
    # and peft's; the DARE authors' GLUE script trims 0.8 (MERGELM_TIES_TRIM).
    trim_after_dare: float | None = Field(default=None, ge=0.0, le=1.0)
    # mergekit's int8_mask only saves memory there; masks here are always exact.
    int8_mask: bool = False
    # vocabulary-size differences (added tokens); None: refuse. See VocabMismatch.
    vocab_mismatch: VocabMismatch | None = None

    @field_validator(*PER_MODEL_KEYS, mode="before")
    @classmethod
    def _setting(cls, value: Any, info: Any) -> Any:
        return check_setting(value, info.field_name)

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


#: Built-in chat templates (``chat_template: <name>``; texts in dareflow.merge.tokenizer);
#: ``auto`` takes the most common template of the models; anything else must be a
#: literal Jinja template.
CHAT_TEMPLATE_NAMES = ("auto", "chatml")


class ZeroEmbedding(StrictModel):
    """mergekit's ``{kind: zero}``: the token's row is zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(StrictModel):
    """mergekit's ``{kind: model_token}``: the row of ``token`` (or of id ``token_id``) in
    ``model``'s own vocabulary."""

    kind: Literal["model_token"]
    model: str = Field(min_length=1)
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)


class TokenEmbedding(StrictModel):
    """mergekit's ``tokenizer.tokens.<TOKEN>``: the token's row for the models that lack
    it (for every model with ``force: true``); no source: mergekit's default rule."""

    source: Annotated[ZeroEmbedding | ModelTokenEmbedding, Field(discriminator="kind")] \
        | str | None = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _known_kind(cls, value: Any) -> Any:
        # one message instead of pydantic's error per member of the union
        if isinstance(value, dict) and value.get("kind") not in ("zero", "model_token"):
            raise ValueError(
                "a token source is a model of the recipe, {kind: zero} or {kind: "
                f"model_token, model: M, token: T | token_id: N}}; got kind "
                f"{quote(value.get('kind'))}")
        return value


class TokenizerConfig(StrictModel):
    """mergekit's ``tokenizer:``: the output tokenizer (``union``, ``base`` or a model of
    the recipe), tokens to add or whose rows to set, and padding of the rows."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class Recipe(StrictModel):
    """A merge recipe. See ``configs/`` for examples and ``dareflow ls`` for methods."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: MergeParameters = MergeParameters()
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # mergekit's tokenizer keys (dareflow.merge.vocab): tokenizer_source is the legacy
    # spelling of tokenizer.source; none: the base's tokenizer files are copied
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    seed: int = Field(default=0, ge=0, lt=2**63)
    output: str | None = None
    name: str | None = None
    # the DARE applicability gate; None: its defaults (see GateConfig)
    gate: GateConfig | None = None
    # Written by dareflow into the resolved recipe (model card, manifest): per option,
    # whose convention its value follows ("set in the recipe", "mergekit default",
    # "dareflow default"). Informational: no effect on the merge.
    conventions: dict[str, str] | None = None

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
                f"dropped) or density (= 1 - p), not both (got drop_rate={quote(p.drop_rate)}, "
                f"density={quote(p.density)})"
            )
        if not sparsifies and (p.density is not None or p.drop_rate is not None):
            key = "density" if p.density is not None else "drop_rate"
            problems.append(
                f"{where}.{key}: merge_method '{row.id}' does not sparsify deltas, so "
                f"{key} would be ignored; remove it, or use "
                f"{'dare_linear' if row.consensus == 'none' else 'dare_ties'} for DARE"
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
    problems += _tokenizer_problems(recipe)
    if params.vocab_mismatch == "exclude_embeddings" and not row.needs_base:
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
                f"models: {quote(m.model)} is listed twice; list each model once and give it "
                "the combined weight"
            )
        seen.add(m.model)
    settings = [_first_set(m.parameters.weight, params.weight) for m in _fine_tunes(recipe)]
    if settings and all(is_scalar(w) and w == 0 for w in settings):
        problems.append("models: every weight is 0, so the merge would ignore all models")
    return problems


def _tokenizer_problems(recipe: Recipe) -> list[str]:
    """The tokenizer keys: one spelling at a time, sources that name models of the
    recipe, a known chat template, no second vocabulary policy."""
    problems: list[str] = []
    refs = [r for r in [recipe.base_model, *(m.model for m in recipe.models)] if r]
    config = recipe.tokenizer
    if config is not None and recipe.tokenizer_source is not None:
        problems.append(
            "tokenizer and tokenizer_source: give one of them (tokenizer_source: X is the "
            "legacy spelling of tokenizer: {source: X}), not both")
    for key, source in (("tokenizer_source", recipe.tokenizer_source),
                        ("tokenizer.source", config.source if config else None)):
        if source is not None and source not in ("base", "union", *refs):
            problems.append(f"{key}: " + unknown_choice(
                "tokenizer source", source, ["base", "union", *dict.fromkeys(refs)]))
    for tok, setting in ((config.tokens or {}) if config else {}).items():
        where, source = f"tokenizer.tokens[{quote(tok)}].source", setting.source
        model = source if isinstance(source, str) else getattr(source, "model", None)
        if model is not None and model not in refs:
            problems.append(f"{where}: " + unknown_choice(
                "model", model, dict.fromkeys(refs)) + " (a model of this recipe)")
        if isinstance(source, ModelTokenEmbedding) and (
                (source.token is None) == (source.token_id is None)):
            problems.append(f"{where}: kind model_token needs exactly one of token (a "
                            "token string) or token_id (an id in that model's vocabulary)")
    template = recipe.chat_template
    if template is not None and template not in CHAT_TEMPLATE_NAMES and "{" not in template:
        problems.append("chat_template: " + unknown_choice(
            "chat template", template, CHAT_TEMPLATE_NAMES)
            + ", or a literal Jinja template (text with '{{ ... }}' or '{% ... %}')")
    policy = recipe.parameters.vocab_mismatch
    if policy in ("pad_to_union", "exclude_embeddings") and (
            config is not None or recipe.tokenizer_source is not None):
        problems.append(
            f"parameters.vocab_mismatch: '{policy}' and the tokenizer keys are two "
            "vocabulary policies; keep one (tokenizer/tokenizer_source re-index the rows "
            "by token, as mergekit does; pad_to_union pads rows with their mean, as the "
            "DARE authors do)")
    return problems


def _fine_tunes(recipe: Recipe) -> list[ModelEntry]:
    """Models to merge. As in mergekit, an entry naming the base model is the base
    itself, not a fine-tune, for methods that take deltas."""
    if not METHODS[recipe.merge_method].needs_base:
        return list(recipe.models)
    return [m for m in recipe.models if m.model != recipe.base_model]


def _first_set(*settings: Any) -> Any:
    return next((s for s in settings if s is not None), None)


def _rate(own: ModelParameters, default: MergeParameters, tensor: str,
          t: float) -> tuple[float, float | None] | None:
    """(p, density as given or None) of the first level whose setting matches."""
    for p in (own, default):
        # interpolating values in [0, 1] may round a hair outside (1.0000000000000002)
        rate = evaluate_setting(p.drop_rate, tensor, t)
        if rate is not None:
            return min(max(rate, 0.0), 1.0), None
        density = evaluate_setting(p.density, tensor, t)
        if density is not None:
            density = min(max(density, 0.0), 1.0)
            # round away float noise: density 0.7 is p = 0.3, not 0.30000000000000004
            return round(1.0 - density, 12), density
    return None


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


def rate_of(recipe: Recipe, entry: ModelEntry, tensor: str = "",
            t: float = 0.0) -> tuple[float, float | None]:
    """Sparsification of one model for one tensor: ``(p, density)``.

    p is the drop rate (0 when the method does not sparsify); density is mergekit's
    density when the matching setting was a ``density`` (it sets magnitude pruning's
    keep count, ``methods.ModelParams``), else None. Precedence: the model's own
    setting, then the top-level one, then mergekit's default density 1 (nothing
    dropped or trimmed), for every sparsifying method.

    Args:
        recipe: The recipe.
        entry: One of ``fine_tunes(recipe)``.
        tensor: The tensor name (for filters; "" matches only unfiltered entries).
        t: The tensor's layer position (see :func:`evaluate_setting`).
    """
    if METHODS[recipe.merge_method].sparsification == "none":
        return 0.0, None
    rate = _rate(entry.parameters, recipe.parameters, tensor, t)
    return (0.0, None) if rate is None else rate


def drop_rate_of(recipe: Recipe, entry: ModelEntry, tensor: str = "", t: float = 0.0) -> float:
    """Effective sparsification rate p of one model for one tensor (see :func:`rate_of`)."""
    return rate_of(recipe, entry, tensor, t)[0]


def weight_of(recipe: Recipe, entry: ModelEntry, tensor: str = "", t: float = 0.0) -> float:
    """Effective weight of one model for one tensor: its own setting, then the
    top-level one, then 1.0.

    mergekit refuses a non-base model without a weight; dareflow's default of 1.0
    only adds recipes mergekit refuses, so it never changes one mergekit runs.
    """
    for setting in (entry.parameters.weight, recipe.parameters.weight):
        value = evaluate_setting(setting, tensor, t)
        if value is not None:
            return value
    return 1.0


def is_per_tensor(recipe: Recipe) -> bool:
    """Whether some per-model setting is a gradient or filtered (differs per tensor)."""
    levels = [recipe.parameters] + [m.parameters for m in fine_tunes(recipe)]
    return not all(is_scalar(getattr(p, key)) for p in levels for key in PER_MODEL_KEYS)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a mapping.

    Raises:
        ProblemsError: listing every problem found, each naming the key and the fix.
    """
    if not isinstance(data, dict):
        raise ProblemsError(source, [f"expected a mapping of keys, got {type(data).__name__}"])
    data, problems = _misplaced_options(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise ProblemsError(source, problems + validation_problems(e)) from None
    problems += _semantic_problems(recipe)
    if problems:
        raise ProblemsError(source, problems)
    return recipe


def _method_wide_keys() -> set[str]:
    """The method-wide parameter names (field names and mergekit aliases)."""
    keys = set()
    for name, info in MergeParameters.model_fields.items():
        if name not in PER_MODEL_KEYS:
            keys |= {name, info.alias or name}
    return keys


def _misplaced_options(data: dict) -> tuple[dict, list[str]]:
    """Method-wide options given per model or as a list, reported and left out (so
    the rest is still validated): mergekit silently ignores a per-model ``normalize``
    or ``lambda``, and reads a list there as a gradient it never evaluates."""
    problems: list[str] = []
    wide = _method_wide_keys()
    models = data.get("models")
    if isinstance(models, list):
        cleaned = []
        for i, entry in enumerate(models):
            params = entry.get("parameters") if isinstance(entry, dict) else None
            bad = sorted(k for k in params if k in wide) if isinstance(params, dict) else []
            for key in bad:
                problems.append(
                    f"models[{i}].parameters.{key}: '{key}' is a method-wide option, not a "
                    "per-model one (mergekit would silently ignore it here); move it to "
                    "the top-level parameters:")
            if bad:
                entry = {**entry, "parameters": {k: v for k, v in params.items()
                                                 if k not in bad}}
            cleaned.append(entry)
        data = {**data, "models": cleaned}
    params = data.get("parameters")
    if isinstance(params, dict):
        bad = sorted(k for k, v in params.items() if k in wide and isinstance(v, (list, dict)))
        for key in bad:
            problems.append(
                f"parameters.{key}: a method-wide option takes one value, not a list "
                f"(got {quote(params[key])}); gradients and filters apply to "
                f"{', '.join(PER_MODEL_KEYS)}")
        if bad:
            data = {**data, "parameters": {k: v for k, v in params.items() if k not in bad}}
    return data, problems


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
