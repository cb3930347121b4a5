"""Real child processes: a hung benchmark is killed at its timeout with a clear failure, and a
child runs pinned to its slot's GPUs (``CUDA_VISIBLE_DEVICES`` in its environment)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dareflow.evaluation.child import EvaluationError
from dareflow.evaluation.runs import CPU_RUN, evaluate_benchmark, result_uri
from dareflow.evaluation.suite import load_suite

WINOGRANDE = load_suite("openllm_v1").task("winogrande").model_dump(mode="json")


def test_a_hung_child_is_killed_after_its_timeout(tiny_lm_dir: Path, mirror_dir: Path,
                                                  tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAREFLOW_FAULT", "eval-winogrande:sleep:600")
    model = {"label": "m", "model_dir": str(tiny_lm_dir), "revision": "r"}
    started = time.monotonic()
    with pytest.raises(EvaluationError) as e:
        evaluate_benchmark(model, WINOGRANDE, store=str(tmp_path), limit=2, backend="hf",
                           mirror_dir=str(mirror_dir), run={**CPU_RUN, "timeout_s": 5})
    elapsed = time.monotonic() - started
    assert str(e.value) == "m/winogrande: killed after 5 s (timeout)"
    assert e.value.transient is False  # would take as long again: reported, not retried
    assert 5 <= elapsed < 30
    assert not list(tmp_path.rglob("*.json"))  # nothing committed


def test_a_child_runs_pinned_to_its_slot(tiny_lm_dir: Path, mirror_dir: Path,
                                         tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    model = {"label": "m", "model_dir": str(tiny_lm_dir), "revision": "r"}
    # a CPU run given a slot (as a GPU run would be): hf on the CPU ignores the variable
    run = {**CPU_RUN, "slots": [["3", "5"]]}
    out = evaluate_benchmark(model, WINOGRANDE, store=str(tmp_path), limit=2, backend="hf",
                             mirror_dir=str(mirror_dir), run=run)
    assert out["launched"] is True and out["gpus"] == ["3", "5"]
    raw = json.loads(Path(result_uri(str(tmp_path), out["key"])).read_text())
    assert raw["dareflow"]["cuda_visible_devices"] == "3,5"
    assert raw["dareflow"]["gpus"] == ["3", "5"]
    # the v1 entry pins add_bos_token: false (the v1 harness added no BOS)
    assert raw["dareflow"]["model_args"] == {"add_bos_token": False, "dtype": "float32",
                                             "trust_remote_code": False}
    assert raw["dareflow"]["batch_size"] == 1
    assert set(raw["dareflow"]["versions"]) == {"lm_eval", "transformers", "torch", "datasets"}
