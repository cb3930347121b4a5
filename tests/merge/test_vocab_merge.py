"""Vocabulary policies end to end (``dareflow merge`` on the pico family): mergekit's
tokenizer sources (union, base, a model; ``tokens:``; ``pad_to_multiple_of``), the DARE
authors' ``pad_to_union`` on a Wizard-style pair, chat templates, tied embeddings, and the
refusals. Merged rows are checked exactly against inputs re-indexed by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dareflow.cli import main
from dareflow.flows.merge import run_merge
from dareflow.merge.plan import plan_merge
from dareflow.merge.tokenizer import CHAT_TEMPLATES
from dareflow.merge.vocab import mean_rows
from dareflow.recipe import parse_recipe
from dareflow.settings import CONFIGS_DIR
from tests.flows.conftest import write_recipe
from tests.reliability.conftest import committed_units, refused

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
WEIGHTS = "model.safetensors"


@pytest.fixture(autouse=True)
def _own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DAREFLOW_STORE", str(tmp_path / "store"))


def new_row(j: int, hidden: int = 32) -> torch.Tensor:
    """The embedding (and head) row of the j-th token a test fine-tune adds."""
    return 0.5 + 0.25 * j + 0.01 * torch.arange(hidden, dtype=torch.float32)


def with_tokens(base: Path, out: Path, *, regular=(), added=(), delta: float = 0.002,
                slow: bool = False) -> Path:
    """A fine-tune of ``base``: every tensor + ``delta``; ``regular`` tokens appended to its
    WordLevel vocabulary, then ``added`` tokens (special) added to its tokenizer; one new
    embedding and head row per token (``new_row``). ``slow``: no tokenizer.json, the added
    tokens in added_tokens.json and special_tokens_map.json (as WizardMath ships them)."""
    from tokenizers import AddedToken, Tokenizer

    shutil.copytree(base, out)
    data = json.loads((base / "tokenizer.json").read_text())
    size = len(data["model"]["vocab"])
    for j, tok in enumerate(regular):
        data["model"]["vocab"][tok] = size + j
    tok = Tokenizer.from_str(json.dumps(data))
    for t in added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False)])
    if slow:
        (out / "tokenizer.json").unlink()
        ids = {t: size + len(regular) + j for j, t in enumerate(added)}
        (out / "added_tokens.json").write_text(json.dumps(ids))
        (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": added[0]}))
    else:
        tok.save(str(out / "tokenizer.json"))
    tensors = {n: t + delta for n, t in load_file(base / WEIGHTS).items()}
    extra = torch.stack([new_row(j) for j in range(len(regular) + len(added))])
    for name in (EMBED, HEAD):
        if name in tensors:
            tensors[name] = torch.cat([tensors[name], extra])
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = size + len(regular) + len(added)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def ta(base: Path, *models: Path, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m)} for m in models], "dtype": "float32", **extra}


def merge(tmp_path: Path, recipe: dict) -> tuple[Path, dict]:
    out = tmp_path / "out"
    manifest = run_merge(str(write_recipe(tmp_path / "r.yaml", recipe)), str(out),
                         max_workers=1)
    return out, manifest


def merged(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


def load_in_fresh_process(out: Path, text: str) -> dict:
    """Load the merged folder with transformers in a fresh process (loading state left
    by other tests can change how transformers materialises weights)."""
    code = (
        "import json, sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t(sys.argv[2], add_special_tokens=False)['input_ids']\n"
        "print(json.dumps({'rows': m.get_input_embeddings().weight.shape[0], "
        "'vocab_size': m.config.vocab_size, 'len': len(t), 'ids': ids, "
        "'decoded': t.decode(ids), 'tied': m.lm_head.weight.data_ptr() == "
        "m.model.embed_tokens.weight.data_ptr(), 'template': t.chat_template}))")
    proc = subprocess.run([sys.executable, "-c", code, str(out), text], capture_output=True,
                          text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ta_expected(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
    """task_arithmetic with weights 1, as the merge computes it (float32)."""
    total = models[0] - base
    for m in models[1:]:
        total = total + (m - base)
    return base + total


# ------------------------------------------------------------------------ mergekit: union


def test_union_keeps_base_ids_appends_tokens_and_fills_rows_by_mergekits_rule(
        pico_family, tmp_path):
    base = pico_family["base"]
    # ft1: a regular token w64 (64), added <a> (65), <c> (66); ft2: added <b> (64), <c> (65)
    ft1 = with_tokens(base, tmp_path / "ft1", regular=["w64"], added=["<a>", "<c>"])
    ft2 = with_tokens(base, tmp_path / "ft2", added=["<b>", "<c>"], delta=-0.001)
    out, manifest = merge(tmp_path, ta(base, ft1, ft2, tokenizer={
        "source": "union", "pad_to_multiple_of": 8}))
    # output ids: base 0..63, ft1's regular w64, then the added tokens in model order
    order = ["w64", "<a>", "<c>", "<b>"]
    b, f1, f2 = (load_file(p / WEIGHTS) for p in (base, ft1, ft2))
    result = merged(out)
    for name in (EMBED, HEAD):
        c = (f1[name][66] + f2[name][65]).double() / 2  # <c>: base lacks it, two models have it
        c = c.float()
        # each model's matrix in the output vocabulary (rows 64..67), by hand
        rows = {
            "base": [f1[name][64], f1[name][65], c, f2[name][64]],  # only-holder rows; mean
            "ft1": [f1[name][64], f1[name][65], f1[name][66], f2[name][64]],
            "ft2": [f1[name][64], f1[name][65], f2[name][65], f2[name][64]],
        }
        inputs = {}
        for key, own in (("base", b), ("ft1", f1), ("ft2", f2)):
            real = torch.cat([own[name][:64], torch.stack(rows[key])])
            inputs[key] = torch.cat([real, mean_rows(real).expand(4, -1)])  # 68 -> 72 rows
        want = ta_expected(inputs["base"], inputs["ft1"], inputs["ft2"])
        assert result[name].shape == (72, 32)
        assert torch.equal(result[name], want), name
        # the only holder's row merges to itself: the others copy it (deltas 0)
        assert torch.equal(result[name][65], f1[name][65] + (f1[name][65] - f1[name][65]))
    for name, t in b.items():
        if name not in (EMBED, HEAD):
            assert torch.equal(result[name], ta_expected(t, f1[name], f2[name])), name
    assert manifest["recipe"]["tokenizer"] == {"source": "union", "pad_to_multiple_of": 8}
    assert manifest["vocab"] == {"policy": "tokenizer source union", "rows": 72,
                                 "appended": order, "notes": []}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72
    tok = json.loads((out / "tokenizer.json").read_text())
    assert [(e["content"], e["id"], e["special"]) for e in tok["added_tokens"][3:]] == [
        ("w64", 64, False), ("<a>", 65, True), ("<c>", 66, True), ("<b>", 67, True)]
    loaded = load_in_fresh_process(out, "w3 <b> w64 <c>")
    assert loaded["rows"] == loaded["vocab_size"] == 72 and loaded["len"] == 68
    assert loaded["ids"] == [3, 67, 64, 66] and loaded["decoded"].split() == [
        "w3", "<b>", "w64", "<c>"]
    assert order == [tok["added_tokens"][i]["content"] for i in range(3, 7)]


def test_union_of_identical_vocabularies_changes_nothing(pico_family, tmp_path):
    base, a, b = pico_family["base"], pico_family["a"], pico_family["b"]
    out, manifest = merge(tmp_path, ta(base, a, b, tokenizer_source="union"))
    (tmp_path / "plain").mkdir()
    _, again = merge(tmp_path / "plain", ta(base, a, b))
    # the re-indexing is the identity: same unit keys, so the plain merge reuses every
    # unit of the union merge (same store), and the same bytes come out
    assert not any(manifest["cached"].values()) and all(again["cached"].values())
    assert manifest["shards"] == again["shards"]
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    assert manifest["recipe"]["tokenizer_source"] == "union"


def test_the_vocabulary_enters_only_the_keys_of_the_units_it_changes(pico_family, tmp_path):
    base = pico_family["base"]
    ft = with_tokens(base, tmp_path / "ft", added=["<tool>"])

    def plan(**extra):
        return plan_merge(parse_recipe(ta(base, ft, **extra)), base_uri=str(base),
                          model_uris={str(ft): str(ft)}, work_uri=str(tmp_path / "work"),
                          store_uri=str(tmp_path / "store"))

    union = plan(tokenizer_source="union")
    keys = {u.unit: u.key for u in union.units}
    zero = {u.unit: u.key for u in plan(tokenizer={"tokens": {"<tool>": {"source": {
        "kind": "zero"}}}}).units}
    template = {u.unit: u.key for u in plan(tokenizer_source="union",
                                            chat_template="chatml").units}
    assert union.vocab["tensors"] == [HEAD, EMBED] and union.vocab["rows"] == 65
    assert keys["embeddings"] != zero["embeddings"] and keys["final"] != zero["final"]
    assert [keys[u] for u in keys if u.startswith("layer_")] == [
        zero[u] for u in zero if u.startswith("layer_")]
    assert template == keys  # the chat template changes no tensor


# ------------------------------------------------------------------ base and model sources


def test_source_base_drops_the_added_rows_and_keeps_the_base_tokenizer(pico_family, tmp_path):
    base = pico_family["base"]
    ft = with_tokens(base, tmp_path / "ft", added=["<tool>"])
    out, _ = merge(tmp_path, ta(base, ft, tokenizer={"source": "base"}))
    b, f, result = load_file(base / WEIGHTS), load_file(ft / WEIGHTS), merged(out)
    for name in (EMBED, HEAD):
        assert torch.equal(result[name], ta_expected(b[name], f[name][:64]))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_source_model_takes_that_models_vocabulary(pico_family, tmp_path):
    base = pico_family["base"]
    ft = with_tokens(base, tmp_path / "ft", added=["<tool>"])
    out, _ = merge(tmp_path, ta(base, ft, pico_family["a"], tokenizer={"source": str(ft)}))
    b, f, a = (load_file(p / WEIGHTS) for p in (base, ft, pico_family["a"]))
    result = merged(out)
    for name in (EMBED, HEAD):
        # <tool> only in ft: base and a take ft's row
        base_in = torch.cat([b[name], f[name][64:]])
        a_in = torch.cat([a[name], f[name][64:]])
        assert torch.equal(result[name], ta_expected(base_in, f[name], a_in)), name
    assert (out / "tokenizer.json").read_bytes() == (ft / "tokenizer.json").read_bytes()
    assert load_in_fresh_process(out, "<tool> w5")["ids"] == [64, 5]


# --------------------------------------------------------------------------- tokens: rows


def test_tokens_settings_zero_model_token_and_force(pico_family, tmp_path):
    base = pico_family["base"]
    ft = with_tokens(base, tmp_path / "ft", added=["<tool>", "<x>"])
    a = pico_family["a"]
    out, _ = merge(tmp_path, ta(base, ft, a, tokenizer={"source": "union", "tokens": {
        "<tool>": {"source": {"kind": "zero"}},                     # lacking models: zeros
        "<x>": {"source": {"kind": "model_token", "model": str(a), "token": "w7"},
                "force": True},                                     # every model: a's w7
        "<new>": {},                                                # added; no model has it
        "w9": {"source": {"kind": "model_token", "model": str(base), "token_id": 3},
               "force": True},                                      # every model: base's row 3
    }}))
    b, f, fa = (load_file(p / WEIGHTS) for p in (base, ft, a))
    result = merged(out)
    zero = torch.zeros(32)
    for name in (EMBED, HEAD):
        def matrix(own, own_tool, name=name):
            rows = own[name][:64].clone()
            rows[9] = b[name][3]
            return torch.cat([rows, torch.stack([own_tool, fa[name][7], zero])])
        want = ta_expected(matrix(b, zero), matrix(f, f[name][64]), matrix(fa, zero))
        assert torch.equal(result[name], want), name
    loaded = load_in_fresh_process(out, "<new> <tool>")
    assert loaded["rows"] == 67 and loaded["ids"] == [66, 64]


# --------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("setting", ["chatml", "literal", "auto"])
def test_chat_template_is_written_into_the_output_tokenizer_config(
        pico_family, tmp_path, setting):
    base = pico_family["base"]
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    ft = tmp_path / "ft"
    shutil.copytree(pico_family["a"], ft)
    cfg = json.loads((ft / "tokenizer_config.json").read_text())
    (ft / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": literal}))
    value = {"chatml": "chatml", "literal": literal, "auto": "auto"}[setting]
    out, _ = merge(tmp_path, ta(base, ft, chat_template=value))
    want = CHAT_TEMPLATES["chatml"] if setting == "chatml" else literal
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == want
    assert not (out / "chat_template.jinja").exists()
    assert load_in_fresh_process(out, "w3")["template"] == want


# --------------------------------------------------------------------- tied embeddings


def test_tied_base_stays_tied_under_union(pico_family, tmp_path):
    tied = tmp_path / "tied"
    shutil.copytree(pico_family["base"], tied)
    tensors = {n: t for n, t in load_file(tied / WEIGHTS).items() if n != HEAD}
    save_file(tensors, tied / WEIGHTS, metadata={"format": "pt"})
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    ft = with_tokens(tied, tmp_path / "ft", added=["<tool>"])
    out, _ = merge(tmp_path, ta(tied, ft, tokenizer_source="union"))
    result = merged(out)
    assert HEAD not in result
    b, f = load_file(tied / WEIGHTS), load_file(ft / WEIGHTS)
    assert torch.equal(result[EMBED], ta_expected(torch.cat([b[EMBED], f[EMBED][64:]]),
                                                  f[EMBED]))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 65
    loaded = load_in_fresh_process(out, "<tool>")
    assert loaded["tied"] and loaded["rows"] == 65 and loaded["ids"] == [64]


# ---------------------------------------------------------- DARE authors: pad_to_union


def test_wizard_style_pair_pads_the_smaller_models_with_their_mean_row(
        pico_family, tmp_path):
    """WizardMath-style: one extra row (a [PAD] added token, slow tokenizer files); the
    base and the other fine-tune get the mean of their own rows there."""
    base = pico_family["base"]
    math = with_tokens(base, tmp_path / "math", added=["[PAD]"], slow=True)
    lm = pico_family["b"]  # 64 rows, like WizardLM-13B-V1.2
    recipe = write_recipe(tmp_path / "wizard.yaml", ta(
        base, lm, math, parameters={"vocab_mismatch": "pad_to_union"}))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "--out", str(out), "--max-workers", "1"]) == 0
    b, m, w = (load_file(p / WEIGHTS) for p in (base, math, lm))
    result = merged(out)
    for name in (EMBED, HEAD):
        base_in = torch.cat([b[name], mean_rows(b[name])[None]])
        lm_in = torch.cat([w[name], mean_rows(w[name])[None]])
        assert torch.equal(result[name], ta_expected(base_in, lm_in, m[name])), name
        assert torch.equal(base_in[64], (b[name].double().sum(0) / 64).float())
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 65
    loaded = load_in_fresh_process(out, "w3 [PAD]")
    assert loaded["rows"] == 65 and loaded["len"] == 65 and loaded["ids"] == [3, 64]
    added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert added[-1] == {"id": 64, "content": "[PAD]", "single_word": False, "lstrip": False,
                         "rstrip": False, "normalized": False, "special": True}


def test_the_paper_wizard_recipe_runs_on_a_wizard_style_pair(pico_family, tmp_path):
    """configs/paper/wizardlm_wizardmath_13b.yaml with the pico family in place of the
    Hub models: dare_linear, weights 1/2, p = 0.2, rescale 1/(1 - p), pad_to_union. Each
    merged element of the [PAD] row is the padded base plus one of the four DARE outcomes
    (each delta kept and rescaled, or dropped)."""
    base = pico_family["base"]
    math = with_tokens(base, tmp_path / "math", added=["[PAD]"], slow=True)
    lm = pico_family["b"]
    recipe = yaml.safe_load((CONFIGS_DIR / "paper" / "wizardlm_wizardmath_13b.yaml").read_text())
    assert recipe["merge_method"] == "dare_linear"
    assert recipe["parameters"] == {"lambda": 1.0, "normalize": False, "rescale": "inverse",
                                    "vocab_mismatch": "pad_to_union"}
    assert [m["parameters"] for m in recipe["models"]] == [{"weight": 0.5, "drop_rate": 0.2}] * 2
    recipe["base_model"] = str(base)
    recipe["models"][0]["model"], recipe["models"][1]["model"] = str(lm), str(math)
    recipe["dtype"] = "float32"
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "wizard.yaml", recipe)
    assert main(["merge", str(path), "--out", str(out), "--max-workers", "1"]) == 0
    b, m, w = (load_file(p / WEIGHTS) for p in (base, math, lm))
    result = merged(out)
    for name in (EMBED, HEAD):
        pad = mean_rows(b[name])
        d_lm, d_math = mean_rows(w[name]) - pad, m[name][64] - pad
        outcomes = torch.stack([pad + 0.5 * (k1 * d_lm + k2 * d_math) / 0.8
                                for k1 in (0, 1) for k2 in (0, 1)])
        gap = (outcomes - result[name][64]).abs().min(0).values
        assert gap.max() < 1e-6, name
    loaded = load_in_fresh_process(out, "[PAD] w4")
    assert loaded["rows"] == loaded["vocab_size"] == 65 and loaded["ids"] == [64, 4]


def test_pad_to_union_with_equal_vocabularies_is_a_plain_merge(pico_family, tmp_path):
    base = pico_family["base"]
    out, _ = merge(tmp_path, ta(base, pico_family["a"],
                                parameters={"vocab_mismatch": "pad_to_union"}))
    b, a = load_file(base / WEIGHTS), load_file(pico_family["a"] / WEIGHTS)
    assert torch.equal(merged(out)[EMBED], ta_expected(b[EMBED], a[EMBED]))
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------ refusals


def test_different_vocabularies_without_a_policy_are_refused_naming_the_fix(
        pico_family, tmp_path):
    ft = with_tokens(pico_family["base"], tmp_path / "ft", added=["<tool>"])
    msg = refused(ta(pico_family["base"], ft), tmp_path)
    assert f"tensor '{EMBED}' has 65 rows vs 64 in the base" in msg
    assert "To merge them anyway: models have different vocabularies (embedding rows); " \
           "choose a vocabulary policy: tokenizer: {source: union}" in msg
    assert "parameters.vocab_mismatch: pad_to_union (the DARE authors" in msg


def test_a_tokens_setting_naming_an_absent_token_is_refused_before_any_unit(
        pico_family, tmp_path):
    ft = with_tokens(pico_family["base"], tmp_path / "ft", added=["<tool>"])
    msg = refused(ta(pico_family["base"], ft, tokenizer={"tokens": {
        "<tool>": {"source": {"kind": "model_token", "model": str(ft), "token": "<nope>"}}}}),
        tmp_path)
    assert f"tokenizer.tokens: '<tool>': '{ft}' has no token '<nope>'; name a token of its " \
           "vocabulary or give token_id" in msg
    assert committed_units(tmp_path / "store") == []
