"""What a merge shows in the Prefect UI, as plain data (dareflow.merge.report)."""

import os

from dareflow.merge import report


def test_run_name_and_tags_come_from_the_recipe_or_the_output():
    recipe = {"name": "supermario_v2", "merge_method": "dare_ties"}
    assert report.run_name(recipe, "out/x") == "supermario_v2 (dare_ties)"
    assert report.run_tags(recipe, "out/x", "Llama-2-13b-hf") == [
        "method:dare_ties", "recipe:supermario_v2", "base:Llama-2-13b-hf"]
    nameless = {"merge_method": "linear"}
    assert report.run_name(nameless, "s3://bucket/models/my-merge/") == "my-merge (linear)"
    assert report.run_tags(nameless, "/tmp/m", None) == ["method:linear", "recipe:m"]


def test_artifact_keys_are_lowercase_letters_digits_and_dashes():
    assert report.artifact_key("SuperMario_v2", "units") == "dareflow-merge-supermario-v2-units"
    assert report.artifact_key("a  b//c.d", "card") == "dareflow-merge-a-b-c-d-card"
    assert report.artifact_key("___", "model") == "dareflow-merge-unnamed-model"
    long = report.artifact_key("x" * 300, "gate")
    assert long == "dareflow-merge-" + "x" * report.MAX_KEY_STEM + "-gate"


def test_unit_label_names_what_the_final_unit_holds():
    assert report.unit_label("layer_003", ["model.layers.3.mlp.up_proj.weight"]) == "layer_003"
    assert report.unit_label("embeddings", ["model.embed_tokens.weight"]) == "embeddings"
    assert report.unit_label("final", ["lm_head.weight", "model.norm.weight"]) == "norm+lm_head"
    assert report.unit_label("final", ["transformer.ln_f.bias", "transformer.ln_f.weight"]) \
        == "ln_f"  # GPT-2: a tied head, only the norm
    bert = ["cls.predictions.bias", "cls.predictions.decoder.weight",
            "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.weight",
            "pooler.dense.weight"]
    assert report.unit_label("final", bert) == "predictions+decoder+LayerNorm+1-more"


def test_units_and_gate_rows():
    records = [
        {"unit": "embeddings", "tensors": ["a"], "nbytes": 2_500_000, "cached": False,
         "seconds": 0.12345, "sha256": "ab" * 32, "ran_on": "host:1"},
        {"unit": "final", "tensors": ["b", "c"], "nbytes": 1_000, "cached": True,
         "seconds": 0.001, "sha256": "cd" * 32, "ran_on": "host:2"},
    ]
    assert report.units_rows(records) == [
        {"unit": "embeddings", "tensors": 1, "MB": 2.5, "seconds": 0.123, "status": "merged",
         "sha256": "ab" * 32, "ran_on": "host:1"},
        {"unit": "final", "tensors": 2, "MB": 0.001, "seconds": None, "status": "reused",
         "sha256": "cd" * 32, "ran_on": "host:2"},
    ]
    verdicts = [{"model": "m", "passed": False, "abs_p99": 0.06912345, "relative_norm": 0.18,
                 "message": "..."}]
    assert report.gate_rows(verdicts) == [
        {"model": "m", "abs_delta_p99": 0.069123, "relative_norm": 0.18, "verdict": "fail"}]


def test_card_markdown_and_link():
    card = "---\nbase_model: x\ntags:\n- merge\n---\n\n# my-merge\n\ntext --- more\n"
    assert report.card_markdown(card) == "# my-merge\n\ntext --- more\n"
    assert report.card_markdown("# plain\n") == "# plain\n"
    assert report.link_of("s3://bucket/models/x") == "s3://bucket/models/x"
    assert report.link_of("/data/out") == "file:///data/out"
    assert report.link_of("out") == "file://" + os.path.abspath("out")
