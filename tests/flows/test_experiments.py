"""The experiment flows: sweep, grid, similarity, and the merge gate, on real Prefect.

Fast tests run on the "tiny" demo family (seconds to build; too small to learn the
skills, so they check the wiring, caches, files and selection). The paper's qualitative
findings need the real demo family (~2 min to build): ``test_paper_findings`` (slow).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from dareflow.demo.skills import split_items
from dareflow.errors import ProblemsError
from dareflow.experiments import sweeps


def _unrelated(src: Path, out: Path) -> Path:
    """Same architecture and files as ``src``, weights re-initialised (a wrong base)."""
    shutil.copytree(src, out)
    g = torch.Generator().manual_seed(123)
    tensors = {n: (torch.randn(t.shape, generator=g) * 0.02).to(t.dtype)
               for n, t in load_file(src / "model.safetensors").items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dareflow.demo.family import build_demo_family

    root = tmp_path_factory.mktemp("tiny-family") / "family"
    build_demo_family(root, size="tiny")
    return root


def _demo(root: Path) -> dict:
    return {"dir": str(root), "size": "tiny", "seed": 0}


def test_sweep_flow_table_files_and_caches(tiny_family: Path, tmp_path: Path) -> None:
    from dareflow.flows.experiments import sweep_flow

    store = str(tmp_path / "store")
    config = {"name": "t", "demo_family": _demo(tiny_family), "finetuned": "arithmetic",
              "drop_rates": [0.9, 0.0, 0.5], "evaluation": {"skills": ["arithmetic"], "n": 8}}
    out = sweep_flow(config, store=store)
    table = pd.DataFrame(out["rows"])
    assert list(zip(table["method"], table["drop_rate"])) == [
        (m, p) for m in ("dare", "drop_only", "magnitude") for p in (0.0, 0.5, 0.9)]
    # p = 0 is the identity for every method: one model, evaluated once
    assert table[table.drop_rate == 0.0]["model_key"].nunique() == 1
    assert table[table.drop_rate > 0]["model_key"].nunique() == 6
    assert out["paths"]["csv"] == f"{store}/experiments/sweeps/t.csv"
    assert pd.read_csv(out["paths"]["csv"])["arithmetic"].tolist() == table["arithmetic"].tolist()
    assert pd.read_parquet(out["paths"]["parquet"]).shape == table.shape
    for png in (out["paths"]["plot"], out["delta_stats"]["paths"]["plot"]):
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    assert out["delta_stats"]["gate"]["passed"] is True
    assert out["delta_stats"]["overall"]["tensor"] == "(all)"

    again = pd.DataFrame(sweep_flow(config, store=store)["rows"])  # nothing recomputed
    assert again["merge_cached"].all() and again["eval_cached"].all()
    assert again["arithmetic"].tolist() == table["arithmetic"].tolist()


def test_grid_selects_on_validation_and_reports_test(tiny_family: Path, tmp_path: Path) -> None:
    from dareflow.flows.experiments import grid_flow

    config = {"name": "g", "demo_family": _demo(tiny_family), "models": ["arithmetic", "reverse"],
              "merge_method": "dare_ties",
              "grid": {"lambda": [0.5, 1.0], "drop_rate": {"*": [0.5]}, "trim": [0.0, 0.5]},
              "evaluation": {"skills": ["arithmetic", "reverse"], "n": 8}}
    out = grid_flow(config, store=str(tmp_path / "store"))
    rows = out["rows"]
    assert [(r["lambda"], r["trim"]) for r in rows] == [(0.5, 0.0), (0.5, 0.5), (1.0, 0.0), (1.0, 0.5)]
    assert all(r["p[arithmetic]"] == r["p[reverse]"] == 0.5 for r in rows)
    best = max(r["validation_mean"] for r in rows)
    chosen = [r for r in rows if r["selected"]]
    assert len(chosen) == 1 and chosen[0] == out["selected"]
    assert chosen[0]["validation_mean"] == best
    assert chosen[0]["index"] == min(r["index"] for r in rows if r["validation_mean"] == best)
    assert Path(out["paths"]["plot"]).is_file()


def test_selection_ignores_the_test_split() -> None:
    rows = [{"index": 0, "validation_mean": 0.5, "test_mean": 0.9},
            {"index": 1, "validation_mean": 0.6, "test_mean": 0.1},
            {"index": 2, "validation_mean": 0.6, "test_mean": 0.2}]
    assert sweeps.select_on_validation(rows)["index"] == 1


def test_validation_and_test_splits_are_disjoint() -> None:
    for skill in ("arithmetic", "reverse"):
        val, test = split_items(skill, "validation"), split_items(skill, "test")
        assert len(val) == len(test) == 100 and not set(val) & set(test)
    with pytest.raises(ValueError, match="split must be 'validation' or 'test', got 'train'"):
        split_items("arithmetic", "train")


def test_similarity_flow(tiny_family: Path, tmp_path: Path) -> None:
    from dareflow.flows.experiments import similarity_flow

    config = {"name": "s", "demo_family": _demo(tiny_family), "finetuned": "arithmetic",
              "drop_rates": [0.5], "calibration_skills": ["arithmetic"], "calibration_n": 8}
    out = similarity_flow(config, store=str(tmp_path / "store"))
    table = pd.DataFrame(out["rows"])
    # tiny family: 1 decoder layer -> embeddings + 1 layer output (after the final norm)
    assert sorted(set(table["variant"])) == ["dare p=0.5", "drop_only p=0.5"]
    assert table.groupby("variant")["layer"].apply(list).tolist() == [[0, 1], [0, 1]]
    assert table["cosine"].between(-1, 1 + 1e-6).all()
    assert Path(out["paths"]["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_config_errors_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfinetuned: a\nevaluation: {skills: [arith]}\ndrop_rate: [1.0]\n")
    with pytest.raises(ProblemsError) as e:
        sweeps.load_config(bad, sweeps.SweepConfig)
    assert f"{bad}: 2 problems:" in str(e.value)
    assert "  - evaluation.skills: unknown skill(s) ['arith']; known: " in str(e.value)
    assert "  - drop_rate: unknown key (not a dareflow or mergekit option)" in str(e.value)


def test_shipped_experiment_configs_validate() -> None:
    root = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
    kinds = {"sweep": sweeps.SweepConfig, "grid": sweeps.GridConfig,
             "similarity": sweeps.SimilarityConfig}
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# dareflow "), path
        sweeps.load_config(path, kinds[first.split()[2]])


def test_merge_flow_gate_refuses_a_wrong_base(pico_family: dict, tmp_path: Path) -> None:
    from dareflow.flows.merge import run_merge
    from tests.flows.conftest import write_recipe

    wrong = _unrelated(pico_family["base"], tmp_path / "wrong")
    recipe = {"merge_method": "dare_linear", "base_model": str(wrong),
              "models": [{"model": str(pico_family["a"])}], "parameters": {"drop_rate": 0.9}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(ValueError, match=rf"DARE does not apply to '{pico_family['a']}' measured "
                                         rf"against base '{wrong}'"):
        run_merge(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # warn: merges anyway; the right base passes
    write_recipe(path, {**recipe, "gate": {"mode": "warn"}})
    assert run_merge(str(path), str(tmp_path / "out"))["out"] == str(tmp_path / "out")
    write_recipe(path, {**recipe, "base_model": str(pico_family["base"])})
    assert run_merge(str(path), str(tmp_path / "out2"))["out"] == str(tmp_path / "out2")


@pytest.mark.slow
def test_paper_findings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The paper's qualitative findings on the real demo family (built once, ~2 min;
    set DAREFLOW_DEMO_FAMILY_DIR to reuse a built one)."""
    from dareflow import delta_stats
    from dareflow.flows.experiments import sweep_flow

    root = os.environ.get("DAREFLOW_DEMO_FAMILY_DIR") or str(
        tmp_path_factory.mktemp("demo") / "family")
    store = str(tmp_path_factory.mktemp("store"))
    demo = {"dir": root, "size": "demo", "seed": 0, "wrong_base": True}
    common = {"demo_family": demo, "finetuned": "arithmetic", "drop_rates": [0.0, 0.5, 0.9, 0.99],
              "evaluation": {"skills": ["arithmetic"], "n": 100}}
    right = pd.DataFrame(sweep_flow({"name": "right", **common}, store=store)["rows"])
    print(right.to_string())
    wrong_out = sweep_flow({"name": "wrong", "base": "wrong-base", **common}, store=store)
    wrong = pd.DataFrame(wrong_out["rows"])
    print(wrong.to_string())

    def score(table, method, p):
        return float(table[(table.method == method) & (table.drop_rate == p)]["arithmetic"].iloc[0])

    assert score(right, "dare", 0.0) >= 0.9                      # the fine-tune has the skill
    # DARE keeps the skill at a high p where DropOnly has lost it
    assert score(right, "dare", 0.9) >= 0.8 and score(right, "drop_only", 0.9) <= 0.2
    # DARE beats magnitude pruning at high p
    assert score(right, "dare", 0.9) > score(right, "magnitude", 0.9) + 0.05
    assert score(right, "dare", 0.99) > score(right, "magnitude", 0.99)
    # against the wrong base: large deltas, the gate fails, DARE breaks the model
    gate = wrong_out["delta_stats"]["gate"]
    assert gate["passed"] is False and "continued pre-training" in gate["message"]
    assert gate["abs_p99"] > 0.03 or gate["relative_norm"] > 0.15  # either refuses
    assert score(wrong, "dare", 0.0) >= 0.9
    # (how far it falls depends on the masks: 0.02 and 0.12 of 100 items with two
    # generators, against >= 0.8 from the right base)
    assert score(wrong, "dare", 0.9) <= 0.25 < score(right, "dare", 0.9)
    stats = delta_stats.delta_stats(str(Path(root) / "base"), str(Path(root) / "arithmetic"))
    assert stats.overall.abs_p99 < 0.015 and stats.overall.relative_norm < 0.05
