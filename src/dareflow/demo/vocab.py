"""The demo family's character-level vocabulary and its Hugging Face tokenizer.

One token per character of printable ASCII plus newline, after four specials; ``encode``
gives the same ids as the saved tokenizer. Used by ``dareflow.demo.train`` (batches) and
``dareflow.demo.family`` (model config, saved folders).
"""

from __future__ import annotations

import string

# Character-level vocabulary: 4 specials + newline + printable ASCII (no tabs etc.).
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
CHARS = "\n" + "".join(c for c in string.printable if c.isprintable())  # 95 printable + \n
VOCAB = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *CHARS))}
NEWLINE_ID = VOCAB["\n"]


def make_tokenizer():
    """The family's character-level tokenizer (a ``PreTrainedTokenizerFast``).

    One token per character of printable ASCII plus newline; ``<s>`` is prepended to
    every encoded text; padding on the left (generation).
    """
    # tokenizers/transformers take ~1 s to import: only when a tokenizer is made
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (no BOS); same ids as the saved tokenizer gives."""
    return [VOCAB.get(c, UNK_ID) for c in text]


__all__ = [
    "BOS_ID",
    "CHARS",
    "EOS_ID",
    "NEWLINE_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "VOCAB",
    "encode",
    "make_tokenizer",
]
