"""Tokenizer files: vocabularies read from them, the output tokenizer built from them
(ids checked, loaded back with transformers), chat templates, and the recipe's tokenizer
keys refused with clear messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dareflow.errors import ProblemsError
from dareflow.merge.tokenizer import (
    CHAT_TEMPLATES,
    build_tokenizer_files,
    chat_template_of,
    resolve_chat_template,
    set_chat_template,
    vocab_from_files,
)
from dareflow.merge.vocab import OutputVocab, output_vocab
from dareflow.recipe import CHAT_TEMPLATE_NAMES, parse_recipe

SPECIAL = {"special": True, "normalized": False, "lstrip": False, "rstrip": False,
           "single_word": False}


def word_level_files(n: int = 8, added: tuple[str, ...] = ()) -> dict[str, bytes]:
    """A fast WordLevel tokenizer: <unk> <s> </s> w3 .. w{n-1}, then ``added`` specials."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    for t in added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
              "bos_token": "<s>", "eos_token": "</s>"}
    return {"tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": json.dumps(config).encode()}


def load(files: dict[str, bytes], tmp_path: Path):
    from transformers import AutoTokenizer

    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return AutoTokenizer.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- vocabularies


def test_fast_vocabulary_is_limited_to_the_embedding_rows():
    v = vocab_from_files(word_level_files(8, ("<a>", "<b>")), rows=9)
    assert v.tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 8)},
                        "<a>": 8}
    assert v.added == {"<unk>": SPECIAL, "<s>": SPECIAL, "</s>": SPECIAL, "<a>": SPECIAL}
    assert v.rows == 9


def test_slow_tokenizer_shares_the_base_vocabulary_plus_its_added_tokens():
    base = vocab_from_files(word_level_files(8), rows=8)
    slow = {"tokenizer.model": b"spm", "added_tokens.json": b'{"[PAD]": 8}',
            "special_tokens_map.json": b'{"pad_token": {"content": "[PAD]"}, "bos_token": "<s>"}'}
    v = vocab_from_files(slow, rows=9, fallback=base)
    assert v.tokens == {**base.tokens, "[PAD]": 8}
    assert v.added["[PAD]"] == SPECIAL and v.added["<s>"] == SPECIAL
    assert vocab_from_files(slow, rows=9) is None
    # tokenizer_config's added_tokens_decoder wins over added_tokens.json
    decoder = {"8": {"content": "<pad>", "special": False, "normalized": True,
                     "lstrip": False, "rstrip": False, "single_word": False}}
    slow["tokenizer_config.json"] = json.dumps({"added_tokens_decoder": decoder}).encode()
    v = vocab_from_files(slow, rows=9, fallback=base)
    assert v.tokens["<pad>"] == 8 and "[PAD]" not in v.tokens
    assert v.added["<pad>"] == {**SPECIAL, "special": False, "normalized": True}


# --------------------------------------------------------------------------- output files


def test_appended_tokens_get_the_planned_ids_and_round_trip(tmp_path):
    files = word_level_files(8)
    vocabs = {"base": vocab_from_files(files, 8),
              "ft": vocab_from_files(word_level_files(8, ("<tool>",)), 9)}
    out = output_vocab("union", vocabs, "base", extra_tokens=["w99"])
    built = build_tokenizer_files(files, out, chat_template=CHAT_TEMPLATES["chatml"])
    added = json.loads(built["tokenizer.json"])["added_tokens"]
    assert [(e["content"], e["id"], e["special"], e["normalized"]) for e in added[3:]] == [
        ("<tool>", 8, True, False), ("w99", 9, False, True)]
    tok = load(built, tmp_path)
    ids = tok("w3 <tool> w99", add_special_tokens=False)["input_ids"]
    assert ids == [3, 8, 9] and tok.decode(ids).split() == ["w3", "<tool>", "w99"]
    assert len(tok) == 10
    assert tok.apply_chat_template([{"role": "user", "content": "w3"}], tokenize=False) == \
        "<|im_start|>user\nw3<|im_end|>\n"


def test_tokens_past_the_rows_are_stripped_and_the_config_kept_in_step(tmp_path):
    files = word_level_files(8, ("<a>", "<b>"))
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
               for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    decoder |= {"8": {**decoder["0"], "content": "<a>"}, "9": {**decoder["0"], "content": "<b>"}}
    config = json.loads(files["tokenizer_config.json"]) | {"added_tokens_decoder": decoder}
    files["tokenizer_config.json"] = json.dumps(config).encode()
    start = vocab_from_files(files, rows=9)  # <b> (id 9) is past the rows
    out = output_vocab("base", {"base": start}, "base")
    built = build_tokenizer_files(files, out)
    assert [e["content"] for e in json.loads(built["tokenizer.json"])["added_tokens"]] == [
        "<unk>", "<s>", "</s>", "<a>"]
    assert list(json.loads(built["tokenizer_config.json"])["added_tokens_decoder"]) == [
        "0", "1", "2", "8"]
    assert len(load(built, tmp_path)) == 9


def test_bpe_merges_that_make_a_stripped_token_are_removed():
    data = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
            "post_processor": None, "decoder": None, "truncation": None, "padding": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3, "abc": 4},
                      "merges": [["a", "b"], ["ab", "c"]]}}
    files = {"tokenizer.json": json.dumps(data).encode()}
    out = OutputVocab(("a", "b", "ab", "c"), "base")
    model = json.loads(build_tokenizer_files(files, out)["tokenizer.json"])["model"]
    assert model["vocab"] == {"a": 0, "b": 1, "ab": 2, "c": 3}
    assert model["merges"] in ([["a", "b"]], ["a b"])


def test_adding_tokens_to_a_slow_only_tokenizer_is_refused():
    out = OutputVocab(("a", "<x>"), "base", (("<x>", None),))
    with pytest.raises(ValueError) as e:
        build_tokenizer_files({"tokenizer.model": b"spm"}, out)
    assert str(e.value) == (
        "the output tokenizer starts from 'base', which has no tokenizer.json (a fast "
        "tokenizer), and 1 token(s) must be added (['<x>']); save a fast tokenizer there "
        "first (AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")


# --------------------------------------------------------------------------- chat templates


def test_chat_template_sources_in_transformers_order():
    config = {"chat_template": [{"name": "tool_use", "template": "T"},
                                {"name": "default", "template": " D\n"}]}
    files = {"tokenizer_config.json": json.dumps(config).encode()}
    assert chat_template_of(files) == "D"
    files["chat_template.json"] = b'{"chat_template": "J"}'
    assert chat_template_of(files) == "J"
    files["chat_template.jinja"] = b"{{ x }}\n"
    assert chat_template_of(files) == "{{ x }}"
    assert chat_template_of({"tokenizer_config.json": b"{}"}) is None


def test_auto_takes_the_most_common_template_and_the_first_seen_on_a_tie():
    def files(template):
        return {"tokenizer_config.json": json.dumps({"chat_template": template}).encode()}
    assert resolve_chat_template("auto", {"a": files("A"), "b": files("B"), "c": files("B")}) == "B"
    assert resolve_chat_template("auto", {"a": files("A"), "b": files("B")}) == "A"
    assert resolve_chat_template("auto", {"a": {}, "b": files(None)}) is None
    assert resolve_chat_template("chatml", {}) == CHAT_TEMPLATES["chatml"]
    assert resolve_chat_template("{{ m }}", {}) == "{{ m }}"


def test_set_chat_template_writes_the_config_and_drops_the_template_files():
    files = {"tokenizer_config.json": b'{"bos_token": "<s>"}', "chat_template.jinja": b"old",
             "chat_template.json": b"{}"}
    set_chat_template(files, "{{ new }}")
    assert json.loads(files["tokenizer_config.json"]) == {"bos_token": "<s>",
                                                         "chat_template": "{{ new }}"}
    assert sorted(files) == ["tokenizer_config.json"]


def test_every_built_in_chat_template_name_has_a_text():
    assert set(CHAT_TEMPLATE_NAMES) == {"auto", *CHAT_TEMPLATES}


# ------------------------------------------------------------------------- recipe refusals


def problems(extra: dict) -> str:
    recipe = {"merge_method": "task_arithmetic", "base_model": "org/base",
              "models": [{"model": "org/ft"}], **extra}
    with pytest.raises(ProblemsError) as e:
        parse_recipe(recipe)
    return str(e.value)


def test_tokenizer_and_tokenizer_source_together_are_refused():
    msg = problems({"tokenizer": {"source": "base"}, "tokenizer_source": "union"})
    assert "tokenizer and tokenizer_source: give one of them (tokenizer_source: X is the " \
           "legacy spelling of tokenizer: {source: X}), not both" in msg


def test_unknown_chat_template_name_lists_the_choices():
    msg = problems({"chat_template": "chatm"})
    assert "chat_template: unknown chat template 'chatm'; did you mean 'chatml'? choices: " \
           "auto, chatml, or a literal Jinja template (text with '{{ ... }}' or '{% ... %}')" \
           in msg


def test_unknown_tokenizer_source_and_token_sources_are_named():
    msg = problems({"tokenizer": {"source": "org/ftt", "tokens": {
        "<x>": {"source": {"kind": "model_token", "model": "org/other"}},
        "<y>": {"source": {"kind": "model_token", "model": "org/ft", "token": "a",
                           "token_id": 3}}}}})
    assert "tokenizer.source: unknown tokenizer source 'org/ftt'; did you mean 'org/ft'? " \
           "choices: base, org/base, org/ft, union" in msg
    assert "tokenizer.tokens['<x>'].source: unknown model 'org/other'" in msg
    assert "tokenizer.tokens['<x>'].source: kind model_token needs exactly one of token" in msg
    assert "tokenizer.tokens['<y>'].source: kind model_token needs exactly one of token" in msg
    assert "4 problems" in msg


def test_an_unknown_token_source_kind_is_one_clear_problem():
    msg = problems({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "one"}}}}})
    assert "tokenizer.tokens.<x>.source: a token source is a model of the recipe, {kind: " \
           "zero} or {kind: model_token, model: M, token: T | token_id: N}; got kind 'one'" \
           in msg
    assert "1 problem" in msg


def test_two_vocabulary_policies_are_refused():
    msg = problems({"tokenizer_source": "union",
                    "parameters": {"vocab_mismatch": "pad_to_union"}})
    assert "parameters.vocab_mismatch: 'pad_to_union' and the tokenizer keys are two " \
           "vocabulary policies; keep one" in msg


def test_valid_tokenizer_keys_parse():
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}],
                           "tokenizer": {"source": "b", "pad_to_multiple_of": 64, "tokens": {
                               "<x>": {"source": {"kind": "zero"}, "force": True}}},
                           "chat_template": "auto"})
    assert recipe.tokenizer.source == "b" and recipe.tokenizer.tokens["<x>"].force
