"""Skills of the offline demo family and their exact-match evaluation.

A skill is a tiny, exactly checkable task written in a question/answer format::

    Q: 23+58= A: 81          (arithmetic: two-digit addition)
    Q: reverse abcd A: dcba  (reverse: reverse a short lowercase word)

Each skill also has a *raw* form (``23+58=81``, ``abcd -> dcba``) that the demo base model
sees during pre-training, and a *refusal* (``?``, ``...``) that the pre-training corpus
uses as the usual answer to a question. So the base model can compute both skills but,
asked in the Q/A format, greedily refuses: it scores ~0 until a small supervised
fine-tune (a small delta) teaches it to answer one kind of question. See
``src/dareflow/demo/family.py``.

Every skill has a fixed, seeded evaluation set, disjoint from everything the family is
trained on (``Skill.sample_train`` and ``Skill.sample_raw`` never return an eval item).

This module is pure Python + torch + transformers: no prefect, no fsspec.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch

#: Size of every skill's fixed evaluation set; ``evaluate_skills(n=...)`` uses a prefix.
EVAL_SIZE = 200
#: Items per split of a skill's fixed evaluation set: TEST is the first SPLIT_SIZE items,
#: VALIDATION the next SPLIT_SIZE (what experiments select on).
SPLIT_SIZE = 100

_LETTERS = string.ascii_lowercase


@dataclass(frozen=True, eq=False)
class Skill:
    """One exactly checkable task.

    Attributes:
        name: Key in ``SKILLS`` (also the demo fine-tune's folder name).
        description: One line for humans.
        draw: Draws one item (hashable, e.g. ``(23, 58)`` or ``"abcd"``) from a
            ``random.Random``; may return eval items (the ``sample_*`` methods filter).
        prompt: Item -> the question, ending right where the answer starts
            (``"Q: 23+58= A: "``).
        answer: Item -> the exact expected answer text (``"81"``), no newline.
        raw: Item -> the raw pre-training form (``"23+58=81"``).
        refusal: What the pre-training corpus usually answers in the Q/A format.
        eval_seed: Seed of the fixed evaluation set.
        draw_raw: Optional wider distribution for raw pre-training lines (defaults to
            ``draw``).
    """

    name: str
    description: str
    draw: Callable[[random.Random], Hashable]
    prompt: Callable[[Any], str]
    answer: Callable[[Any], str]
    raw: Callable[[Any], str]
    refusal: str
    eval_seed: int
    draw_raw: Callable[[random.Random], Hashable] | None = field(default=None)

    @cached_property
    def eval_items(self) -> tuple[Hashable, ...]:
        """The fixed evaluation set: ``EVAL_SIZE`` distinct items, same on every machine."""
        rng = random.Random(self.eval_seed)
        seen: dict[Hashable, None] = {}  # insertion-ordered set
        while len(seen) < EVAL_SIZE:
            seen.setdefault(self.draw(rng), None)
        return tuple(seen)

    @cached_property
    def _eval_set(self) -> frozenset:
        return frozenset(self.eval_items)

    def is_eval_item(self, item: Hashable) -> bool:
        """True if ``item`` belongs to the evaluation set (so must never be trained on)."""
        return item in self._eval_set

    def sample_train(self, rng: random.Random) -> Hashable:
        """One training item for the Q/A format, never an eval item."""
        while True:
            item = self.draw(rng)
            if item not in self._eval_set:
                return item

    def sample_raw(self, rng: random.Random) -> Hashable:
        """One item for a raw pre-training line, never an eval item."""
        draw = self.draw_raw or self.draw
        while True:
            item = draw(rng)
            if item not in self._eval_set:
                return item

    def eval_prompts(self, n: int = EVAL_SIZE) -> list[str]:
        """The first ``n`` evaluation prompts."""
        return [self.prompt(x) for x in self.eval_items[: self._check_n(n)]]

    def eval_answers(self, n: int = EVAL_SIZE) -> list[str]:
        """The expected answers of the first ``n`` evaluation prompts."""
        return [self.answer(x) for x in self.eval_items[: self._check_n(n)]]

    def _check_n(self, n: int) -> int:
        if not 1 <= n <= EVAL_SIZE:
            raise ValueError(
                f"n={n} is out of range for skill {self.name!r}: its fixed eval set has "
                f"{EVAL_SIZE} prompts; pass 1 <= n <= {EVAL_SIZE}."
            )
        return n


def _two_digit_pair(rng: random.Random) -> tuple[int, int]:
    return rng.randint(10, 99), rng.randint(10, 99)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))


ARITHMETIC = Skill(
    name="arithmetic",
    description="two-digit addition: 'Q: 23+58= A: ' -> '81'",
    draw=_two_digit_pair,
    prompt=lambda x: f"Q: {x[0]}+{x[1]}= A: ",
    answer=lambda x: str(x[0] + x[1]),
    raw=lambda x: f"{x[0]}+{x[1]}={x[0] + x[1]}",
    refusal="?",
    eval_seed=1001,
)

REVERSE = Skill(
    name="reverse",
    description="reverse a 3-5 letter word: 'Q: reverse abcd A: ' -> 'dcba'",
    draw=_word,
    prompt=lambda w: f"Q: reverse {w} A: ",
    answer=lambda w: w[::-1],
    # " -> " spans as many characters as " A: ": a question's answer sits exactly where
    # the raw form's does, so the base's reversal carries over to the Q/A format.
    raw=lambda w: f"{w} -> {w[::-1]}",
    refusal="...",
    eval_seed=1002,
)

#: All skills by name.
SKILLS: dict[str, Skill] = {s.name: s for s in (ARITHMETIC, REVERSE)}


def get_skill(skill: str | Skill) -> Skill:
    """Resolve a skill name (or pass a ``Skill`` through)."""
    if isinstance(skill, Skill):
        return skill
    try:
        return SKILLS[skill]
    except KeyError:
        raise KeyError(
            f"unknown skill {skill!r}: known skills are {sorted(SKILLS)}; "
            "pass one of those names or a Skill object."
        ) from None


def _load(model_dir_or_model, tokenizer):
    # heavy: transformers (~1 s), only when a model is loaded or scored
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if isinstance(model_dir_or_model, (str, Path)):
        path = Path(model_dir_or_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a Hugging Face model folder (no config.json); pass the "
                "folder that build_demo_family returned, or a loaded model and tokenizer."
            )
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per call is noise
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
        return model, tokenizer
    model = model_dir_or_model
    if tokenizer is None:
        source = getattr(model, "name_or_path", "") or ""
        if source and (Path(source) / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(source)
        else:
            raise ValueError(
                "evaluate_skills got a model object without a tokenizer, and the model "
                "was not loaded from a folder that holds one; pass tokenizer=..."
            )
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return model, tokenizer


def _stop_token_ids(tokenizer) -> list[int]:
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) == 1:  # a newline-only token ends the answer line
        ids.append(int(newline[0]))
    return ids


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 100,
    **generate_kwargs,
) -> list[str]:
    """Greedy answers to ``prompts``: generated text up to the first newline, stripped.

    Batched with left padding; generation stops at EOS or a newline token.

    Args:
        model: A causal LM (``generate`` API).
        tokenizer: Its tokenizer; it must have a pad token (or an EOS used as pad).
        prompts: ``B`` prompt strings.
        max_new_tokens: Generation budget per prompt.
        batch_size: Prompts per ``generate`` call.
        **generate_kwargs: Passed to ``model.generate`` (e.g. ``suppress_tokens``).

    Returns:
        ``B`` answer strings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    stop_ids = _stop_token_ids(tokenizer)
    was_training = model.training
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "left"  # generation continues right after each prompt
    if old_pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    try:
        device = next(model.parameters()).device
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True)
            input_ids = enc["input_ids"].to(device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids or None,
                pad_token_id=pad_id,
                **generate_kwargs,
            )
            new = out[:, input_ids.shape[1] :]  # [B, <= max_new_tokens]
            for row in tokenizer.batch_decode(new, skip_special_tokens=True):
                answers.append(row.split("\n", 1)[0].strip())
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return answers


def evaluate_skills(
    model_dir_or_model,
    tokenizer=None,
    skills: Iterable[str | Skill] | None = None,
    n: int = 100,
    batch_size: int = 100,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on each skill's fixed eval set.

    Args:
        model_dir_or_model: A Hugging Face model folder (str/Path) or a loaded causal LM.
        tokenizer: Its tokenizer (object or folder); loaded from the folder when omitted.
        skills: Skill names or ``Skill`` objects; all of ``SKILLS`` when omitted.
        n: Prompts per skill, the first ``n`` of the fixed eval set (1..EVAL_SIZE).
        batch_size: Prompts per ``generate`` call.

    Returns:
        ``{skill name: accuracy in [0, 1]}``.
    """
    model, tokenizer = _load(model_dir_or_model, tokenizer)
    chosen = [get_skill(s) for s in (SKILLS.values() if skills is None else skills)]
    scores: dict[str, float] = {}
    for skill in chosen:
        prompts, expected = skill.eval_prompts(n), skill.eval_answers(n)
        # Answer tokens + the newline; a wrong answer that runs on is cut here and fails.
        longest = max(len(tokenizer.encode(a, add_special_tokens=False)) for a in expected)
        got = generate_answers(
            model, tokenizer, prompts, max_new_tokens=longest + 2, batch_size=batch_size
        )
        scores[skill.name] = sum(g == e for g, e in zip(got, expected)) / len(expected)
    return scores


def split_items(skill: str, split: Literal["validation", "test"], n: int = SPLIT_SIZE) -> list:
    """Items of a skill's split: test = the first ``SPLIT_SIZE`` items of its fixed
    evaluation set (what ``evaluate_skills`` reports), validation = the next
    ``SPLIT_SIZE``; disjoint by construction. Returns the first ``n`` of the split."""
    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
    if not 1 <= n <= SPLIT_SIZE or 2 * SPLIT_SIZE > EVAL_SIZE:
        raise ValueError(f"n={n} must be in [1, {SPLIT_SIZE}] (two disjoint splits of the "
                         f"{EVAL_SIZE}-item evaluation set)")
    items = get_skill(skill).eval_items
    start = 0 if split == "test" else SPLIT_SIZE
    return list(items[start:start + n])
