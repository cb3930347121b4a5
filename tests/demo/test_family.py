"""The offline demo family: real HF folders, deterministic bytes, cache reuse, SFT-sized deltas."""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from dareflow.demo.family import (
    BUILD_VERSION,
    MANIFEST,
    build_demo_family,
    delta_stats,
    load_family,
)
from dareflow.demo.skills import SKILLS
from dareflow.demo.train import SIZES, continue_pretraining, corpus_line, replay_line
from dareflow.demo.vocab import BOS_ID, make_tokenizer

NAMES = ["base", "arithmetic", "reverse"]
# One thread: polite on the shared 2-core machine (and bytes are compared within a count).
build_tiny = functools.partial(build_demo_family, size="tiny", threads=1)
SFT_BOUND = 0.005  # DESIGN.md: SFT deltas are mostly within 0.002-0.005


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("family") / "tiny"
    messages: list[str] = []
    paths = build_tiny(out, seed=0, progress=messages.append)
    return out, paths, messages


def _bytes(paths):
    return {k: (p / "model.safetensors").read_bytes() for k, p in paths.items()}


def test_returns_one_folder_per_model(tiny):
    out, paths, messages = tiny
    assert list(paths) == NAMES
    assert all(p == out / name for name, p in paths.items())
    assert any("pretrain base" in m for m in messages)
    assert any("fine-tune arithmetic" in m for m in messages)
    assert messages[-1].startswith("demo family ready")


def test_folders_load_with_auto_classes(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, paths, _ = tiny
    for path in paths.values():
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (path / name).is_file(), name
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == (
            "PreTrainedTokenizerFast"
        )
        ids = tok("Q: 23+58= A: ")["input_ids"]
        assert ids[0] == BOS_ID and len(ids) == 1 + len("Q: 23+58= A: ")
        assert tok.decode(ids, skip_special_tokens=True) == "Q: 23+58= A: "
        assert tok.pad_token_id is not None and len(tok) == model.config.vocab_size
        logits = model(**tok(["Q: 1+1= A: ", "x"], return_tensors="pt", padding=True)).logits
        assert logits.shape[0] == 2 and logits.shape[-1] == model.config.vocab_size


def test_tokenizer_round_trips_text():
    tok = make_tokenizer()
    text = "Q: reverse abcd A: dcba\n23+58=81 (ok)!"
    ids = tok(text)["input_ids"]
    assert len(ids) == 1 + len(text)
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    _, paths, _ = tiny
    again = build_tiny(tmp_path / "again", seed=0)
    assert _bytes(again) == _bytes(paths)
    other = build_tiny(tmp_path / "other", seed=1)
    assert all(_bytes(other)[k] != _bytes(paths)[k] for k in NAMES)


@pytest.mark.slow  # ~1 s on an idle machine, 20 s+ when the 2 cores are busy
def test_two_threads_is_deterministic_too(tmp_path):
    before = torch.get_num_threads()
    first = build_demo_family(tmp_path / "a", seed=0, size="tiny", threads=2)
    second = build_demo_family(tmp_path / "b", seed=0, size="tiny", threads=2)
    assert _bytes(first) == _bytes(second)
    assert torch.get_num_threads() == before  # the build restores the caller's setting


def test_global_rng_untouched(tmp_path):
    before = torch.random.get_rng_state()
    py_before = random.getstate()
    build_tiny(tmp_path / "fam", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert random.getstate() == py_before


def test_manifest(tiny):
    out, _, _ = tiny
    manifest = load_family(out)
    assert manifest is not None
    assert manifest["build_version"] == BUILD_VERSION and manifest["seed"] == 0
    assert manifest["skills"] == ["arithmetic", "reverse"]
    assert set(manifest["delta_stats"]) == {"arithmetic", "reverse"}
    assert {f.split("/")[0] for f in manifest["files"]} == set(NAMES)


def test_cache_reuses_without_retraining(tiny):
    out, paths, _ = tiny
    files = [p / "model.safetensors" for p in paths.values()] + [out / MANIFEST]
    stamps = [f.stat().st_mtime_ns for f in files]
    messages: list[str] = []
    assert build_tiny(out, seed=0, progress=messages.append) == paths
    assert len(messages) == 1 and messages[0].startswith("reusing")
    # The thread count is recorded but is no cache key (same bytes here for 1 and 2).
    build_demo_family(out, seed=0, size="tiny", threads=2, progress=messages.append)
    assert messages[-1].startswith("reusing")
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_cache_misses_rebuild(tmp_path):
    out = tmp_path / "fam"
    build_tiny(out, seed=0)
    first = _bytes({n: out / n for n in NAMES})

    # A different seed rebuilds in place.
    log: list[str] = []
    build_tiny(out, seed=1, progress=log.append)
    assert not log[0].startswith("reusing") and load_family(out)["seed"] == 1

    # A corrupted file fails the manifest's sha256 and is rebuilt.
    build_tiny(out, seed=0)
    weights = out / "reverse" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert load_family(out) is None
    log.clear()
    build_tiny(out, seed=0, progress=log.append)
    assert not log[0].startswith("reusing")
    assert _bytes({n: out / n for n in NAMES}) == first

    # force=True always rebuilds (to the same bytes).
    log.clear()
    build_tiny(out, seed=0, progress=log.append, force=True)
    assert not log[0].startswith("reusing")


def test_deltas_are_sft_sized_and_homologous(tiny):
    out, paths, _ = tiny
    base = load_file(paths["base"] / "model.safetensors")
    manifest = load_family(out)
    for skill in ("arithmetic", "reverse"):
        tuned = load_file(paths[skill] / "model.safetensors")
        assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in base.items()}
        stats = delta_stats(base, tuned)
        assert 0 < stats["max_abs"] <= SFT_BOUND
        assert stats == pytest.approx(manifest["delta_stats"][skill])
        # No weight decay in SFT: rows of characters never seen keep delta == 0 exactly.
        assert stats["zero_fraction"] > 0


def test_continue_pretraining_is_deterministic_and_moves_far(tiny):
    from transformers import AutoModelForCausalLM

    _, paths, _ = tiny
    base = load_file(paths["base"] / "model.safetensors")
    runs = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(paths["base"])
        losses = continue_pretraining(
            model, steps=6, lr=3e-3, seed="0/wrong-base", size="tiny", qa_fraction=0.0
        )
        assert len(losses) == 6
        runs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert delta_stats(base, runs[0])["max_abs"] > SFT_BOUND  # not an SFT-sized delta
    with pytest.raises(ValueError, match="steps=0"):
        continue_pretraining(model, steps=0, lr=1e-3, seed=0, size="tiny")


def test_corpus_never_contains_eval_items():
    cfg = SIZES["demo"]
    skills = list(SKILLS.values())
    evals = {s.prompt(x) for s in skills for x in s.eval_items}
    evals |= {s.raw(x) for s in skills for x in s.eval_items}
    rng = random.Random(0)
    lines = [corpus_line(rng, cfg, skills) for _ in range(3000)]
    lines += [replay_line(rng, cfg, skills, SKILLS["reverse"]) for _ in range(500)]
    for line in lines:
        assert line not in evals
        assert not any(line.startswith(p) for p in evals if p.startswith("Q:"))
    # Both formats and both refusals are there; replay skips the skill's own questions.
    assert any(line.endswith("A: ?") for line in lines)
    assert any(line.endswith("A: ...") for line in lines)
    assert not any(line.startswith("Q: reverse") for line in lines[3000:])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown family size 'huge'"):
        build_demo_family(tmp_path, size="huge")
    with pytest.raises(KeyError, match="unknown skill"):
        build_demo_family(tmp_path, size="tiny", skills=("arithmetic", "sorting"))
    with pytest.raises(ValueError, match="must be distinct"):
        build_demo_family(tmp_path, size="tiny", skills=("reverse", "reverse"))
    assert not (tmp_path / MANIFEST).exists()


@pytest.mark.slow
def test_demo_family_merges_keep_both_skills(tmp_path):
    """The property the demo rests on (a demo-size build: about 1.5-3 min on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dareflow.demo.skills import evaluate_skills

    paths = build_demo_family(tmp_path / "demo", seed=0)
    scores = {name: evaluate_skills(p, n=200) for name, p in paths.items()}
    assert scores["base"]["arithmetic"] <= 0.05 and scores["base"]["reverse"] <= 0.05
    assert scores["arithmetic"]["arithmetic"] >= 0.8 and scores["arithmetic"]["reverse"] <= 0.1
    assert scores["reverse"]["reverse"] >= 0.8 and scores["reverse"]["arithmetic"] <= 0.1

    base = load_file(paths["base"] / "model.safetensors")
    tuned = [load_file(paths[s] / "model.safetensors") for s in ("arithmetic", "reverse")]
    for t in tuned:
        stats = delta_stats(base, t)
        assert stats["p99"] <= SFT_BOUND and stats["max_abs"] <= 2 * SFT_BOUND

    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    tok = AutoTokenizer.from_pretrained(paths["base"])
    for drop in (0.0, 0.5, 0.9):
        gen = torch.Generator().manual_seed(0)
        merged = {}
        for name, theta in base.items():
            total = torch.zeros_like(theta)
            for t in tuned:
                delta = t[name] - theta
                if drop:
                    keep = torch.rand(delta.shape, generator=gen) >= drop
                    delta = delta * keep / (1 - drop)
                total += delta
            merged[name] = theta + 1.0 * total  # recommended: lambda 1, weights 1
        model.load_state_dict(merged)
        got = evaluate_skills(model, tok, n=200)
        for skill in ("arithmetic", "reverse"):
            assert got[skill] >= 0.7 * scores[skill][skill], (drop, got)
