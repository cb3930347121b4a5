"""Output vocabularies, mergekit's fill rules and the re-indexing of rows (pure functions,
exact values)."""

from __future__ import annotations

import pytest
import torch

from dareflow.merge.vocab import (
    ModelVocab,
    VocabPlan,
    mean_rows,
    output_vocab,
    pad_to_union_plan,
    reindex,
    reindex_plan,
)

SPECIAL = {"special": True, "normalized": False, "lstrip": False, "rstrip": False,
           "single_word": False}
PLAIN = {"special": False, "normalized": True, "lstrip": True, "rstrip": False,
         "single_word": False}


def vocab(tokens: list[str], added: dict[str, dict] | None = None,
          rows: int | None = None) -> ModelVocab:
    return ModelVocab({t: i for i, t in enumerate(tokens)}, added or {},
                      len(tokens) if rows is None else rows)


# --------------------------------------------------------------------------- vocabularies


def test_union_keeps_the_base_ids_then_regular_then_added_tokens_in_model_order():
    vocabs = {
        "base": vocab(["a", "b", "<s>"], {"<s>": SPECIAL}),
        "m1": vocab(["a", "b", "<s>", "d", "<x>"], {"<s>": SPECIAL, "<x>": SPECIAL}),
        "m2": vocab(["a", "b", "<s>", "e", "<x>", "<y>"],
                    {"<s>": SPECIAL, "<x>": PLAIN, "<y>": PLAIN}),
    }
    out = output_vocab("union", vocabs, "base", extra_tokens=["z", "a"])
    assert out.tokens == ("a", "b", "<s>", "d", "e", "<x>", "<y>", "z")
    assert out.start == "base"
    # regular tokens become plain added tokens; the first model's settings of <x> win
    assert out.appended == (("d", None), ("e", None), ("<x>", SPECIAL), ("<y>", PLAIN),
                            ("z", None))


def test_base_and_model_sources_start_from_that_tokenizer():
    vocabs = {"base": vocab(["a", "b"]), "m1": vocab(["a", "b", "c"], {"c": SPECIAL})}
    base = output_vocab("base", vocabs, "base")
    assert base.tokens == ("a", "b") and base.appended == () and base.start == "base"
    model = output_vocab("m1", vocabs, "base", extra_tokens=["q"])
    assert model.tokens == ("a", "b", "c", "q") and model.appended == (("q", None),)
    assert model.start == "m1"


# ----------------------------------------------------------------------------- fill rules


def _four():
    return {
        "base": vocab(["a", "b", "c"]),
        "m1": vocab(["a", "b", "c", "d", "f"]),
        "m2": vocab(["a", "c", "d", "e"]),  # lacks b
    }


def test_fill_rows_follow_mergekits_order_of_checks():
    vocabs = _four()
    out = output_vocab("union", vocabs, "base", extra_tokens=["z"])
    assert out.tokens == ("a", "b", "c", "d", "f", "e", "z")
    plan, notes = reindex_plan(out, vocabs, "base")
    assert plan.perms == {"base": (0, 1, 2, -1, -1, -1, -1),
                          "m1": (0, 1, 2, 3, 4, -1, -1),
                          "m2": (0, -1, 1, 2, -1, 3, -1)}
    assert plan.fill == {
        1: ("row", "base", 1),                           # b: the base has it (m2 lacks it)
        3: ("mean", (("m1", 3), ("m2", 2))),             # d: two models, not the base
        4: ("row", "m1", 4),                             # f: the only model with it
        5: ("row", "m2", 3),                             # e: the only model with it
        6: ("zero",),                                    # z: no model has it
    }
    assert plan.rows == 7 and plan.input_rows == {"base": 3, "m1": 5, "m2": 4}
    assert notes == ["no model has token 'z' (id 6): its row is zeros"]


def test_without_a_base_a_token_of_several_models_is_their_mean():
    vocabs = {"m1": vocab(["a", "b"]), "m2": vocab(["a", "b"]), "m3": vocab(["a"])}
    out = output_vocab("union", vocabs, "m1")
    plan, _ = reindex_plan(out, vocabs, None)
    assert plan.fill == {1: ("mean", (("m1", 1), ("m2", 1)))}


def test_tokens_settings_zero_model_model_token_and_force():
    vocabs = _four()
    out = output_vocab("union", vocabs, "base", extra_tokens=["z"])
    settings = {
        "d": {"source": {"kind": "zero"}},
        "f": {"source": {"kind": "model_token", "model": "m2", "token": "e"}},
        "e": {"source": {"kind": "model_token", "model": "base", "token_id": 2}},
        "b": {"source": "m1", "force": True},
        "z": {"force": True},  # no source: the default rule (no model has it: zeros)
    }
    plan, _ = reindex_plan(out, vocabs, "base", settings, pad_to_multiple_of=4)
    assert plan.rows == 8
    assert plan.fill == {1: ("row", "m1", 1), 3: ("zero",), 4: ("row", "m2", 3),
                         5: ("row", "base", 2), 6: ("zero",)}
    # force: every model takes the fill row, even those that have the token
    assert [plan.perms[k][1] for k in ("base", "m1", "m2")] == [-1, -1, -1]
    assert plan.perms["m1"][3] == 3  # not forced: a model's own row wins


def test_tokens_settings_naming_what_a_model_lacks_are_all_reported():
    vocabs = _four()
    out = output_vocab("union", vocabs, "base")
    with pytest.raises(ValueError) as e:
        reindex_plan(out, vocabs, "base", {
            "d": {"source": "base"},
            "e": {"source": {"kind": "model_token", "model": "m1", "token": "nope"}},
            "f": {"source": {"kind": "model_token", "model": "m2", "token_id": 4}},
        })
    assert str(e.value) == (
        "tokenizer.tokens: 'd': source 'base' has no such token; name a model that has it, "
        "or use {kind: model_token, model, token}; 'f': token_id 4 is out of range for 'm2' "
        "(4 rows); give an id below 4; 'e': 'm1' has no token 'nope'; name a token of its "
        "vocabulary or give token_id")


# ------------------------------------------------------------------------------ re-index


def test_reindex_builds_every_row_exactly():
    vocabs = _four()
    out = output_vocab("union", vocabs, "base")
    plan, _ = reindex_plan(out, vocabs, "base", pad_to_multiple_of=4)  # 6 tokens -> 8 rows
    t = {key: torch.arange(v.rows * 2, dtype=torch.bfloat16).reshape(v.rows, 2) + 10 * k
         for k, (key, v) in enumerate(vocabs.items())}
    got = reindex(plan, t)
    f = {k: x.float() for k, x in t.items()}
    d = ((f["m1"][3].double() + f["m2"][2].double()) / 2).float()
    real = {
        "base": [f["base"][0], f["base"][1], f["base"][2], d, f["m1"][4], f["m2"][3]],
        "m1": [f["m1"][0], f["m1"][1], f["m1"][2], f["m1"][3], f["m1"][4], f["m2"][3]],
        "m2": [f["m2"][0], f["base"][1], f["m2"][1], f["m2"][2], f["m1"][4], f["m2"][3]],
    }
    for key, rows in real.items():
        want = torch.stack(rows)
        pad = (want.double().sum(0) / 6).float()
        assert got[key].dtype == torch.float32 and got[key].shape == (8, 2)
        assert torch.equal(got[key], torch.cat([want, pad.expand(2, 2)])), key


def test_reindex_handles_one_dimensional_tensors():
    vocabs = {"base": vocab(["a"]), "m": vocab(["a", "b"])}
    plan, _ = reindex_plan(output_vocab("union", vocabs, "base"), vocabs, "base")
    got = reindex(plan, {"base": torch.tensor([1.0]), "m": torch.tensor([2.0, 5.0])})
    assert got["base"].tolist() == [1.0, 5.0] and got["m"].tolist() == [2.0, 5.0]


def test_reindex_refuses_rows_other_than_planned():
    plan = pad_to_union_plan({"base": 3, "m": 4})
    with pytest.raises(ValueError, match=r"input 'm' has 5 rows but the plan expects 4; the "
                                         r"checkpoint changed since the merge was planned"):
        reindex(plan, {"base": torch.zeros(3, 2), "m": torch.zeros(5, 2)})


def test_pad_to_union_pads_each_smaller_input_with_its_own_mean_row():
    plan = pad_to_union_plan({"base": 3, "a": 4, "b": 3})
    base = torch.tensor([[1.0, 2.0], [3.0, 5.0], [4.0, 0.5]])
    a = torch.arange(8.0).reshape(4, 2)
    b = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    got = reindex(plan, {"base": base, "a": a, "b": b})
    assert plan.rows == 4 and not plan.is_identity()
    assert torch.equal(got["base"], torch.cat([base, torch.tensor([[8 / 3, 7.5 / 3]])]))
    assert torch.equal(got["a"], a)
    assert torch.equal(got["b"][3], (b.double().sum(0) / 3).float())
    assert pad_to_union_plan({"base": 3, "a": 3}).is_identity()


def test_mean_rows_sums_in_float64():
    rows = torch.tensor([[1e8], [1.0], [-1e8]])
    assert rows.sum(0).item() == 0.0  # float32 loses the 1
    assert mean_rows(rows).item() == pytest.approx(1 / 3, rel=1e-7)


def test_plan_round_trips_through_json_with_compact_permutations():
    vocabs = _four()
    plan, _ = reindex_plan(output_vocab("union", vocabs, "base", ["z"]), vocabs, "base",
                           pad_to_multiple_of=3)
    data = plan.to_dict()
    assert data["perms"]["base"] == [[0, 3], [-1, 4]]
    assert data["fill"]["3"] == ["mean", [["m1", 3], ["m2", 2]]]
    assert VocabPlan.from_dict(data) == plan
    wide = pad_to_union_plan({"base": 32000, "math": 32001})
    assert wide.to_dict()["perms"] == {"base": [[0, 32000]], "math": [[0, 32001]]}
    assert VocabPlan.from_dict(wide.to_dict()) == wide
