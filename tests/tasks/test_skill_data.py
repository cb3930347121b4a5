"""The demo suite's JSONL files are exactly the skills' fixed evaluation sets."""

import json
from pathlib import Path

import pytest

from tasks.skills import SKILLS

DATA = Path(__file__).resolve().parents[2] / "tasks" / "evaluation" / "data" / "skills"


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_suite_rows_are_the_skill_eval_set(name):
    skill = SKILLS[name]
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == 100
    for row, item in zip(rows, skill.eval_items):
        assert f"Q: {row['prompt']} A: " == skill.prompt(item)
        assert row["answer"] == skill.answer(item)
