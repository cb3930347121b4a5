"""The nightly flow in one process, on the tiny demo family and the demo suite: history,
nothing recomputed when nothing changed, a regression ends the run Failed with the artifact.
The same on workers of two pools, with an S3 store and code from git: test_e2e.py."""


import pandas as pd
import pytest
import yaml

from dareflow import history
from dareflow.demo.family import build_demo_family
from dareflow.flows.demo import demo_recipes
from dareflow.flows.nightly import nightly_flow


@pytest.mark.slow  # ~80 s: the first night runs 8 lm-eval processes
def test_three_nights(tmp_path):
    from prefect.artifacts import Artifact

    build_demo_family(tmp_path / "family", size="tiny", threads=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(demo_recipes(tmp_path)["dare"]))
    store = str(tmp_path / "store")
    kw = {"recipe": str(recipe), "store": store, "suite": "demo_skills", "limit": 4,
          "device": "cpu", "return_state": True}

    first = nightly_flow(**kw)
    one = first.result()
    assert first.is_completed()
    assert (one["units_merged"], one["units_reused"]) == (3, 0)
    assert (one["results_computed"], one["results_cached"]) == (8, 0)
    uri = history.history_uri(store, "dareflow-demo-dare")
    assert one["history"] == uri and one["plot"] == history.plot_uri(store, "dareflow-demo-dare")
    table = history.read_history(uri)
    assert len(table) == 8 and list(table.columns) == history.HISTORY_COLUMNS
    assert sorted(set(zip(table["role"], table["model"]))) == [
        ("base", "base"), ("merged", "merged"), ("source", "arithmetic"),
        ("source", "reverse")]
    assert set(table["task"]) == {"arithmetic", "reverse"}
    assert set(table["suite"]) == {"demo_skills"} and set(table["verdict"]) == {"ok"}
    assert all(fp.startswith("sha256:") for fp in table["fingerprint"])

    second = nightly_flow(**kw)
    two = second.result()
    assert second.is_completed()
    assert second.message.startswith("Nothing changed, nothing recomputed.")
    assert (one["units_merged"], two["units_merged"], two["units_reused"]) == (3, 0, 3)
    assert (two["results_computed"], two["results_cached"]) == (0, 8)
    table = history.read_history(uri)
    assert len(table) == 16 and table["flow_run_id"].nunique() == 2
    assert not two["regression"] and [c["regression"] for c in two["comparison"]] == [False] * 2
    # the same model tonight as last night: same fingerprints, same scores
    a, b = (g.reset_index(drop=True) for _, g in table.groupby("flow_run_id", sort=False))
    pd.testing.assert_series_equal(a["value"], b["value"])
    assert a["fingerprint"].tolist() == b["fingerprint"].tolist()

    # a better last night than the tiny family can reach (the tiny merge scores 0): tonight's
    # same merge is a regression of 0.5 > 2 * sqrt(0.1^2 + se^2) on both tasks
    better = history.last_ok_night(table).assign(flow_run_id="seeded", value=0.5, stderr=0.1)
    history.append_history(uri, better)
    third = nightly_flow(**kw)
    three = third.result(raise_on_failure=False)
    assert third.is_failed()
    assert third.message.startswith("regression on arithmetic, reverse vs ")
    assert three["regression"] and [c["reason"] for c in three["comparison"]] == [
        "dropped 0.5000 > 0.2000", "dropped 0.5000 > 0.2000"]
    table = history.read_history(uri)
    assert table["verdict"].tolist()[-8:] == ["regression"] * 8
    artifact = Artifact.get("dareflow-nightly-dareflow-demo-dare")
    assert "**REGRESSION** vs " in artifact.data and "| arithmetic | exact_match,strip" in (
        artifact.data)
    assert history.plot_uri(store, "dareflow-demo-dare") in artifact.data
    assert (tmp_path / "store" / "history" / "dareflow-demo-dare.png").read_bytes()[:4] == (
        b"\x89PNG")
