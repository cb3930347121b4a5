"""Shared test fixtures. Each group below belongs to one area; keep groups separate."""

from __future__ import annotations

from pathlib import Path

import pytest

# =============================================================================================
# Checkpoint IO fixtures (tasks/storage.py, checkpoints.py, plan.py, assemble.py)
#
# Tiny real Hugging Face models (built with transformers configs and save_pretrained, once
# per session) and a moto S3 server. transformers is imported lazily: it is slow to import.
# =============================================================================================

TINY_VOCAB = 64


def _tiny_tokenizer():
    """A 64-token word-level tokenizer ("w3 w4 ..."), saved with the tiny Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _build_tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 32, 2 layers, vocab 64, untied head) with a tokenizer:
    config.json, generation_config.json, model.safetensors, tokenizer files."""
    out = tmp_path_factory.mktemp("tiny-llama")
    _build_tiny_llama().save_pretrained(out)
    _tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Llama saved in several shards with model.safetensors.index.json."""
    out = tmp_path_factory.mktemp("tiny-llama-sharded")
    _build_tiny_llama().save_pretrained(out, max_shard_size="20KB")
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (n_embd 32, 2 layers): tied embeddings, so no lm_head.weight stored."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=TINY_VOCAB, n_positions=32,
        bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT masked LM (hidden 32, 2 layers): embeddings, encoder.layer.N, cls head."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=TINY_VOCAB, max_position_embeddings=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertForMaskedLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def s3_store():
    """A moto S3 server on 127.0.0.1 with bucket ``dareflow-test``.

    Yields:
        ``(bucket_uri, storage_options)``: ``"s3://dareflow-test"`` and the s3fs options
        to pass to every ``tasks.storage`` call.
    """
    import os

    from tests.servers import REGION, moto_s3_server
    from tasks import storage

    # s3fs/botocore need a region; region_name must stay out of client_kwargs (ASSETS.md).
    old_region = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = REGION
    try:
        with moto_s3_server() as server:
            options = server.storage_options()
            fs, _ = storage.get_fs("s3://dareflow-test", **options)
            fs.mkdir("dareflow-test")
            yield "s3://dareflow-test", options
    finally:
        if old_region is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = old_region


# ============================================================================ end checkpoint IO
