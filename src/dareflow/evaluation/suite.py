"""Evaluation suites as data: a YAML file listing benchmarks, shots and the metric that counts.

A suite entry is either an lm-eval task/group (``task: arc_challenge``; in offline runs it is
mapped to the mirror's ``dareflow_arc_challenge``) or an exact-match generation task over any
JSONL file whose rows have ``prompt`` and ``answer`` fields (``data: {path: ...}``).

    suite = load_suite("openllm_v1")          # configs/suites/openllm_v1.yaml
    suite = load_suite("path/to/my_suite.yaml")
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dareflow.errors import ProblemsError, unknown_choice
from dareflow.schema import read_yaml, validation_problems
from dareflow.settings import SUITES_DIR

_NAME = r"^[a-z][a-z0-9_]*$"
# lm-eval metric keys: "acc", or "metric,filter" for a named filter ("exact_match,strict-match").
_METRIC = r"^[A-Za-z0-9_]+(,[A-Za-z0-9_.\-]+)?$"
_METRIC_HINT = (
    "metric names are 'metric' or 'metric,filter' (e.g. acc_norm, exact_match,strict-match); "
    'in a YAML flow list quote them: also: ["exact_match,flexible-extract"]'
)


class JsonlTask(BaseModel):
    """An exact-match generation task over a JSONL file (one ``{"prompt", "answer"}`` per line).

    Attributes:
        path: the JSONL file; a relative path is resolved against the suite file's folder.
        prompt_template: Jinja template over a row's fields giving the model input.
        target_template: Jinja template giving the expected answer.
        until: stop sequences for generation.
        max_gen_toks: generation budget in tokens.
        ignore_case: compare case-insensitively.
    """

    model_config = ConfigDict(extra="forbid")

    path: Path
    prompt_template: str = "{{prompt}}"
    target_template: str = "{{answer}}"
    until: list[str] = Field(default_factory=lambda: ["\n"])
    max_gen_toks: int = Field(default=32, ge=1, le=4096)
    ignore_case: bool = False

    @field_validator("path")
    @classmethod
    def _resolve_and_check(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        path = value.expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        path = path.resolve()
        if not path.is_file():
            raise ValueError(
                f"JSONL file {path} not found (a relative path is read from the suite file's "
                "folder)"
            )
        for lineno, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not {"prompt", "answer"} <= row.keys():
                raise ValueError(
                    f"{path}:{lineno} must be an object with 'prompt' and 'answer' fields, "
                    f"got {line[:80]!r}"
                )
        return path


class SuiteTask(BaseModel):
    """One benchmark of a suite.

    Attributes:
        name: the column name in results tables.
        task: lm-eval's task or group name (default ``name``); unset for a ``data`` task.
        data: an in-repo exact-match JSONL task instead of an lm-eval task.
        shots: number of few-shot examples.
        metric: the lm-eval metric that enters the comparison and the average, written
            ``metric`` for lm-eval's ``metric,none`` and ``metric,filter`` otherwise (e.g.
            ``exact_match,strict-match``); with ``aggregate: macro_micro``, ``<metric>_macro``
            or ``<metric>_micro``.
        also: further metrics shown next to ``metric`` (every metric lm-eval reports is
            recorded in the tidy table anyway).
        aggregate: ``lm_eval`` takes lm-eval's numbers as they are; ``macro_micro`` (for a
            group such as MMLU) adds the unweighted mean over the leaf subtasks (``_macro``,
            as the Open LLM Leaderboard v1 reported MMLU) and the size-weighted mean
            (``_micro``).
        model_args: extra lm-eval model arguments for this task. ``add_bos_token`` decides
            whether a BOS token starts every context: unset, lm-eval 0.4.13's hf and vllm
            backends add whatever the tokenizer adds by default (Llama and Mistral tokenizers
            add BOS; ``lm_eval/models/huggingface.py`` ``tok_encode``), while the Open LLM
            Leaderboard v1's harness (lm-eval 0.3) added none to causal LMs, so
            ``openllm_v1.yaml`` pins ``add_bos_token: false``; the demo family, trained with
            a BOS before every prompt, sets ``true`` in ``demo_skills.yaml``.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    task: str | None = None
    data: JsonlTask | None = None
    shots: int = Field(ge=0, le=64)
    metric: str = Field(min_length=1)
    also: list[str] = Field(default_factory=list)
    aggregate: Literal["lm_eval", "macro_micro"] = "lm_eval"
    model_args: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SuiteTask:
        problems = [
            f"task {self.name!r}: bad metric {m!r}: {_METRIC_HINT}"
            for m in [self.metric, *self.also] if not re.match(_METRIC, m)
        ]
        if self.data is not None and self.task is not None:
            problems.append(
                f"task {self.name!r} sets both 'task' ({self.task!r}) and 'data': a suite entry "
                "is either an lm-eval task or a JSONL task"
            )
        if self.data is None and self.task is None:
            self.task = self.name
        if self.aggregate == "macro_micro":
            for m in [self.metric, *self.also]:
                if not m.endswith(("_macro", "_micro")):
                    problems.append(
                        f"task {self.name!r}: with aggregate: macro_micro the metrics are "
                        f"'<metric>_macro' or '<metric>_micro', got {m!r} (e.g. acc_macro)"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def metrics(self) -> list[str]:
        """``metric`` followed by ``also``."""
        return [self.metric, *[m for m in self.also if m != self.metric]]


class Suite(BaseModel):
    """A named list of benchmarks; the average is the mean of each task's ``metric``.

    Attributes:
        name: the suite's name (``openllm_v1``).
        description: free text.
        average: whether tables get an ``average`` column (mean of the tasks' ``metric``).
        tasks: the benchmarks, in table order.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    description: str = ""
    average: bool = True
    tasks: list[SuiteTask] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Suite:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique within a suite, repeated: {dupes}")
        return self

    def primary_metrics(self) -> dict[str, str]:
        """``{task name: metric}`` of the metrics that enter the comparison and the average."""
        return {t.name: t.metric for t in self.tasks}

    def task(self, name: str) -> SuiteTask:
        """The entry called ``name``.

        Raises:
            KeyError: no such entry (with the closest name and the choices).
        """
        for t in self.tasks:
            if t.name == name:
                return t
        names = [t.name for t in self.tasks]
        raise KeyError(f"suite {self.name!r}: {unknown_choice('task', name, names)}")


def suite_path(name_or_path: str | os.PathLike) -> Path:
    """The file of a suite given by name (``openllm_v1`` -> ``configs/suites/openllm_v1.yaml``)
    or by path.

    Raises:
        FileNotFoundError: neither a file nor a known suite name (lists the known ones).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if path.suffix not in (".yaml", ".yml") and "/" not in text:
        candidate = SUITES_DIR / f"{text}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
    raise FileNotFoundError(
        f"{unknown_choice('suite', text, known)} (a suite is a file or the name of one in "
        f"{SUITES_DIR})"
    )


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """Parse and validate a suite file; every problem in it is reported in one error.

    Raises:
        FileNotFoundError: the suite is not found.
        ValueError: the YAML is malformed or invalid (the message names the file and lists
            every problem).
    """
    path = suite_path(name_or_path)
    raw = read_yaml(path, "suite")
    if not isinstance(raw, dict):
        raise ProblemsError(str(path), [f"a suite is a mapping with 'name' and 'tasks', got {raw!r}"])
    try:
        return Suite.model_validate(raw, context={"base_dir": path.parent})
    except ValidationError as exc:
        raise ProblemsError(str(path), validation_problems(exc)) from None
