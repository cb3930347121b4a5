"""The Open LLM Leaderboard v1 protocol: the suite and lm-eval's builtin tasks match it, BOS is
pinned off in the run arguments, and a run's protocol label names every deviation."""

from __future__ import annotations

import math

import pytest

from dareflow.evaluation.mirror import MIRROR_TASKS
from dareflow.evaluation.mirror_sources import lm_eval_tasks_root
from dareflow.evaluation.protocol import V1_TASKS, run_protocol
from dareflow.evaluation.results import (
    OPENLLM_V1_METRICS,
    comparison,
    comparison_markdown,
    tidy_results,
)
from dareflow.evaluation.runner import model_spec
from dareflow.evaluation.suite import Suite, load_suite

V1 = load_suite("openllm_v1")


def _roles(cfg: dict) -> tuple[str | None, str | None]:
    """(evaluated split, few-shot split) by lm-eval 0.4.13's rules (``ConfigurableTask``:
    test_split if set else validation_split; fewshot_split if set else training_split, else
    validation_split)."""
    evaluated = cfg.get("test_split") or cfg.get("validation_split")
    fewshot = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get(
        "validation_split")
    return evaluated, fewshot


BUILTIN = {"arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
           "mmlu": "mmlu/default/mmlu_anatomy.yaml",
           "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
           "winogrande": "winogrande/default.yaml", "gsm8k": "gsm8k/gsm8k.yaml"}


def test_the_suite_is_the_leaderboards_settings() -> None:
    assert {t.name for t in V1.tasks} == set(V1_TASKS)
    for entry in V1.tasks:
        v1 = V1_TASKS[entry.name]
        assert (entry.task, entry.shots, entry.metric) == (v1.name, v1.shots, v1.metric)
    assert {t.name: t.metric for t in V1_TASKS.values()} == OPENLLM_V1_METRICS


def test_online_split_roles_are_the_leaderboards() -> None:
    """lm-eval 0.4.13's builtin YAMLs (what an online run reads) evaluate and draw shots from
    the splits v1 used."""
    # lm-eval's own loader resolves `include` and leaves `!function` tags unresolved
    from lm_eval.tasks._yaml_loader import load_yaml

    for name, rel in BUILTIN.items():
        cfg = load_yaml(lm_eval_tasks_root() / rel, resolve_func=False)
        v1 = V1_TASKS[name]
        evaluated, fewshot = _roles(cfg)
        assert evaluated == v1.eval_split, name
        if v1.shots:
            assert fewshot == v1.fewshot_split, name
        sampler = (cfg.get("fewshot_config") or {}).get("sampler", "default")
        assert sampler == ("first_n" if v1.sampler == "first_n" else "default"), name
    assert load_yaml(lm_eval_tasks_root() / BUILTIN["winogrande"])["dataset_name"] == (
        "winogrande_xl")


def test_bos_is_pinned_off_in_every_v1_run(tmp_path) -> None:
    for entry in V1.tasks:
        assert entry.model_args == {"add_bos_token": False}, entry.name
        for backend, device in (("hf", "cpu"), ("hf", "cuda"), ("vllm", "cuda")):
            _, args = model_spec(tmp_path, backend, device, entry.model_args)
            assert args["add_bos_token"] is False, (entry.name, backend)
    # and the label says so when a run adds one
    arc = V1.task("arc_challenge").model_dump(mode="json")
    assert run_protocol({"entry": arc}, n=1172) == "v1"
    assert run_protocol({"entry": arc}, n=1172, model_args={"add_bos_token": True}) == (
        "v1-modified: BOS added (v1: none)")
    unpinned = {**arc, "model_args": {}}
    assert run_protocol({"entry": unpinned}, n=1172) == (
        "v1-modified: BOS as the tokenizer adds it (v1: none)")


def _entry(name: str, **changes) -> dict:
    return {**V1.task(name).model_dump(mode="json"), **changes}


@pytest.mark.parametrize(("meta", "n", "label"), [
    ({"entry": _entry("gsm8k")}, 1319, "v1"),
    ({"entry": _entry("gsm8k"), "limit": 5}, 5, "v1-modified: 5 of 1319 docs (limit 5)"),
    ({"entry": _entry("gsm8k"), "limit": 3}, math.nan, "v1-modified: limit 3"),
    ({"entry": _entry("arc_challenge", shots=5)}, 1172, "v1-modified: 5-shot (v1: 25)"),
    ({"entry": _entry("mmlu"), "mirror": True}, 14042, "v1"),
    ({"entry": _entry("mmlu"), "mirror": True, "limit": 2}, 114,
     "v1-offline: 114 of 14042 docs (limit 2)"),
    ({"entry": _entry("arc_challenge"), "mirror": True, "limit": 2}, 2,
     "v1-offline: shots from validation (299), not train (1,119); 2 of 1172 docs (limit 2)"),
    ({"entry": _entry("truthfulqa_mc2"), "mirror": True}, 299,
     "v1-offline: BIG-bench's 299 of the 817 questions"),
    ({"entry": _entry("hellaswag"), "mirror": True}, 10042,
     "v1-offline: shots from the evaluated validation split, not train"),
    ({"entry": _entry("gsm8k"), "mirror": True}, math.nan,
     "v1-offline: shots from the evaluated test split, not train"),
    ({"entry": {"name": "arithmetic", "task": None, "data": {"path": "x.jsonl"}}}, 8, "custom"),
    ({"entry": {"name": "boolq", "task": "boolq", "shots": 0, "metric": "acc"}}, 3270, "custom"),
])
def test_protocol_labels(meta: dict, n: float, label: str) -> None:
    assert run_protocol(meta, n=n) == label


def test_every_mirror_deviation_is_a_v1_difference() -> None:
    """A mirrored task lists deviations exactly where its split roles or sizes differ from v1."""
    for name, spec in MIRROR_TASKS.items():
        v1 = V1_TASKS[name]
        same = (spec.eval_split, spec.eval_rows, spec.fewshot_split, spec.fewshot_rows) == (
            v1.eval_split, v1.eval_docs, v1.fewshot_split, v1.fewshot_docs)
        assert same == (not spec.deviations), name


def test_a_real_offline_run_carries_the_pin_and_its_label(tiny_lm_dir, mirror_dir) -> None:
    """lm-eval itself receives add_bos_token=False, and the tidy table and the comparison say
    how the run differs from the leaderboard."""
    from dareflow.evaluation.runner import run_task

    entry = V1.task("winogrande")
    raw = run_task(tiny_lm_dir, entry, limit=2, mirror_dir=mirror_dir)
    assert raw["config"]["model_args"]["add_bos_token"] is False
    table = tidy_results({"m": [raw]})
    label = ("v1-offline: shots from the evaluated validation split, not train; "
             "2 of 1267 docs (limit 2)")
    assert set(table.protocol) == {label}
    table["status"], table["error"] = "ok", ""
    suite = Suite(name="w", tasks=[entry])
    wide, failed = comparison(table, suite, "m", [])
    md = comparison_markdown(wide, failed).splitlines()
    assert md[-2:] == [f"- winogrande: {label}", ("† the average is not comparable with the "
                                                  "leaderboard's: 1 of 1 tasks differ from its "
                                                  "protocol.")]
