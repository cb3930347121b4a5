"""Fixtures for the evaluation tests: a tiny real causal LM lm-eval can run, and the mirror.

The tiny model is a random Llama (hidden 32, 2 layers, ~50k parameters) with a 384-token
byte-level BPE tokenizer trained with `tokenizers` (any text encodes; a small vocabulary keeps
lm-eval fast). Scores are chance-level: the tests check plumbing, shapes and ranges.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dareflow.evaluation.mirror import TRUTHFULQA_JSONL, prepare_mirror

VOCAB = 384
MAX_POSITIONS = 1024  # lm-eval truncates longer few-shot contexts from the left


def _corpus():
    for line in TRUTHFULQA_JSONL.read_text("utf-8").splitlines():
        row = json.loads(line)
        yield row["question"]
        yield from row["mc2_targets"]["choices"]
    yield "Question: Answer: #### 0123456789 + - = Q: A: reverse The following are"


def build_tiny_lm(out: Path) -> Path:
    """Save a random tiny LlamaForCausalLM and its BPE tokenizer as an HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random causal LM folder (config.json, model.safetensors, tokenizer)."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def mirror_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full offline v1 mirror (about 21 MB, 3-5 s to write)."""
    return prepare_mirror(tmp_path_factory.mktemp("mirror"))
