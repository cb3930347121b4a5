"""dareflow.history: rows, append (local and s3), comparison, report and plot."""

import math

import pandas as pd
import pytest

from dareflow import history as h


def _table(values, stderr=0.01, status=None):
    """A tidy table: ``values`` is ``{(model, task): value}``."""
    rows = [{"model": m, "task": t, "metric": "acc", "value": v, "stderr": stderr,
             "protocol": "custom", "status": status or "ok"} for (m, t), v in values.items()]
    return pd.DataFrame(rows)


ROLES = {"merged": "merged", "base": "base", "ft": "source"}
FPS = {"merged": "fp-m", "base": "fp-b", "ft": "fp-f"}


def _night(run, values, date="2026-12-01", verdict=h.OK, stderr=0.01):
    return h.night_rows(_table(values, stderr), date=date, flow_run_id=run, suite="demo",
                        roles=ROLES, fingerprints=FPS, sources="a@r1;b@-", verdict=verdict)


def test_uris_and_pinned_sources():
    assert h.history_uri("s3://b/store", "demo-dare") == "s3://b/store/history/demo-dare.parquet"
    assert h.plot_uri("s3://b/store", "demo-dare") == "s3://b/store/history/demo-dare.png"
    assert h.pinned_sources({"b": None, "a": "r1"}) == "a@r1;b@-"
    with pytest.raises(ValueError, match="recipe name 'a/b' cannot name a history file"):
        h.history_uri("/s", "a/b")


def test_night_rows_columns_and_values():
    rows = _night("run1", {("merged", "t1"): 0.5, ("base", "t1"): 0.25, ("ft", "t1"): 0.75})
    assert list(rows.columns) == h.HISTORY_COLUMNS
    assert rows[["role", "model", "fingerprint", "value"]].values.tolist() == [
        ["merged", "merged", "fp-m", 0.5], ["base", "base", "fp-b", 0.25],
        ["source", "ft", "fp-f", 0.75]]
    assert set(rows["sources"]) == {"a@r1;b@-"} and set(rows["verdict"]) == {"ok"}


def test_night_rows_drops_failed_runs_and_checks_inputs():
    t = _table({("merged", "t1"): 0.5})
    t.loc[len(t)] = {"model": "merged", "task": "t2", "metric": "acc", "value": math.nan,
                     "stderr": math.nan, "protocol": "custom", "status": "failed"}
    rows = h.night_rows(t, date="d", flow_run_id="r", suite="s", roles=ROLES,
                        fingerprints=FPS, sources="")
    assert rows["task"].tolist() == ["t1"]
    with pytest.raises(ValueError, match=r"models \['merged'\] have no role or fingerprint"):
        h.night_rows(t, date="d", flow_run_id="r", suite="s", roles={}, fingerprints=FPS,
                     sources="")
    with pytest.raises(ValueError, match="unknown roles {'merged': 'boss'}"):
        h.night_rows(t, date="d", flow_run_id="r", suite="s", roles={"merged": "boss"},
                     fingerprints=FPS, sources="")
    with pytest.raises(ValueError, match="verdict 'meh' is not one of 'ok', 'regression'"):
        h.night_rows(t, date="d", flow_run_id="r", suite="s", roles=ROLES,
                     fingerprints=FPS, sources="", verdict="meh")


def test_compare_exact_threshold_and_missing_score():
    last = _night("r1", {("merged", "t1"): 0.50, ("merged", "t2"): 0.50,
                         ("merged", "t3"): 0.50}, stderr=0.03)
    # threshold = 2 * sqrt(0.03^2 + 0.04^2) = 0.1
    tonight = _night("r2", {("merged", "t1"): 0.41, ("merged", "t2"): 0.39}, stderr=0.04)
    cmp = h.compare_nights(tonight, h.last_ok_night(last))
    assert [(c["task"], c["regression"]) for c in cmp] == [
        ("t1", False), ("t2", True), ("t3", True)]
    assert cmp[0]["threshold"] == pytest.approx(0.1, abs=1e-12)
    assert cmp[1]["drop"] == pytest.approx(0.11, abs=1e-12)
    assert cmp[1]["reason"] == "dropped 0.1100 > 0.1000"
    assert cmp[2]["reason"] == "missing score" and math.isnan(cmp[2]["tonight"])
    assert h.is_regression(cmp)
    assert not h.is_regression(h.compare_nights(tonight, h.last_ok_night(tonight)))


def test_equal_scores_are_no_regression_and_gains_are_fine():
    last = _night("r1", {("merged", "t1"): 0.5}, stderr=0.0)
    assert not h.is_regression(h.compare_nights(_night("r2", {("merged", "t1"): 0.5},
                                                       stderr=0.0), last))
    assert not h.is_regression(h.compare_nights(_night("r2", {("merged", "t1"): 0.9}), last))


def test_last_ok_night_skips_regressions_and_the_current_run():
    hist = pd.concat([
        _night("r1", {("merged", "t1"): 0.6, ("base", "t1"): 0.1}),
        _night("r2", {("merged", "t1"): 0.2}, verdict=h.REGRESSION),
        _night("r3", {("merged", "t1"): 0.55}),
    ], ignore_index=True)
    assert h.last_ok_night(hist)["value"].tolist() == [0.55]
    assert h.last_ok_night(hist, exclude_run="r3")["value"].tolist() == [0.6]
    assert h.last_ok_night(hist.iloc[:0]).empty


def test_report_markdown_names_the_regressed_tasks():
    last = _night("r1", {("merged", "t1"): 0.5, ("merged", "t2"): 0.5}, stderr=0.0)
    tonight = _night("r2", {("merged", "t1"): 0.25, ("merged", "t2"): 0.5}, stderr=0.0)
    md = h.report_markdown("demo-dare", h.compare_nights(tonight, last), date="2026-12-02",
                           last_date="2026-12-01", plot="s3://b/history/demo-dare.png")
    assert md.splitlines()[:3] == [
        "# demo-dare: night of 2026-12-02", "",
        "**REGRESSION** vs 2026-12-01: t1 (acc: dropped 0.2500 > 0.0000)"]
    assert "| t1 | acc | 25.00 | 50.00 | 25.00 | 0.00 | REGRESSION |" in md
    assert "| t2 | acc | 50.00 | 50.00 | 0.00 | 0.00 |  |" in md
    assert "Score history plot: `s3://b/history/demo-dare.png`" in md
    first = h.report_markdown("demo-dare", [], date="2026-12-01", last_date=None)
    assert "First night: nothing to compare with." in first


def _append_twice(uri):
    one = _night("r1", {("merged", "t1"): 0.5, ("base", "t1"): 0.25})
    two = _night("r2", {("merged", "t1"): 0.5, ("base", "t1"): 0.25}, date="2026-12-02")
    assert h.read_history(uri).empty
    h.append_history(uri, one)
    table = h.append_history(uri, two)
    again = h.read_history(uri)
    assert again["flow_run_id"].tolist() == ["r1", "r1", "r2", "r2"]
    assert again["date"].tolist() == ["2026-12-01"] * 2 + ["2026-12-02"] * 2
    pd.testing.assert_frame_equal(table, again)
    # a retried night replaces its own rows, earlier nights stay
    h.append_history(uri, h.with_verdict(two, h.REGRESSION))
    assert h.read_history(uri)["verdict"].tolist() == ["ok", "ok", "regression", "regression"]
    return again


def test_append_history_local(tmp_path):
    uri = h.history_uri(str(tmp_path), "demo")
    _append_twice(uri)
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == ["demo.parquet"]


def test_append_history_and_plot_on_s3(s3_bucket):
    """Credentials from the environment (AWS_* pointing at the loopback server)."""
    store = f"{s3_bucket.uri}/store"
    uri = h.history_uri(store, "demo")
    hist = _append_twice(uri)
    png = h.write_plot(h.plot_uri(store, "demo"), hist, "demo")
    from dareflow.io import storage

    data = storage.read_bytes(png)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(storage.listdir(f"{store}/history")) == ["demo.parquet", "demo.png"]
