"""The mergekit parity script's corpus, family and comparisons (mergekit itself is not
needed: the full parity run is ``python -m benchmarks.mergekit_parity``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.mergekit_parity import (
    RunResult,
    _reason,
    features,
    load_corpus,
    referenced,
    refusal_verdict,
    substitute,
)
from benchmarks.parity_case import Model, compare_case
from benchmarks.parity_compare import (
    DareSummary,
    Exact,
    align_rows,
    chat_template_difference,
    dare_tensor,
    f32_ulp,
    format_table,
    vocab_difference,
)
from benchmarks.parity_family import MEMBERS, ParityFamilySpec, generate_parity_family
from dareflow.recipe import parse_recipe

CORPUS = load_corpus()


# ----------------------------------------------------------------------------- corpus


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_recipe_parses_as_a_dareflow_recipe(case):
    data = substitute(case.data, Path("/family"))
    assert all(m.startswith("/family/") for m in [data.get("base_model") or "/family/",
                                                   *(m["model"] for m in data["models"])])
    recipe = parse_recipe(data, case.name)
    assert recipe.merge_method == case.method


def test_corpus_covers_every_method_and_feature():
    methods = {c.method for c in CORPUS}
    assert methods == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"}
    every = " ; ".join(features(c.data) for c in CORPUS)
    for feature in ("gradient", "filter", "base listed", "global ", "negative weight",
                    "tokenizer base", "tokenizer union", "tokenizer llama-ft-chat",
                    "chat_template auto", "chat_template chatml", "tokens", "pad to 64",
                    "tied"):
        assert feature in every, feature
    assert any(c.expect_refusal for c in CORPUS)
    for case in CORPUS:
        first = case.text.splitlines()[0]
        assert first == f"# python -m benchmarks.mergekit_parity --cases {case.name}"
        assert set(referenced(case.data)) <= set(MEMBERS)


def test_substitute_replaces_member_names_only():
    data = {"base_model": "llama-base", "tokenizer_source": "base",
            "tokenizer": {"source": "llama-ft-chat"},
            "models": [{"model": "tied-ft0", "parameters": {"weight": [0, 1]}}]}
    out = substitute(data, Path("/f"))
    assert out == {"base_model": "/f/llama-base", "tokenizer_source": "base",
                   "tokenizer": {"source": "/f/llama-ft-chat"},
                   "models": [{"model": "/f/tied-ft0", "parameters": {"weight": [0, 1]}}]}
    assert referenced(data) == ["llama-base", "llama-ft-chat", "tied-ft0"]


def test_load_corpus_filters_by_glob_and_features_name_the_options():
    names = [c.name for c in load_corpus(patterns=["*dare_ties*"])]
    assert names and all("dare_ties" in n for n in names)
    assert features({"merge_method": "ties", "base_model": "b",
                     "models": [{"model": "b"},
                                {"model": "f", "parameters": {"weight": -1}}],
                     "parameters": {"density": [{"filter": "mlp", "value": [0.1, 1]}]},
                     "tokenizer": {"source": "union"}}) == (
        "gradient; filter; negative weight; base listed; global density; tokenizer union")


def test_reason_picks_the_cli_error_or_the_exception_line():
    assert _reason("INFO x\nerror: recipe.yaml: 1 problem:\n  - weight: bad\n") == (
        "error: recipe.yaml: 1 problem: - weight: bad")
    assert _reason("Traceback (most recent call last):\n  File x\nValueError: Tensor size "
                   "mismatch\n") == "ValueError: Tensor size mismatch"


def test_refusal_cases_pass_only_when_both_refuse_and_dareflow_says_why():
    out = Path("/out")
    mk_no = RunResult(False, out, "ValueError: Tensor size mismatch")
    df_no = RunResult(False, out, "error: 130 rows vs 128", clean_refusal=True)
    assert refusal_verdict(mk_no, df_no).verdict == "ok (both refuse)"
    crash = RunResult(False, out, "KeyError: 'lm_head.weight'")
    assert refusal_verdict(mk_no, crash).verdict == "FAIL (dareflow crashed)"
    assert refusal_verdict(mk_no, RunResult(True, out)).verdict == "FAIL (dareflow merged)"
    assert refusal_verdict(RunResult(True, out), df_no).verdict == "FAIL (mergekit merged)"


# ----------------------------------------------------------------------------- family


def test_parity_family_has_tokenizers_added_rows_and_tied_heads(tmp_path):
    from safetensors import safe_open

    folder = generate_parity_family(tmp_path, ParityFamilySpec(hidden=16, intermediate=32,
                                                               layers=2, heads=2, kv_heads=1),
                                    log=lambda *a: None)
    shapes = {}
    for member in MEMBERS:
        with safe_open(str(folder / member / "model.safetensors"), "pt") as f:
            shapes[member] = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
        assert (folder / member / "tokenizer.json").exists()
    assert shapes["llama-base"]["lm_head.weight"] == (128, 16)
    assert shapes["llama-ft-chat"]["model.embed_tokens.weight"] == (130, 16)
    assert "lm_head.weight" not in shapes["tied-ft0"]
    vocab = json.loads((folder / "llama-ft-chat" / "tokenizer.json").read_text())
    added = {t["content"]: (t["id"], t["special"]) for t in vocab["added_tokens"]}
    assert added["<|im_start|>"] == (128, True) and added["<think>"] == (129, False)
    assert json.loads((folder / "tied-base" / "config.json").read_text())[
        "tie_word_embeddings"] is True
    with safe_open(str(folder / "llama-ft0" / "model.safetensors"), "pt") as f, \
            safe_open(str(folder / "llama-base" / "model.safetensors"), "pt") as g:
        delta = f.get_tensor("model.layers.0.mlp.up_proj.weight") - g.get_tensor(
            "model.layers.0.mlp.up_proj.weight")
    assert delta.dtype == torch.float32 and 0.0015 < float(delta.std()) < 0.0025


# ----------------------------------------------------------------------------- compare


def test_f32_ulp_and_exact_tolerance():
    assert float(f32_ulp(torch.tensor([1.0]))) == 2.0**-23
    assert float(f32_ulp(torch.tensor([-0.02]))) == 2.0**-29
    base = torch.full((4,), 0.02)
    exact = Exact(ulps=4)
    close = base + 3 * 2.0**-29
    assert exact.add("t", close, base, [base])
    assert exact.max_ulps == pytest.approx(3.0) and exact.fraction == 1.0
    far = base.clone()
    far[2] += 1e-6  # ~537 ulps: what a wrong weight on an SFT delta looks like, and less
    assert not exact.add("u", far, base, [base])
    assert exact.within == 7 and exact.worst[0].startswith("u: 1/4 elements off, worst at "
                                                           "flat index 2")


def test_exact_scales_with_the_operands_and_ignores_undefined_rows():
    exact = Exact(ulps=4)
    got = torch.tensor([1e-3, 5.0])
    expected = got + torch.tensor([2 * 2.0**-23, 0.0])  # 2 ulps of the operand 1.0
    assert exact.add("t", got, expected, [torch.tensor([1.0, float("nan")])])
    assert not Exact(ulps=4).add("t", got, expected, [])  # ~2000 ulps of 1e-3 itself


def test_align_rows_maps_tokens_and_leaves_missing_ones_nan():
    t = torch.arange(6.0).reshape(3, 2)
    out = align_rows(t, {"a": 0, "b": 1, "c": 2}, {"c": 0, "a": 1, "new": 2}, 4)
    assert out[:2].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert out[2:].isnan().all()
    assert align_rows(t, None, None, 2).tolist() == [[0.0, 1.0], [2.0, 3.0]]


def _dare(delta: torch.Tensor, density: float, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=g) < density
    return delta * keep * scale / density


def test_dare_statistics_agree_for_one_process_and_catch_another():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 64, generator=g) * 0.02
    delta = torch.randn(64, 64, generator=g) * 0.002
    mk = base + _dare(delta, 0.5, 1.0, 1)
    same = DareSummary(sigmas=5)
    assert same.add(dare_tensor("w", base + _dare(delta, 0.5, 1.0, 2), mk, base))
    assert same.ok and abs(same.kept_df - 0.5) < 0.03 and abs(same.norm_ratio - 1) < 0.05
    fewer = DareSummary(sigmas=5)  # the dare_ties: 36 % kept instead of 78 %
    assert not fewer.add(dare_tensor("w", base + _dare(delta, 0.36, 1.0, 2), mk, base))
    assert fewer.max_kept_z > 10 and "w: kept 0.3" in fewer.failing()[0]
    halved = DareSummary(sigmas=5)  # same masks' law, half the merged delta
    assert not halved.add(dare_tensor("w", base + _dare(delta, 0.5, 0.5, 2), mk, base))
    assert halved.max_kept_z < 5 < halved.max_ss_z
    assert halved.norm_ratio == pytest.approx(0.5, abs=0.05)


def test_dare_tensor_leaves_rows_without_base_out():
    base = torch.zeros(3, 2)
    base[2] = float("nan")
    got = torch.tensor([[1.0, 0.0], [0.0, 0.0], [9.0, 9.0]])
    t = dare_tensor("e", got, got.clone(), base)
    assert t.n == 4 and t.kept_df == 0.25 and t.ss_df == 1.0 and t.kept_z == 0.0


def test_vocab_difference_names_the_tokens():
    assert vocab_difference({"a": 0}, {"a": 0}) == ""
    text = vocab_difference({"a": 0, "x": 1}, {"a": 1, "b": 0})
    assert text == "2 vs mergekit's 2 tokens; missing 'b'=0; extra 'x'=1; other ids 'a' 0 vs 1"


def test_chat_templates_compare_by_rendering():
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    reformatted = template.replace("{% endfor %}", "{% endfor %}\n")  # trim_blocks eats it
    assert chat_template_difference(reformatted, template) == ""
    assert chat_template_difference(None, None) == ""
    assert chat_template_difference(None, template) == "none vs mergekit's set"
    other = template.replace("assistant:", "bot:")
    assert chat_template_difference(other, template) == (
        "renders 'system: Be brief.\\nuser: Hi!\\nassistant: Hello.\\nbot:' vs mergekit's "
        "'system: Be brief.\\nuser: Hi!\\nassistant: Hello.\\nassistant:' "
        "(add_generation_prompt=True)")


def test_format_table_is_markdown():
    table = format_table([{"case": "c", "method": "ties", "features": "—", "verdict": "ok",
                           "agreement": "max abs diff 0", "norm": "1.0000"}])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| case") and lines[1].startswith("|--")


def _model(tensors, vocab=None, **config) -> Model:
    embed = tensors.get("model.embed_tokens.weight")
    rows = embed.shape[0] if embed is not None else 4
    return Model(tensors, {"vocab_size": rows, "tie_word_embeddings": False, **config}, vocab)


def test_compare_case_deterministic_verdicts():
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g) * 0.02,
            "lm_head.weight": torch.randn(4, 4, generator=g) * 0.02}
    ft = {k: v + torch.randn(v.shape, generator=g) * 0.002 for k, v in base.items()}
    mk = {k: base[k] + 0.5 * (ft[k] - base[k]) for k in base}
    recipe = {"merge_method": "task_arithmetic", "base_model": "llama-base",
                          "models": [{"model": "llama-ft0"}]}
    members = {"llama-base": _model(base), "llama-ft0": _model(ft)}
    ok = compare_case(recipe, _model(dict(mk)), _model(mk), members, 4, 5)
    assert ok.ok and ok.verdict == "ok" and ok.norm == "1.0000"
    half = {k: base[k] + 0.25 * (ft[k] - base[k]) for k in base}
    bad = compare_case(recipe, _model(half), _model(mk), members, 4, 5)
    assert not bad.ok and bad.norm == "0.5000"
    assert any("merged delta ratio dareflow/mergekit (median) 0.5000" in d for d in bad.details)
    missing = compare_case(recipe, _model({"lm_head.weight": mk["lm_head.weight"]},
                                        tie_word_embeddings=True), _model(mk), members, 4, 5)
    assert not missing.ok and missing.details[:2] == [
        "tensors missing in dareflow's output: ['model.layers.0.mlp.up_proj.weight']",
        "config.json tie_word_embeddings: True vs mergekit's False"]


def test_compare_case_dare_with_a_new_token_row():
    g = torch.Generator().manual_seed(0)
    name = "model.embed_tokens.weight"
    base = torch.randn(200, 64, generator=g) * 0.02
    ft = torch.cat([base + torch.randn(200, 64, generator=g) * 0.002,
                    torch.randn(1, 64, generator=g) * 0.02])
    vocab = {f"t{i}": i for i in range(200)}
    out_vocab = {**vocab, "<new>": 200}
    mk = torch.cat([base + _dare(ft[:200] - base, 0.5, 1.0, 1), ft[200:]])
    df = torch.cat([base + _dare(ft[:200] - base, 0.5, 1.0, 2), ft[200:]])
    recipe = {"merge_method": "dare_linear", "base_model": "llama-base",
                          "models": [{"model": "llama-ft-chat"}]}
    members = {"llama-base": _model({name: base}, vocab),
               "llama-ft-chat": _model({name: ft}, out_vocab)}
    ok = compare_case(recipe, _model({name: df}, out_vocab), _model({name: mk}, out_vocab),
                      members, 4, 5)
    assert ok.ok, ok.details
    assert "new-token rows max diff 0" in ok.agreement
    df[200] += 1e-4  # the new token's row must be copied, not merged
    bad = compare_case(recipe, _model({name: df}, out_vocab), _model({name: mk}, out_vocab),
                       members, 4, 5)
    assert not bad.ok and bad.details[0].startswith(f"{name} rows [200]: 64/64 elements off")
    other = dict(out_vocab)
    other["<new>"], other["t0"] = 0, 200
    moved = compare_case(recipe, _model({name: mk}, other), _model({name: mk}, out_vocab),
                         members, 4, 5)
    assert not moved.ok and moved.details[0].startswith("vocabulary: 201 vs mergekit's 201")
    assert math.isfinite(float(moved.norm))


def test_compare_case_padding_rows_round_like_the_rows_they_average():
    g = torch.Generator().manual_seed(0)
    name = "lm_head.weight"
    vocab = {f"t{i}": i for i in range(6)}
    base = torch.randn(6, 4, generator=g) * 0.02
    ft = base + torch.randn(6, 4, generator=g) * 0.002
    mk = torch.cat([ft, ft.mean(0, keepdim=True).expand(2, 4)])  # padded to 8 rows
    recipe = {"merge_method": "task_arithmetic", "base_model": "llama-base",
                          "models": [{"model": "llama-ft0"}]}
    members = {"llama-base": _model({name: base}, vocab), "llama-ft0": _model({name: ft}, vocab)}
    rounded = mk.clone()
    rounded[6:] += 5e-9  # ~1 ulp of the averaged rows, many ulps of their (small) mean
    assert compare_case(recipe, _model({name: rounded}, vocab), _model({name: mk}, vocab),
                        members, 4, 5).ok
    zeros = mk.clone()
    zeros[6:] = 0
    bad = compare_case(recipe, _model({name: zeros}, vocab), _model({name: mk}, vocab),
                       members, 4, 5)
    assert not bad.ok and "lm_head.weight: 8/32 elements off" in bad.details[-1]


def test_compare_case_checks_the_output_rows_against_its_config_and_tokenizer():
    name = "model.embed_tokens.weight"
    rows = torch.zeros(3, 2)
    recipe = {"merge_method": "linear", "models": [{"model": "llama-ft0"}]}
    vocab = {"a": 0, "b": 1, "c": 2}
    out = _model({name: rows}, vocab)
    assert compare_case(recipe, out, out, {}, 4, 5).ok
    short = Model({name: rows[:2]}, {"vocab_size": 3, "tie_word_embeddings": False}, vocab)
    bad = compare_case(recipe, short, short, {}, 4, 5)
    assert bad.details == ["dareflow's config.json vocab_size 3 != its 2 embedding rows",
                           "dareflow's tokenizer has id 2 past its 2 embedding rows"]
