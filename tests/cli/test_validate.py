"""``dareflow validate`` refuses what ``dareflow merge`` refuses before it reads a model
(issue 14, item 10): non-finite numbers, local model folders that do not exist, merge
specs the method would refuse, a file that is not UTF-8; and says what it could not check
offline (Hub ids, s3:// prefixes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dareflow.cli import main


def _validate(capsys, *paths: Path) -> tuple[int, str, str]:
    code = main(["validate", *map(str, paths)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _merge(capsys, recipe: Path, out: Path) -> tuple[int, str]:
    code = main(["merge", str(recipe), "--out", str(out), "--max-workers", "1"])
    return code, capsys.readouterr().err


def _problems(text: str) -> list[str]:
    return [line.removeprefix("  - ") for line in text.splitlines() if line.startswith("  - ")]


def test_non_finite_numbers_are_refused_by_validate_as_by_merge(tmp_path, capsys):
    recipe = tmp_path / "nan.yaml"
    recipe.write_text(
        "merge_method: dare_ties\nbase_model: org/base\nmodels:\n"
        "  - model: org/a\n    parameters: {weight: .nan, density: 0.5}\n"
        "  - model: org/b\n    parameters: {weight: [0.5, .inf], density: 0.5}\n"
        "parameters:\n  lambda: .inf\n  trim_after_dare: .nan\n"
        "gate: {max_relative_norm: -.inf, max_abs_delta_p99: .inf}\n")
    expected = [
        "models.0.parameters.weight: Input should be a finite number (got nan)",
        ("models.1.parameters.weight: gradient [0.5, inf]: Input should be a finite number "
        "(got inf)"),
        "parameters.lambda: Input should be a finite number (got inf)",
        "parameters.trim_after_dare: Input should be a finite number (got nan)",
        "gate.max_abs_delta_p99: Input should be a finite number (got inf)",
        "gate.max_relative_norm: Input should be a finite number (got -inf)",
    ]
    code, out, err = _validate(capsys, recipe)
    assert (code, out) == (1, "")
    assert sorted(_problems(err)) == sorted(expected)
    assert err.startswith(f"FAIL {recipe}: 6 problems:")
    code, err = _merge(capsys, recipe, tmp_path / "out")
    assert code == 2 and sorted(_problems(err)) == sorted(expected)
    assert not (tmp_path / "out").exists()


def test_local_model_folders_must_exist_hub_and_s3_are_named_as_unchecked(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "ft").mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "merge_method: task_arithmetic\nbase_model: ./models/base\nmodels:\n"
        f"  - model: {tmp_path}/absent\n  - model: ./absent\n  - model: ../absent-9f1c\n"
        "  - model: models/typo\n  - model: org/hub-model\n  - model: s3://bucket/prefix\n")
    code, out, err = _validate(capsys, bad)
    assert (code, out) == (1, "")
    assert _problems(err) == [
        (f"models[0].model: local model folder '{tmp_path}/absent' does not exist (resolved to "
        f"{tmp_path}/absent); check the path (relative paths are resolved against the "
        "working directory)"),
        (f"models[1].model: local model folder './absent' does not exist (resolved to "
        f"{tmp_path}/absent); check the path (relative paths are resolved against the "
        "working directory)"),
        (f"models[2].model: local model folder '../absent-9f1c' does not exist (resolved to "
        f"{tmp_path.parent}/absent-9f1c); check the path (relative paths are resolved "
        "against the working directory)"),
        (f"models[3].model: local model folder 'models/typo' does not exist (resolved to "
        f"{tmp_path}/models/typo; its parent models/ is a folder here, so it is read as a "
        "path); check the path, or write hf://models/typo for the Hub repo"),
    ]
    good = tmp_path / "good.yaml"
    good.write_text(
        "merge_method: task_arithmetic\nbase_model: ./models/base\nmodels:\n"
        "  - model: models/ft\n  - model: org/hub-model@v2\n  - model: s3://bucket/prefix\n")
    code, out, err = _validate(capsys, good)
    assert (code, err) == (0, "")
    assert out == (
        f"ok   {good}: recipe: task_arithmetic, 3 fine-tuned model(s), 2 local folder(s) "
        "found; not checked offline: org/hub-model@v2 (hub), s3://bucket/prefix (s3) (Hub "
        "ids and s3:// prefixes are looked up by `dareflow plan` and `merge`)\n")


def test_merge_refuses_the_same_missing_folder(tmp_path, capsys, monkeypatch, pico_family):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAREFLOW_STORE", str(tmp_path / "store"))
    (tmp_path / "models").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "task_arithmetic",
                                  "base_model": str(pico_family["base"]),
                                  "models": [{"model": "models/typo"}]}))
    code, _, err = _validate(capsys, recipe)
    problem = _problems(err)[0].removeprefix("models[0].model: ")
    code, err = _merge(capsys, recipe, tmp_path / "out")
    assert code == 2 and problem in err, err
    assert not (tmp_path / "out").exists()


def test_validate_runs_the_merge_spec_check(tmp_path, capsys, pico_family):
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(json.dumps({
        "merge_method": "linear", "parameters": {"lambda": 2},
        "models": [{"model": str(pico_family["a"])}, {"model": str(pico_family["b"])}]}))
    code, out, err = _validate(capsys, recipe)
    assert (code, out) == (1, "")
    assert _problems(err) == [("parameters: invalid merge spec for method 'linear': scale 2.0 "
                              "would be ignored: 'linear' has no λ; use task_arithmetic")]
    # the pre-flight `merge` runs (what `plan` prints) refuses it for the same reason
    assert main(["plan", str(recipe), "--store", str(tmp_path / "store")]) != 0
    assert "scale 2.0 would be ignored: 'linear' has no λ" in "".join(capsys.readouterr())


def test_recipe_semantic_and_tokenizer_checks_are_the_merges(tmp_path, capsys):
    recipe = tmp_path / "tok.yaml"
    recipe.write_text("merge_method: dare_linear\nbase_model: org/base\nmodels:\n"
                      "  - model: org/a\n    parameters: {drop_rate: 0.5, density: 0.5}\n"
                      "tokenizer: {source: org/other}\n")
    code, _, err = _validate(capsys, recipe)
    assert code == 1
    from dareflow.errors import ProblemsError
    from dareflow.recipe import load_recipe

    with pytest.raises(ProblemsError) as caught:
        load_recipe(recipe)
    assert _problems(err) == caught.value.problems
    assert any(p.startswith("tokenizer.source: unknown tokenizer source 'org/other'")
               for p in caught.value.problems)


def test_non_utf8_and_duplicate_key_errors_name_the_file(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"merge_method: linear\nname: caf\xe9\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text("merge_method: linear\nmodels:\n  - model: org/a\nmodels:\n"
                   "  - model: org/b\n")
    code, out, err = _validate(capsys, latin, dup)
    assert (code, out) == (1, "")
    assert err == (
        f"FAIL {latin}: 1 problem:\n  - not UTF-8 text (byte 0xe9 at offset 30 cannot be "
        "decoded); save the file as UTF-8\n"
        f"FAIL {dup}: 1 problem:\n  - line 4: key 'models' is given twice in one mapping "
        "(first at line 2); YAML would silently keep only the last value: keep one\n")
