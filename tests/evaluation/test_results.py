"""Results tables on known numbers: v1 average, MMLU macro/micro, tidy shape, comparison, and
the protocol column and notes that say where a run is not the leaderboard's protocol."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dareflow.evaluation.report import results_table
from dareflow.evaluation.results import (
    COLUMNS,
    OPENLLM_V1_METRICS,
    comparison,
    comparison_markdown,
    comparison_table,
    leaderboard_average,
    mmlu_macro_micro,
    tidy_results,
)
from dareflow.evaluation.suite import load_suite

V1_SUITE = load_suite("openllm_v1")


def _entry(name: str) -> dict:
    return V1_SUITE.task(name).model_dump(mode="json")


def _tidy(model: str, scores: dict[tuple[str, str], float],
          protocol: str | None = None) -> pd.DataFrame:
    return pd.DataFrame([
        {"model": model, "task": t, "metric": m, "value": v, "stderr": 0.0, "n": 1.0,
         "shots": 0.0, "revision": None, "lm_eval_version": "0.4.13", "protocol": protocol}
        for (t, m), v in scores.items()], columns=COLUMNS)


# Open LLM Leaderboard v1, meta-llama/Llama-2-7b-hf: ARC 53.07, HellaSwag 78.59, MMLU 46.87,
# TruthfulQA 38.76, Winogrande 74.03, GSM8K 14.48 -> average 50.97 as published.
LLAMA2_7B = {("arc_challenge", "acc_norm"): 0.5307, ("hellaswag", "acc_norm"): 0.7859,
             ("mmlu", "acc_macro"): 0.4687, ("mmlu", "acc_micro"): 0.4580,
             ("truthfulqa_mc2", "acc"): 0.3876, ("winogrande", "acc"): 0.7403,
             ("gsm8k", "exact_match,strict-match"): 0.1448,
             ("gsm8k", "exact_match,flexible-extract"): 0.1600,
             ("arc_challenge", "acc"): 0.49}


def test_v1_average_on_published_numbers() -> None:
    avg = leaderboard_average(_tidy("llama-2-7b", LLAMA2_7B))
    assert round(avg["llama-2-7b"] * 100, 2) == 50.97
    # exactly the mean of the six designated metrics; the others do not enter
    six = [0.5307, 0.7859, 0.4687, 0.3876, 0.7403, 0.1448]
    assert avg["llama-2-7b"] == pd.Series(six).mean()


def test_v1_average_exact_on_dyadic_numbers() -> None:
    scores = {("arc_challenge", "acc_norm"): 0.5, ("hellaswag", "acc_norm"): 0.75,
              ("mmlu", "acc_macro"): 0.25, ("truthfulqa_mc2", "acc"): 0.625,
              ("winogrande", "acc"): 0.875, ("gsm8k", "exact_match,strict-match"): 0.0,
              ("gsm8k", "exact_match,flexible-extract"): 1.0}
    # (0.5 + 0.75 + 0.25 + 0.625 + 0.875 + 0) / 6 = 3 / 6
    assert leaderboard_average(_tidy("m", scores))["m"] == 0.5


def test_v1_average_is_nan_when_a_task_is_missing() -> None:
    scores = dict(LLAMA2_7B)
    del scores[("gsm8k", "exact_match,strict-match")]
    assert math.isnan(leaderboard_average(_tidy("m", scores))["m"])


def test_mmlu_macro_micro_exact() -> None:
    values = {"a": 0.5, "b": 1.0, "c": 0.25}
    n = {"a": 10, "b": 30, "c": 60}
    out = mmlu_macro_micro(values, n, {"a": 0.3, "b": 0.0, "c": 0.4})
    assert out["macro"] == 1.75 / 3  # unweighted over subjects (v1)
    assert out["micro"] == 0.5  # (5 + 30 + 15) / 100, weighted by size (lm-eval's group)
    assert out["macro_stderr"] == pytest.approx(math.sqrt(0.09 + 0.16) / 3, abs=1e-15)
    assert out["micro_stderr"] == pytest.approx(math.sqrt(9 + 576) / 100, abs=1e-15)
    assert (out["n"], out["subjects"]) == (100, 3)


def test_mmlu_macro_micro_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same subjects"):
        mmlu_macro_micro({"a": 1.0}, {"b": 3})
    with pytest.raises(ValueError, match="positive"):
        mmlu_macro_micro({"a": 1.0}, {"a": 0})
    with pytest.raises(ValueError, match="at least one"):
        mmlu_macro_micro({}, {})


def _raw_mmlu() -> dict:
    """lm-eval's results layout for a group of two subjects in one category."""
    return {
        "results": {
            "dareflow_mmlu_x": {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1},
            "dareflow_mmlu_y": {"alias": "y", "acc,none": 1.0, "acc_stderr,none": "N/A"},
            "dareflow_mmlu_stem": {"alias": "stem", "acc,none": 0.875, "acc_stderr,none": 0.05},
            "dareflow_mmlu": {"alias": "mmlu", "acc,none": 0.875, "acc_stderr,none": 0.05},
        },
        "group_subtasks": {"dareflow_mmlu": ["dareflow_mmlu_stem"],
                           "dareflow_mmlu_stem": ["dareflow_mmlu_x", "dareflow_mmlu_y"]},
        "n-samples": {"dareflow_mmlu_x": {"original": 10, "effective": 2},
                      "dareflow_mmlu_y": {"original": 10, "effective": 6}},
        "n-shot": {"dareflow_mmlu_x": 5, "dareflow_mmlu_y": 5},
        "lm_eval_version": "0.4.13",
        "dareflow": {"task_name": "dareflow_mmlu", "revision": "abc", "mirror": True,
                     "limit": None, "entry": _entry("mmlu")},
    }


def _raw_gsm8k() -> dict:
    return {
        "results": {"gsm8k": {
            "alias": "gsm8k", "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": 0.2, "exact_match,flexible-extract": 0.5,
            "exact_match_stderr,flexible-extract": 0.25}},
        "group_subtasks": {},
        "n-samples": {"gsm8k": {"original": 1319, "effective": 4}},
        "n-shot": {"gsm8k": 5},
        "lm_eval_version": "0.4.13",
        "config": {"model_args": {"pretrained": "/m", "add_bos_token": False}},
        "dareflow": {"task_name": "gsm8k", "revision": None, "mirror": False, "limit": 4,
                     "entry": _entry("gsm8k")},
    }


def test_tidy_results_layout_and_group_aggregates() -> None:
    df = tidy_results({"merged": [_raw_mmlu(), _raw_gsm8k()], "src": {"gsm8k": _raw_gsm8k()}})
    assert list(df.columns) == COLUMNS
    rows = {(r.model, r.task, r.metric): r for r in df.itertuples()}
    macro = rows[("merged", "mmlu", "acc_macro")]
    micro = rows[("merged", "mmlu", "acc_micro")]
    assert macro.value == 0.75 and micro.value == (0.5 * 2 + 1.0 * 6) / 8
    assert (macro.n, macro.shots, macro.revision, macro.lm_eval_version) == (8, 5, "abc",
                                                                            "0.4.13")
    assert math.isnan(macro.stderr)  # one subject had no stderr
    assert rows[("merged", "mmlu_x", "acc")].value == 0.5
    assert math.isnan(rows[("merged", "mmlu_y", "acc")].stderr)
    assert rows[("merged", "mmlu_stem", "acc")].n == 8
    assert ("merged", "mmlu", "acc") not in rows  # lm-eval's group number is acc_micro
    strict = rows[("src", "gsm8k", "exact_match,strict-match")]
    assert (strict.value, strict.stderr, strict.n, strict.shots) == (0.25, 0.2, 4, 5)
    assert ("src", "gsm8k", "exact_match,flexible-extract") in rows
    assert len(df) == 5 + 2 + 2
    assert df["value"].between(0, 1).all()
    # every row of a run carries its protocol: here a mirror run and a limited online run
    assert set(df[df.task.str.startswith("mmlu")].protocol) == {
        "v1-offline: 8 of 14042 docs"}
    assert set(df[df.task == "gsm8k"].protocol) == {"v1-modified: 4 of 1319 docs (limit 4)"}
    full = _raw_gsm8k()
    full["n-samples"]["gsm8k"]["effective"] = 1319
    assert set(tidy_results({"m": [full]}).protocol) == {"v1"}
    assert tidy_results({"m": [{k: v for k, v in full.items() if k != "dareflow"}]}
                        ).protocol.isna().all()  # a plain lm-eval result: unknown


def test_tidy_results_rejects_duplicates_and_foreign_dicts() -> None:
    with pytest.raises(ValueError, match="more than once"):
        tidy_results({"m": [_raw_gsm8k(), _raw_gsm8k()]})
    with pytest.raises(ValueError, match="no 'results' key"):
        tidy_results({"m": [{"acc": 1}]})


def _three_models() -> pd.DataFrame:
    merged = dict(LLAMA2_7B)
    src_a = {k: v - 0.01 for k, v in LLAMA2_7B.items()}
    src_b = {k: v + (0.05 if k[0] == "gsm8k" else -0.02) for k, v in LLAMA2_7B.items()}
    return pd.concat([_tidy("merged", merged), _tidy("math", src_b), _tidy("chat", src_a)])


def test_comparison_table_rows_columns_and_average() -> None:
    table = comparison_table(_three_models(), merged="merged", sources=["chat", "math"])
    assert list(table.index) == ["merged", "chat", "math"]
    assert list(table.columns) == [*OPENLLM_V1_METRICS, "average"]
    assert table.loc["merged", "mmlu"] == 0.4687  # macro, not micro
    assert table.loc["math", "gsm8k"] == 0.1448 + 0.05  # strict, not flexible
    assert table.loc["merged", "average"] == leaderboard_average(_three_models())["merged"]
    with pytest.raises(KeyError, match="no results for model"):
        comparison_table(_three_models(), merged="merged", sources=["code"])
    skills = comparison_table(_three_models(), merged="merged", sources=[],
                              metrics={"gsm8k": "exact_match,strict-match"}, average=False)
    assert list(skills.columns) == ["gsm8k"]


def test_markdown_marks_the_best_per_column() -> None:
    table = comparison_table(_three_models(), merged="merged", sources=["chat", "math"])
    table.loc["chat", "winogrande"] = table.loc["merged", "winogrande"]  # a tie: both bold
    table.loc["chat", "hellaswag"] = float("nan")
    md = comparison_markdown(table).splitlines()
    assert md[0] == ("| model | arc_challenge | hellaswag | mmlu | truthfulqa_mc2 | winogrande "
                     "| gsm8k | average |")
    merged, chat, math_row = md[2], md[3], md[4]
    assert merged.startswith("| merged | **53.07** | **78.59** | **46.87** |")
    assert "| **74.03** |" in merged and "| **74.03** |" in chat
    assert "| – |" in chat
    assert "**19.48**" in math_row  # gsm8k best


ARC_OFFLINE = "v1-offline: shots from validation (299), not train (1,119)"


def test_markdown_names_each_deviating_task_and_flags_the_average() -> None:
    table = comparison_table(_three_models(), merged="merged", sources=["chat", "math"])
    protocols = {t: "v1" for t in OPENLLM_V1_METRICS}
    protocols["arc_challenge"] = ARC_OFFLINE
    protocols["truthfulqa_mc2"] = "v1-offline: BIG-bench's 299 of the 817 questions"
    md = comparison_markdown(table, protocols=protocols).splitlines()
    assert md[0].endswith("| gsm8k | average |")  # the header keeps the column names
    assert md[2].endswith("| **50.97**† |") and md[4].endswith("| 50.13† |")
    assert md[5:] == [
        "",
        ("Protocol: Open LLM Leaderboard v1 for hellaswag, mmlu, winogrande, gsm8k; not the "
         "leaderboard's for:"),
        f"- arc_challenge: {ARC_OFFLINE}",
        "- truthfulqa_mc2: v1-offline: BIG-bench's 299 of the 817 questions",
        ("† the average is not comparable with the leaderboard's: 2 of 6 tasks differ from "
         "its protocol."),
    ]
    same = comparison_markdown(table, protocols=dict.fromkeys(OPENLLM_V1_METRICS, "v1"))
    assert "†" not in same
    assert same.splitlines()[-1] == ("Protocol: Open LLM Leaderboard v1 for every task "
                                     "(arc_challenge, hellaswag, mmlu, truthfulqa_mc2, "
                                     "winogrande, gsm8k).")
    assert comparison_markdown(table).splitlines()[-1].startswith("| math |")  # nothing known


def test_comparison_carries_the_protocols_of_the_runs_into_the_markdown() -> None:
    tidy = pd.concat([_tidy("merged", LLAMA2_7B, "v1"), _tidy("chat", LLAMA2_7B, "v1")],
                     ignore_index=True)
    tidy.loc[tidy.task == "arc_challenge", "protocol"] = ARC_OFFLINE
    tidy["status"], tidy["error"] = "ok", ""
    wide, failed = comparison(tidy, V1_SUITE, "merged", ["chat"])
    assert wide.attrs["protocol"]["arc_challenge"] == ARC_OFFLINE
    assert wide.attrs["protocol"]["mmlu"] == "v1"
    md = comparison_markdown(wide, failed)
    assert f"- arc_challenge: {ARC_OFFLINE}" in md.splitlines()
    assert md.splitlines()[2].endswith("| **50.97**† |") and "1 of 6 tasks" in md


def test_failed_runs_have_no_protocol() -> None:
    failed = {"label": "m", "task": "gsm8k", "revision": "r", "status": "failed",
              "error": "boom"}
    table, raws = results_table([failed], {"gsm8k": _entry("gsm8k")})
    assert raws == {} and list(table.status) == ["failed"]
    assert table.protocol.isna().all()
