"""The demo suite's JSONL files are exactly the skills' fixed evaluation sets."""

import json

import pytest

from dareflow.demo.skills import SKILLS
from dareflow.settings import SUITES_DIR

DATA = SUITES_DIR / "skills"


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_suite_rows_are_the_skill_eval_set(name):
    skill = SKILLS[name]
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == 100
    for row, item in zip(rows, skill.eval_items):
        assert f"Q: {row['prompt']} A: " == skill.prompt(item)
        assert row["answer"] == skill.answer(item)
