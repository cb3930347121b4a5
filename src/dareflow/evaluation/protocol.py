"""The Open LLM Leaderboard v1 protocol as data, and how a run's protocol differs from it.

Where each setting comes from:

- [about] the leaderboard's "About" page (archived at
  huggingface.co/docs/leaderboards/en/open_llm_leaderboard/archive): the six benchmarks,
  their shots (ARC 25, HellaSwag 10, MMLU 5, TruthfulQA 0, WinoGrande 5, GSM8K 5) and
  metrics (ARC and HellaSwag acc_norm, MMLU acc averaged over its 57 subjects, TruthfulQA
  mc2, WinoGrande acc, GSM8K exact match); runs with lm-eval's ``hf-causal-experimental``
  model at the harness commit the page names (lm-eval 0.3 era), batch size 1.
- [yaml] lm-eval 0.4.13's builtin task YAMLs (``lm_eval/tasks/arc/arc_easy.yaml``,
  ``hellaswag/hellaswag.yaml``, ``mmlu/default/_default_template_yaml``,
  ``truthfulqa/truthfulqa_mc1.yaml``, ``winogrande/default.yaml``, ``gsm8k/gsm8k.yaml``):
  datasets, split roles (the evaluated split is ``test_split`` if set, else
  ``validation_split``; shots come from ``fewshot_split`` if set, else ``training_split``),
  prompts, GSM8K's ``strict-match`` filter (``#### N``, what v1's harness scored).
- [0.3] lm-eval 0.3's ``HuggingFaceAutoLM.add_special_tokens``: False for causal LMs, so v1
  never added a BOS token. lm-eval 0.4.13's hf and vllm backends add what the tokenizer adds by
  default (Llama and Mistral tokenizers add BOS) unless ``add_bos_token`` is set
  (``lm_eval/models/huggingface.py`` ``tok_encode``/``tok_batch_encode``,
  ``vllm_causallms.py``); ``configs/suites/openllm_v1.yaml`` pins ``add_bos_token: false``.

A run's protocol label (the ``protocol`` column of the tidy table):

- ``v1``: the leaderboard's settings, data and document count;
- ``v1-offline: <deviations>``: the offline mirror where its data differs
  (``MirrorTask.deviations``), or a limit;
- ``v1-modified: <deviations>``: an online run with other settings (shots, metric, BOS) or a
  limit;
- ``custom``: not one of the six v1 benchmarks (a JSONL task, another lm-eval task).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dareflow.evaluation.mirror import MIRROR_TASKS

V1, OFFLINE, MODIFIED, CUSTOM = "v1", "v1-offline", "v1-modified", "custom"
#: Where the settings come from (for docs and the comparison footnote).
ABOUT_URL = "https://huggingface.co/docs/leaderboards/en/open_llm_leaderboard/archive"


@dataclass(frozen=True)
class V1Task:
    """One benchmark as the leaderboard ran it (lm-eval's builtin task on the Hub data).

    Attributes:
        name: lm-eval's task or group name.
        shots: few-shot examples [about].
        metric: the score that enters the average, as dareflow names it [about].
        eval_split: the split evaluated [yaml].
        eval_docs: its documents (MMLU: over the 57 subjects).
        fewshot_split: the split shots are drawn from (None: 0-shot) [yaml].
        fewshot_docs: that split's size.
        sampler: ``random`` (seeded by lm-eval) or ``first_n`` (MMLU: the first 5 dev rows).
        dataset: the Hub dataset lm-eval reads [yaml].
    """

    name: str
    shots: int
    metric: str
    eval_split: str
    eval_docs: int
    fewshot_split: str | None
    fewshot_docs: int | None
    sampler: str | None
    dataset: str


V1_TASKS: dict[str, V1Task] = {t.name: t for t in (
    V1Task("arc_challenge", 25, "acc_norm", "test", 1172, "train", 1119, "random",
           "allenai/ai2_arc ARC-Challenge"),
    V1Task("hellaswag", 10, "acc_norm", "validation", 10042, "train", 39905, "random",
           "Rowan/hellaswag"),
    V1Task("mmlu", 5, "acc_macro", "test", 14042, "dev", 285, "first_n", "cais/mmlu"),
    V1Task("truthfulqa_mc2", 0, "acc", "validation", 817, None, None, None,
           "truthfulqa/truthful_qa multiple_choice"),
    V1Task("winogrande", 5, "acc", "validation", 1267, "train", 40398, "random",
           "allenai/winogrande winogrande_xl"),
    V1Task("gsm8k", 5, "exact_match,strict-match", "test", 1319, "train", 7473, "random",
           "openai/gsm8k main"),
)}


def _bos(model_args: Mapping[str, Any]) -> str | None:
    value = model_args.get("add_bos_token")
    if value is False or (isinstance(value, str) and value.lower() == "false"):
        return None
    if value is None:
        return "BOS as the tokenizer adds it (v1: none)"
    return "BOS added (v1: none)"


def run_protocol(meta: Mapping[str, Any], *, n: float,
                 model_args: Mapping[str, Any] | None = None) -> str:
    """The protocol label of one run (see the module docstring).

    Args:
        meta: the ``dareflow`` block of a run's raw result (``entry``, ``mirror``, ``limit``).
        n: documents scored (MMLU: over all subjects); NaN if unknown.
        model_args: the lm-eval model arguments the run used (default: the entry's).

    Returns:
        ``v1``, ``v1-offline: ...``, ``v1-modified: ...`` or ``custom``.
    """
    entry = meta.get("entry") or {}
    task = entry.get("task")
    if entry.get("data") is not None or task not in V1_TASKS:
        return CUSTOM
    v1 = V1_TASKS[task]
    mirror = bool(meta.get("mirror"))
    args = (entry.get("model_args") or {}) if model_args is None else model_args
    found = []
    if entry.get("shots") != v1.shots:
        found.append(f"{entry.get('shots')}-shot (v1: {v1.shots})")
    if entry.get("metric") != v1.metric:
        found.append(f"metric {entry.get('metric')} (v1: {v1.metric})")
    bos = _bos(args)
    if bos:
        found.append(bos)
    expected = v1.eval_docs
    if mirror:
        found += MIRROR_TASKS[task].deviations
        expected = MIRROR_TASKS[task].eval_rows
    limit = meta.get("limit")
    if math.isnan(n):  # the count is unknown: a limit is still a deviation
        found += [f"limit {limit}"] if limit else []
    elif n < expected:
        found.append(f"{n:.0f} of {expected} docs" + (f" (limit {limit})" if limit else ""))
    if not found:
        return V1
    return f"{OFFLINE if mirror else MODIFIED}: " + "; ".join(found)


def is_v1(label: object) -> bool:
    """Whether a protocol label is exactly the leaderboard's."""
    return label == V1
