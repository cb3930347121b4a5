"""Skills of the demo family: exact answers, fixed disjoint eval sets, exact-match scoring."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from dareflow.demo.skills import (
    ARITHMETIC,
    EVAL_SIZE,
    REVERSE,
    SKILLS,
    evaluate_skills,
    generate_answers,
    get_skill,
)
from dareflow.demo.vocab import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_arithmetic_is_exact():
    assert ARITHMETIC.prompt((23, 58)) == "Q: 23+58= A: "
    assert ARITHMETIC.answer((23, 58)) == "81"
    assert ARITHMETIC.answer((99, 99)) == "198"
    assert ARITHMETIC.raw((23, 58)) == "23+58=81"
    rng = random.Random(0)
    for _ in range(500):
        a, b = ARITHMETIC.sample_train(rng)
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert int(ARITHMETIC.answer((a, b))) == a + b


def test_reverse_is_exact():
    assert REVERSE.prompt("abcd") == "Q: reverse abcd A: "
    assert REVERSE.answer("abcd") == "dcba"
    assert REVERSE.raw("abc") == "abc -> cba"
    rng = random.Random(0)
    for _ in range(500):
        word = REVERSE.sample_train(rng)
        assert 3 <= len(word) <= 5 and word.isalpha() and word.islower()
        assert REVERSE.answer(word)[::-1] == word


def test_registry():
    assert set(SKILLS) == {"arithmetic", "reverse"}
    assert get_skill("reverse") is REVERSE
    assert get_skill(ARITHMETIC) is ARITHMETIC
    with pytest.raises(KeyError, match="unknown skill 'sorting'"):
        get_skill("sorting")


@pytest.mark.parametrize("skill", list(SKILLS.values()), ids=list(SKILLS))
def test_eval_set_is_fixed_and_distinct(skill):
    items = skill.eval_items
    assert len(items) == EVAL_SIZE == len(set(items))
    # A fresh Skill object (no cached set) draws the same items: seeded, not global RNG.
    assert dataclasses.replace(skill).eval_items == items
    assert skill.eval_prompts(5) == [skill.prompt(x) for x in items[:5]]
    assert skill.eval_answers(5) == [skill.answer(x) for x in items[:5]]


def test_eval_set_is_pinned():
    # Changing these changes every reported score: bump BUILD_VERSION and say so.
    assert ARITHMETIC.eval_items[:3] == ((17, 35), (21, 81), (58, 30))
    assert REVERSE.eval_items[:3] == ("tnhee", "peus", "cwnqb")


@pytest.mark.parametrize("skill", list(SKILLS.values()), ids=list(SKILLS))
def test_training_items_never_in_eval_set(skill):
    rng = random.Random(1)
    for _ in range(5000):
        assert not skill.is_eval_item(skill.sample_train(rng))
        assert not skill.is_eval_item(skill.sample_raw(rng))
    # ...although the plain draw does hit eval items (so the filter is doing work).
    rng = random.Random(1)
    assert any(skill.is_eval_item(skill.draw(rng)) for _ in range(50_000))


def test_eval_n_out_of_range():
    with pytest.raises(ValueError, match="n=0 is out of range"):
        ARITHMETIC.eval_prompts(0)
    with pytest.raises(ValueError, match=f"1 <= n <= {EVAL_SIZE}"):
        ARITHMETIC.eval_answers(EVAL_SIZE + 1)


class OracleLM(torch.nn.Module):
    """Stands in for a causal LM: 'generates' a fixed reply per prompt.

    Checks that prompts arrive left-padded with BOS, then appends the reply, a newline
    and junk (that evaluate_skills must cut at the newline), padded to a rectangle.
    """

    def __init__(self, tokenizer, reply):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.reply = reply  # prompt -> reply text
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        self.calls += 1
        tok = self.tokenizer
        assert bool(attention_mask[:, -1].all()), "prompts must be left-padded"
        assert eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("\n")]
        new_rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            real = [i for i, m in zip(ids, mask) if m]
            assert real[0] == tok.bos_token_id
            prompt = tok.decode(real, skip_special_tokens=True)
            text = self.reply(prompt) + "\nQ: junk"
            new_rows.append(tok.encode(text, add_special_tokens=False)[:max_new_tokens])
        width = max(map(len, new_rows))
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in new_rows])
        return torch.cat([input_ids, new], dim=1)


def _answer_key():
    return {
        skill.prompt(x): skill.answer(x) for skill in SKILLS.values() for x in skill.eval_items
    }


def test_oracle_scores_one(tokenizer):
    key = _answer_key()
    oracle = OracleLM(tokenizer, lambda p: key[p])
    scores = evaluate_skills(oracle, tokenizer, n=EVAL_SIZE, batch_size=64)
    assert scores == {"arithmetic": 1.0, "reverse": 1.0}
    assert oracle.calls == 2 * 4  # batched: ceil(200 / 64) per skill
    assert tokenizer.padding_side == "left" and oracle.training  # state restored


def test_refusing_and_half_right_models(tokenizer):
    key = _answer_key()
    assert evaluate_skills(OracleLM(tokenizer, lambda p: "?"), tokenizer, n=20) == {
        "arithmetic": 0.0,
        "reverse": 0.0,
    }
    first_half = {p for s in SKILLS.values() for p in s.eval_prompts(10)}
    half = OracleLM(tokenizer, lambda p: key[p] if p in first_half else key[p] + "0")
    assert evaluate_skills(half, tokenizer, skills=["reverse"], n=20) == {"reverse": 0.5}


def test_generate_answers_strips_and_cuts(tokenizer):
    oracle = OracleLM(tokenizer, lambda p: "  42 ")
    assert generate_answers(oracle, tokenizer, ["Q: 1+1= A: "] * 3, batch_size=2) == ["42"] * 3


def test_tiny_random_llama_scores_in_range(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    scores = evaluate_skills(model, tokenizer, n=8)
    assert set(scores) == set(SKILLS)
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_model_without_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="pass tokenizer="):
        evaluate_skills(torch.nn.Linear(1, 1))


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate_skills(tmp_path)
