"""Typed config files: the strict base model, YAML reading, pydantic errors as problem lines.

Recipes (``dareflow.recipe``), evaluation suites (``dareflow.evaluation.suite``) and sweep,
grid and similarity files (``dareflow.experiments.sweeps``) are pydantic models built on
:class:`StrictModel` (unknown keys are errors) and read with :func:`read_yaml`; a
validation failure becomes one :class:`~dareflow.errors.ProblemsError` listing every
problem (:func:`validation_problems`).
"""

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dareflow.errors import ProblemsError


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of the file ``path`` (a ``what``: "recipe", "suite", ...).

    Raises:
        FileNotFoundError: no such file (the message names the path and what was expected).
        ProblemsError: the file is not valid YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist; pass the path of a YAML file")
    try:
        return yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as e:
        raise ProblemsError(str(path), [f"not valid YAML: {e}"]) from None


def validation_problems(error: ValidationError) -> list[str]:
    """One line per pydantic error: the dotted key, what is wrong, and the value given."""
    out = []
    for e in error.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a dareflow or mergekit option); remove it or fix its spelling"
        elif e["type"] == "missing":
            msg = "required key is missing"
        msg = msg.removeprefix("Value error, ")
        given = e.get("input")
        if (e["type"] not in ("missing",) and not isinstance(given, (dict, list))
                and f"'{given}'" not in msg):
            msg = f"{msg} (got {given!r})"
        out.append(f"{loc}: {msg}")
    return out
