"""Config parsing is bounded (issue 14, item 5): YAML aliases cannot blow up a recipe, a key
given twice is an error, and messages quote a few hundred characters of a value at most.

Each case runs ``dareflow validate`` or ``dareflow merge`` as a real process under a memory
limit and a timeout, so a parser that expands a "billion laughs" would be killed, not hang
the suite.
"""

from __future__ import annotations

import itertools
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dareflow.errors import QUOTE_CHARS, ProblemsError
from dareflow.recipe import load_recipe
from dareflow.schema import (
    MAX_CONFIG_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    parse_yaml,
    read_yaml,
)

ROOT = Path(__file__).resolve().parents[2]
#: Address space of each child: the CLI with torch fits; 10⁹ expanded values do not.
MEMORY_LIMIT = 3 << 30


@pytest.fixture(params=["libyaml", "pure-python"], autouse=True)
def loader(request, monkeypatch):
    """Every in-process case with both parsers: libyaml's (the default where PyYAML has
    it) and PyYAML's pure-Python one (where it does not)."""
    import yaml

    from dareflow import schema

    if request.param == "pure-python":
        monkeypatch.setattr(schema, "_ConfigLoader", schema._PurePythonLoader)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML is built without libyaml here")
    return request.param


def _laughs(levels: int = 9) -> str:
    """A recipe whose gradient expands to 10**levels numbers through nested aliases."""
    names = "abcdefghijklmnop"[:levels]
    lines = [f"  - &{names[0]} [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"  - &{n} [{', '.join(['*' + p] * 10)}]" for p, n in itertools.pairwise(names)]
    return ("merge_method: task_arithmetic\nbase_model: org/base\nx:\n" + "\n".join(lines)
            + f"\nmodels:\n  - model: org/ft\n    parameters:\n      weight: *{names[-1]}\n")


def _cli(*args: str, timeout: float = 120) -> tuple[int, str, float, float]:
    """(exit code, stdout + stderr, seconds, peak RSS in MiB) of a bounded dareflow run."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dareflow.cli", *args], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return proc.returncode, proc.stdout + proc.stderr, seconds, peak


def test_billion_laughs_recipe_is_refused_quickly_with_bounded_memory(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs())
    assert 500 <= path.stat().st_size <= 600  # the size of the recipe
    started = time.monotonic()
    with pytest.raises(ProblemsError) as caught:
        read_yaml(path, "recipe")
    # not a speed test: the unbounded parser never finished; a wide margin for noisy machines
    assert time.monotonic() - started < 5
    assert caught.value.problems == [
        (f"line 8: aliases (*name) expand this value to more than {MAX_YAML_NODES} values; a "
        "config is refused above that size: write the values out, or use fewer aliases")]
    # the same through the CLI, for validate and merge: one short message, quickly
    for verb in (["validate"], ["merge", "--out", str(tmp_path / "out")]):
        code, output, seconds, peak = _cli(*verb, str(path))
        assert code in (1, 2), output
        assert "more than 100000 values" in output and len(output) < 1000, output[:2000]
        assert seconds < 60 and peak < MEMORY_LIMIT >> 20
    assert not (tmp_path / "out").exists()


def test_aliases_within_the_bound_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n"
                    "  - model: org/a\n    parameters: &p {weight: 0.5}\n"
                    "  - model: org/b\n    parameters: *p\n")
    recipe = load_recipe(path)
    assert [m.parameters.weight for m in recipe.models] == [0.5, 0.5]


def test_recursive_alias_and_deep_nesting_are_refused():
    with pytest.raises(ProblemsError) as caught:
        parse_yaml("a: &x [1, *x]\n", "t.yaml")
    assert caught.value.problems == [
        ("line 1: an alias refers to a value that contains it (a recursive structure); a "
        "config is a tree: remove the alias")]
    with pytest.raises(ProblemsError) as caught:
        parse_yaml("a:\n  b: " + "[" * 150 + "]" * 150, "t.yaml")
    assert caught.value.problems == [
        (f"line 2: nested more than {MAX_YAML_DEPTH} levels deep; a config is a few levels "
        "of keys and lists")]
    # far deeper: refused as quickly (libyaml's own limit, 1000, may answer first)
    started = time.monotonic()
    with pytest.raises(ProblemsError) as caught:
        parse_yaml("[" * 500_000 + "]" * 500_000, "t.yaml")
    assert "nest" in caught.value.problems[0]
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(("text", "problem"), [
    ("merge_method: linear\nmodels:\n  - model: org/a\nseed: 1\nmodels:\n  - model: org/b\n",
     ("line 5: key 'models' is given twice in one mapping (first at line 2); YAML would "
     "silently keep only the last value: keep one")),
    (("merge_method: linear\nmodels:\n  - model: org/a\n    parameters:\n      weight: 1\n"
     "      density: 0.5\n      weight: 2\n"),
     ("line 7: key 'weight' is given twice in one mapping (first at line 5); YAML would "
     "silently keep only the last value: keep one")),
    ("merge_method: linear\nparameters: {normalize: true, normalize: false}\n",
     ("line 2: key 'normalize' is given twice in one mapping (first at line 2); YAML would "
     "silently keep only the last value: keep one")),
])
def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path, text, problem):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ProblemsError) as caught:
        load_recipe(path)
    assert caught.value.source == str(path)
    assert caught.value.problems == [problem]


def test_merge_key_overrides_are_not_duplicates():
    data = parse_yaml("base: &b {weight: 1, density: 0.5}\nm:\n  <<: *b\n  weight: 2\n", "t")
    assert data["m"] == {"weight": 2, "density": 0.5}


def test_huge_values_are_quoted_short(tmp_path):
    big = "x" * 300_000
    path = tmp_path / "huge.yaml"
    path.write_text(f"merge_method: {big}\nmodels:\n  - model: org/a\n"
                    f"    parameters: {{weight: [{', '.join(['1'] * 50_000)}, oops]}}\n"
                    f"dtype: {big}\n")
    with pytest.raises(ProblemsError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert len(message) < 3000, message[:3000]
    assert all(len(p) <= 1001 for p in caught.value.problems)
    assert f"unknown merge method '{'x' * (QUOTE_CHARS - 1)}… (300002 characters)" in message
    assert "dtype: Input should be 'float32', 'bfloat16' or 'float16' (got " in message
    # through the CLI: the same few lines
    code, output, _, _ = _cli("validate", str(path))
    assert code == 1 and len(output) < 3000, output[:3000]


def test_oversized_and_non_utf8_and_special_config_files_name_the_file(tmp_path):
    import os

    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ProblemsError) as caught:
        read_yaml(big, "recipe")
    assert str(caught.value) == (
        f"{big}: 1 problem:\n  - {MAX_CONFIG_BYTES + 1} bytes, more than the "
        f"{MAX_CONFIG_BYTES} a config may have; is this the right file?")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("merge_method: linear\nname: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ProblemsError) as caught:
        read_yaml(latin, "recipe")
    assert str(caught.value) == (
        f"{latin}: 1 problem:\n  - not UTF-8 text (byte 0xe9 at offset 30 cannot be "
        "decoded); save the file as UTF-8")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ProblemsError) as caught:
        read_yaml(fifo, "recipe")
    assert time.monotonic() - started < 5
    assert caught.value.problems == [
        "not a regular file (a folder, a pipe or a device); pass a YAML recipe file"]
