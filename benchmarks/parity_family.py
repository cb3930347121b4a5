"""The tiny float32 Llama family of the mergekit parity run, with real tokenizers.

Members (folders under one family folder; the corpus recipes name them):

- ``llama-base``: random Llama weights (normal, std 0.02; norms 1), untied head.
- ``llama-ft0``, ``llama-ft1``: base + N(0, 0.002) on every tensor (SFT-sized deltas).
- ``llama-ft-chat``: a fine-tune whose tokenizer adds two tokens (``<|im_start|>``, a
  special token, and ``<think>``, a plain added token) and a chat template; its
  embedding and head have two extra rows (new rows N(0, 0.02)).
- ``tied-base``, ``tied-ft0``, ``tied-ft1``: the same shapes with
  ``tie_word_embeddings: true`` (no ``lm_head.weight`` in the files).

Every member is written with transformers' ``save_pretrained`` (float32 safetensors,
config.json) and a fast BPE tokenizer built with ``tokenizers`` (mergekit's tokenizer
union supports BPE only). Weights come from a seeded ``torch.Generator`` per (member,
tensor): the same bytes on every machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DONE_NAME = "family.json"
BASE_STD = 0.02
DELTA_STD = 0.002
SPECIALS = ("<unk>", "<s>", "</s>")
#: the tokens ``llama-ft-chat`` adds: (token, special)
ADDED_TOKENS = (("<|im_start|>", True), ("<think>", False))
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "</s>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
_MERGES = ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or",
           "te", "of", "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha",
           "as", "ou", "io", "le", "ve", "co", "me", "de", "hi", "ri", "ro", "ic", "ne",
           "ea", "ra", "ce", "li", "ch", "ll", "be", "ma", "si", "om", "ur", "ow", "us", "ai")

#: member -> (tied head, adds tokens, base member or None for a base)
MEMBERS: dict[str, tuple[bool, bool, str | None]] = {
    "llama-base": (False, False, None),
    "llama-ft0": (False, False, "llama-base"),
    "llama-ft1": (False, False, "llama-base"),
    "llama-ft-chat": (False, True, "llama-base"),
    "tied-base": (True, False, None),
    "tied-ft0": (True, False, "tied-base"),
    "tied-ft1": (True, False, "tied-base"),
}


@dataclass(frozen=True)
class ParityFamilySpec:
    """Shape of the parity family (vocab = the base tokenizer's size, 128)."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    seed: int = 0

    @property
    def name(self) -> str:
        """Folder name: the shape plus a short hash of the spec and the member list."""
        text = json.dumps([asdict(self), MEMBERS, ADDED_TOKENS, _MERGES], sort_keys=True)
        return f"parity-h{self.hidden}-l{self.layers}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def base_tokenizer():
    """The family's fast BPE tokenizer: 3 specials, 72 characters, 53 merges = 128 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-:;()"
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
    merges = []
    for pair in _MERGES:
        vocab[pair] = len(vocab)
        merges.append((pair[0], pair[1]))
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def chat_tokenizer():
    """The base tokenizer plus ``ADDED_TOKENS`` and ``CHAT_TEMPLATE`` (130 ids)."""
    tok = base_tokenizer()
    for token, special in ADDED_TOKENS:
        if special:
            tok.add_special_tokens({"additional_special_tokens": [token]})
        else:
            tok.add_tokens([token])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _generator(spec: ParityFamilySpec, member: str, tensor: str) -> torch.Generator:
    digest = hashlib.sha256(f"{spec.seed}/{member}/{tensor}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _config(spec: ParityFamilySpec, vocab: int, tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, vocab_size=vocab,
                       max_position_embeddings=256, tie_word_embeddings=tied,
                       bos_token_id=1, eos_token_id=2, dtype="float32")


def _weights(spec: ParityFamilySpec, member: str, shapes: dict[str, torch.Size],
             bases: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A member's tensors: random for a base; base + N(0, DELTA_STD) for a fine-tune
    (rows past the base's vocabulary: N(0, BASE_STD), new tokens trained from scratch)."""
    parent = MEMBERS[member][2]
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=_generator(spec, member, name))
        if parent is None:
            out[name] = torch.ones(shape) if name.endswith("norm.weight") else noise * BASE_STD
            continue
        base = bases[parent][name]
        value = noise * DELTA_STD
        rows = base.shape[0]
        value[:rows] += base
        if shape[0] > rows:
            value[rows:] = noise[rows:] * BASE_STD
        out[name] = value
    return out


def generate_parity_family(root: str | Path, spec: ParityFamilySpec = ParityFamilySpec(),
                           *, log: Callable[..., None] = print) -> Path:
    """Write the family once under ``root``; later calls return the cached folder.

    Returns:
        The family folder (members are its subfolders, named as in ``MEMBERS``).
    """
    from transformers import LlamaForCausalLM

    folder = Path(root) / spec.name
    done = folder / DONE_NAME
    if done.exists() and json.loads(done.read_text()) == asdict(spec):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    log(f"generating the parity family in {folder} (once)")
    bases: dict[str, dict[str, torch.Tensor]] = {}
    for member, (tied, adds_tokens, _) in MEMBERS.items():
        tok = chat_tokenizer() if adds_tokens else base_tokenizer()
        with torch.device("meta"):
            model = LlamaForCausalLM(_config(spec, len(tok), tied))
        model = model.to_empty(device="cpu").float()
        model.tie_weights()  # to_empty gives every module its own storage: tie again
        # named_parameters() lists a tied head once (as embed_tokens)
        shapes = {name: p.shape for name, p in model.named_parameters()}
        weights = _weights(spec, member, shapes, bases)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(weights[name])
        if MEMBERS[member][2] is None:
            bases[member] = weights
        model.save_pretrained(folder / member)
        tok.save_pretrained(folder / member)
    done.write_text(json.dumps(asdict(spec), sort_keys=True))
    return folder
