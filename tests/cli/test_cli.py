import pytest

from dareflow.cli import main
from dareflow.methods import METHODS


def test_ls_lists_every_method(capsys):
    assert main(["ls", "-v"]) == 0
    out = capsys.readouterr().out
    for method in METHODS:
        assert method in out
    assert "mergekit" in out and "arXiv" in out


def test_validate_reports_each_file_and_fails_if_any_is_bad(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("merge_method: dare_linear\nbase_model: org/b\n"
                    "models:\n  - model: org/a\n    parameters: {drop_rate: 0.5}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: dare_linear\nbase_model: b\nmodels:\n  - model: a\n"
                   "    parameters: {drop_rate: 0.5, density: 0.5}\n")
    assert main(["validate", str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"ok   {good}: recipe: dare_linear, 1 fine-tuned model(s)" in captured.out
    assert "give either drop_rate" in captured.err and str(bad) in captured.err


def test_bad_worker_count_is_refused(capsys):
    assert main(["merge", "x.yaml", "--out", "o", "--max-workers", "0"]) == 2
    assert "--max-workers must be >= 1, got 0" in capsys.readouterr().err


def test_missing_recipe_is_a_clear_error(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "recipe '" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["merge"], ["bogus"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
