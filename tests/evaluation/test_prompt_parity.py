"""Prompt parity: the mirrored tasks render exactly what lm-eval's builtin tasks render.

The builtin task is built from lm-eval's own YAML (its loader, its functions) with only the
dataset swapped for the same mirrored rows (``custom_dataset``); our task is loaded the way
``run_task`` loads it (generated YAML + TaskManager). Same document in, same text out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dareflow.evaluation.mirror import MIRROR_TASKS, lm_eval_tasks_root, write_task_configs
from dareflow.evaluation.runner import hf_offline
from dareflow.evaluation.suite import load_suite

# Keys our generated configs may change: names, dataset location, split roles. Nothing else.
ALLOWED_DIFF = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs",
                "training_split", "validation_split", "test_split", "fewshot_split"}
SHOTS = {t.name: t.shots for t in load_suite("openllm_v1").tasks}
MMLU_SUBJECTS = ["abstract_algebra", "high_school_us_history"]


def _rows(mirror: Path, rel: str) -> list[dict]:
    return [json.loads(x) for x in (mirror / "data" / rel).read_text().splitlines()]


def _builtin_splits(name: str, mirror: Path, subject: str | None = None) -> dict[str, list]:
    """The mirrored rows under the split names lm-eval's builtin config reads."""
    if name == "arc_challenge":
        val = _rows(mirror, "arc_challenge/validation.jsonl")
        return {"train": val, "validation": val,
                "test": _rows(mirror, "arc_challenge/test.jsonl")}
    if name in ("hellaswag", "winogrande"):
        val = _rows(mirror, f"{name}/validation.jsonl")
        return {"train": val, "validation": val}
    if name == "gsm8k":
        test = _rows(mirror, "gsm8k/test.jsonl")
        return {"train": test, "test": test}
    if name == "truthfulqa_mc2":
        return {"validation": _rows(mirror, "truthfulqa_mc2/validation.jsonl")}
    if name == "mmlu":
        return {"test": _rows(mirror, f"mmlu/{subject}/test.jsonl"),
                "dev": _rows(mirror, f"mmlu/{subject}/dev.jsonl")}
    raise KeyError(name)


def _builtin_yaml(name: str, subject: str | None) -> Path:
    if name == "mmlu":
        return lm_eval_tasks_root() / f"mmlu/default/mmlu_{subject}.yaml"
    return lm_eval_tasks_root() / MIRROR_TASKS[name].builtin_yaml


def _builtin_task(name: str, mirror: Path, subject: str | None = None):
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(_builtin_yaml(name, subject))
    splits = _builtin_splits(name, mirror, subject)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    cfg.pop("tag", None)
    return ConfigurableTask(config=cfg)


@pytest.fixture(scope="module")
def our_tasks(mirror_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("parity")
    write_task_configs(mirror_dir, tmp / "tasks", cache_dir=tmp / "hf" / "datasets")
    tm = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
    names = [t.mirror_name for n, t in MIRROR_TASKS.items() if n != "mmlu"]
    names += [f"dareflow_mmlu_{s}" for s in MMLU_SUBJECTS]
    with hf_offline(tmp / "hf"):
        yield tm.load(names)["tasks"]


CASES = [(n, None) for n in MIRROR_TASKS if n != "mmlu"] + [("mmlu", s) for s in MMLU_SUBJECTS]


def _ours_name(name: str, subject: str | None) -> str:
    return f"dareflow_mmlu_{subject}" if subject else MIRROR_TASKS[name].mirror_name


@pytest.mark.parametrize(("name", "subject"), CASES)
def test_config_differs_only_in_dataset_and_split_roles(
    name: str, subject: str | None, mirror_dir: Path, tmp_path: Path
) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    out = tmp_path / "tasks"
    write_task_configs(mirror_dir, out)
    rel = f"mmlu/{_ours_name(name, subject)}.yaml" if subject else f"{_ours_name(name, None)}.yaml"
    ours = load_yaml(out / rel, resolve_func=False)
    builtin = load_yaml(_builtin_yaml(name, subject), resolve_func=False)
    changed = {k for k in ours.keys() | builtin.keys() if ours.get(k) != builtin.get(k)}
    assert changed <= ALLOWED_DIFF, changed - ALLOWED_DIFF
    # the same prompt, target, choices, metrics and filters, field by field
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "output_type",
                "process_docs", "process_results", "filter_list", "generation_kwargs",
                "description", "num_fewshot"):
        assert ours.get(key) == builtin.get(key), key


@pytest.mark.parametrize(("name", "subject"), CASES)
def test_same_doc_renders_the_same_prompt(
    name: str, subject: str | None, mirror_dir: Path, our_tasks: dict
) -> None:
    ours = our_tasks[_ours_name(name, subject)]
    builtin = _builtin_task(name, mirror_dir, subject)
    ours_docs, builtin_docs = list(ours.eval_docs), list(builtin.eval_docs)
    assert len(ours_docs) == len(builtin_docs)
    doc = ours_docs[0]
    assert doc == builtin_docs[0]
    assert ours.fewshot_context(doc, 0) == builtin.fewshot_context(doc, 0)
    assert ours.doc_to_target(doc) == builtin.doc_to_target(doc)
    if ours.OUTPUT_TYPE == "multiple_choice":
        assert ours.doc_to_choice(doc) == builtin.doc_to_choice(doc)
    assert ours.OUTPUT_TYPE == builtin.OUTPUT_TYPE
    assert ours.config.target_delimiter == builtin.config.target_delimiter
    assert ours.config.fewshot_delimiter == builtin.config.fewshot_delimiter

    shots = SHOTS[name]
    if name in ("arc_challenge", "mmlu"):
        # same few-shot pool and sampler as lm-eval (ARC: validation standing in for train,
        # random with the same seed; MMLU: the first 5 dev rows): identical k-shot prompts
        for task in (ours, builtin):
            task.set_fewshot_seed(1234)
        assert ours.fewshot_context(doc, shots) == builtin.fewshot_context(doc, shots)


@pytest.mark.parametrize("name", ["hellaswag", "winogrande", "gsm8k"])
def test_same_split_fewshot_leaves_the_evaluated_doc_out(name: str, our_tasks: dict) -> None:
    task = our_tasks[MIRROR_TASKS[name].mirror_name]
    task.set_fewshot_seed(1234)
    docs = list(task.eval_docs)
    for doc in docs[:3]:
        zero = task.fewshot_context(doc, 0)
        ctx = task.fewshot_context(doc, SHOTS[name])
        zero, ctx = (zero[0], ctx[0]) if isinstance(zero, list) else (zero, ctx)
        if name == "winogrande":  # the evaluated sentence ends the context
            assert ctx.endswith(zero) and ctx.count("\n\n") == SHOTS[name]
            continue
        assert ctx.endswith(zero)
        shown = ctx[: -len(zero)]
        target = task.doc_to_target(doc)
        answer = target if isinstance(target, str) else task.doc_to_choice(doc)[target]
        assert answer not in shown  # its own answer is never a few-shot example
        assert shown.count(task.config.fewshot_delimiter) == SHOTS[name]
