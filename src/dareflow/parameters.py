"""Per-model parameter settings of a recipe: numbers, gradients and filtered values.

mergekit's ``ParameterSetting`` (its ``config.py``): ``weight``, ``density`` and
``drop_rate``, per model or in the top-level ``parameters``, are each one number, a
gradient (a list of numbers interpolated over the layers) or a list of
``{filter, value}`` entries; :func:`evaluate_setting` gives the value for one tensor.
Where a setting does not match a tensor, the next level applies (``dareflow.recipe``).
"""

from __future__ import annotations

import math
from typing import Any

from dareflow.errors import quote
from dareflow.schema import StrictModel

__all__ = [
    "PER_MODEL_KEYS",
    "Conditional",
    "Setting",
    "check_setting",
    "evaluate_setting",
    "is_scalar",
]

#: The per-model numbers: given per model or as top-level defaults, each a number, a
#: gradient or a list of {filter, value} entries. Every other parameter is method-wide.
PER_MODEL_KEYS = ("weight", "density", "drop_rate")


class Conditional(StrictModel):
    """One ``{filter, value}`` entry of a filtered setting: it applies to the tensors
    whose name contains ``filter`` (None or ``"*"``: every tensor)."""

    filter: str | None = None
    value: float | list[float]


#: A per-model number as written: one number, a gradient over the layers, or
#: {filter, value} entries (see :func:`evaluate_setting`).
Setting = float | list[float] | list[Conditional]

_SHAPES = ("a number, a list of numbers (a gradient over the layers) or a list of "
           "{filter, value} entries")


def _check_number(value: Any, key: str, where: str = "") -> float:
    """One number of a setting; ValueError with pydantic's wording otherwise.

    ``where`` ("" for a setting that is one number) prefixes nested values, whose
    message then names the value itself (``validation_problems`` adds it otherwise).
    """
    got = f" (got {quote(value)})" if where else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shapes = "a valid number" if where else _SHAPES
        raise ValueError(f"{where}Input should be {shapes}{got}")  # noqa: TRY004
    if not math.isfinite(value):
        raise ValueError(f"{where}Input should be a finite number{got}")
    if key != "weight":
        if value < 0:
            raise ValueError(f"{where}Input should be greater than or equal to 0{got}")
        if value > 1:
            raise ValueError(f"{where}Input should be less than or equal to 1{got}")
    return float(value)


def _check_gradient(values: list, key: str, where: str = "") -> list[float]:
    if not values:
        raise ValueError(f"{where}an empty list gives no value; give {_SHAPES}")
    prefix = f"{where}gradient {quote(values)}: "  # once: a long list is quoted short
    return [_check_number(v, key, prefix) for v in values]


def check_setting(value: Any, key: str) -> Any:
    """Validate one per-model setting (``key`` in :data:`PER_MODEL_KEYS`).

    Returns it unchanged (pydantic then builds the typed value).

    Raises:
        ValueError: naming what is wrong and the shapes a setting may take (also for
            a wrong type: pydantic turns only ValueError into a validation problem).
    """
    if value is None or not isinstance(value, (list, dict)):
        return value if value is None else _check_number(value, key)
    if isinstance(value, dict):
        raise ValueError(  # noqa: TRY004
            "a {filter, value} entry must be inside a list (mergekit cannot read a bare "
            f"one): write it as `- filter: ...` / `  value: ...` (got {quote(value)})")
    if not value:
        raise ValueError(f"an empty list gives no value; give {_SHAPES}")
    if not any(isinstance(v, dict) for v in value):
        return _check_gradient(value, key)
    for i, entry in enumerate(value):
        where = f"entry {i}: "
        if not isinstance(entry, dict):
            raise ValueError(  # noqa: TRY004
                f"{where}a list must hold only numbers (a gradient) or only {{filter, "
                f"value}} entries, got {quote(entry)} among entries")
        unknown = sorted(set(entry) - {"filter", "value"})
        if unknown:
            raise ValueError(f"{where}unknown key(s) {unknown}; an entry has `filter` "
                             "(a substring of tensor names) and `value`")
        if "value" not in entry:
            raise ValueError(f"{where}`value` is missing (got {quote(entry)})")
        if entry.get("filter") is not None and not isinstance(entry["filter"], str):
            raise ValueError(f"{where}`filter` must be a string (a substring of tensor "
                             f"names, or \"*\"), got {quote(entry['filter'])}")
        inner = entry["value"]
        if isinstance(inner, list):
            _check_gradient(inner, key, where)
        else:
            _check_number(inner, key, where)
    return value


def evaluate_setting(setting: Any, tensor: str, t: float) -> float | None:
    """The value of a per-model setting for one tensor, mergekit's rules.

    A number is itself. A gradient ``[v0, ..., vn]`` is interpolated piecewise
    linearly at ``t`` (``s = t·n``, ``i = int(s)``: ``(1 − (s − i))·v_i + (s − i)·v_i+1``,
    the same float operations as mergekit). ``{filter, value}`` entries: the first
    whose filter is None, ``"*"`` or a substring of ``tensor`` gives the value (itself
    a number or a gradient); no match gives None (the next level applies).

    Args:
        setting: As stored in the recipe (None: not set).
        tensor: The tensor name.
        t: Position of the tensor's layer: ``index / (layers − 1)`` (1 for a single
            layer), 0 for tensors outside the layers.
    """
    if setting is None or isinstance(setting, (int, float)):
        return None if setting is None else float(setting)
    if all(isinstance(v, (int, float)) for v in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for entry in setting:
        if entry.filter is None or entry.filter == "*" or (tensor and entry.filter in tensor):
            return evaluate_setting(entry.value, tensor, t)
    return None


def is_scalar(setting: Any) -> bool:
    """Whether a setting is one number (or unset): the same for every tensor."""
    return setting is None or isinstance(setting, (int, float))
