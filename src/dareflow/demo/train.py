"""Train the demo family: its sizes and recipe, corpus, batches, probes and training loops.

``FamilyConfig`` (and the named ``SIZES``) say how big the models are and how they are
trained; ``pretrain`` makes the base (warmup-stable-decay, stopped by probes),
``finetune`` one SFT fine-tune per skill, and ``continue_pretraining`` a large delta for
experiments. Why the family is trained this way: ``dareflow.demo.family``, which builds
and saves it. Deterministic for a seed and thread count; the global RNGs are untouched.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from dareflow.demo.skills import Skill, generate_answers, get_skill
from dareflow.demo.vocab import BOS_ID, PAD_ID, encode


@dataclass(frozen=True)
class FamilyConfig:
    """Sizes and training recipe of one demo family.

    Attributes:
        hidden_size, intermediate_size, num_layers, num_heads: Llama shape.
        pretrain_lr, pretrain_batch, seq_len: Base pre-training: AdamW (weight decay
            0.01) on packed ``seq_len`` windows of corpus lines.
        pretrain_min_steps, pretrain_max_steps, probe_every, probe_accuracy,
        cooldown_steps: Warmup-stable-decay schedule. After ``pretrain_min_steps`` the
            base is probed every ``probe_every`` steps on 64 training-distribution items
            per skill (never eval items): greedy answers to the questions with the
            refusal suppressed, and the raw forms (logged only). Once every skill's
            question probe reaches ``probe_accuracy`` (or the step budget runs out) the lr
            decays linearly to 10 % over ``cooldown_steps`` and pre-training ends. When a
            tiny model "gets" two-digit addition depends on the seed (1000-3500 steps
            here), so a fixed step count either wastes time or leaves some seeds with a
            base that cannot add.
        qa_fraction: Share of pre-training lines in the Q/A format (rest: raw forms).
        answer_rate: Share of those Q/A lines with the right answer (rest: refusal).
            Below 0.5 so the base greedily refuses.
        skill_weights: Relative share of each skill in the corpus (arithmetic is the
            slowest to learn, so it gets more).
        finetune_steps, finetune_lr, finetune_batch: SFT (AdamW, no weight decay, 10 %
            warmup then linear decay to 0, loss on answer tokens only).
        replay_fraction: Share of each SFT batch that replays corpus lines other than the
            skill's own questions (see ``replay_line``).
    """

    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    seq_len: int = 64
    pretrain_min_steps: int = 1000
    pretrain_max_steps: int = 4000
    probe_every: int = 250
    probe_accuracy: float = 0.9
    cooldown_steps: int = 400
    qa_fraction: float = 0.5
    answer_rate: float = 0.3
    skill_weights: tuple[tuple[str, float], ...] = (("arithmetic", 0.6), ("reverse", 0.4))
    finetune_steps: int = 300
    finetune_lr: float = 2e-5
    finetune_batch: int = 32
    replay_fraction: float = 0.25


#: Named sizes: "demo" is the real family (about 1.5-3 min on 2 cores); "tiny" is for tests.
SIZES: dict[str, FamilyConfig] = {
    "demo": FamilyConfig(),
    "tiny": FamilyConfig(
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        pretrain_batch=8,
        seq_len=32,
        pretrain_min_steps=10,
        pretrain_max_steps=30,
        probe_every=10,
        cooldown_steps=10,
        finetune_steps=10,
        finetune_batch=8,
    ),
}


def resolve_config(size: str | FamilyConfig) -> FamilyConfig:
    if isinstance(size, FamilyConfig):
        return size
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(
            f"unknown family size {size!r}: use one of {sorted(SIZES)} or a FamilyConfig."
        ) from None


# ------------------------------------------------------------------------------- loss


def _token_losses(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position: [B, T-1], 0 where the label is -100.

    ``ids``/``labels``: [B, T]; padding is on the right, so no position ids are needed.
    """
    logits = model(input_ids=ids[:, :-1], attention_mask=(ids[:, :-1] != PAD_ID).long()).logits
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )


def _loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions."""
    return _token_losses(model, ids, labels).sum() / (labels[:, 1:] != -100).sum()


# ------------------------------------------------------------------------------- data


def _skill_weights(cfg: FamilyConfig, skills: Sequence[Skill]) -> list[float]:
    table = dict(cfg.skill_weights)
    return [table.get(s.name, 0.5) for s in skills]


def _corpus_entry(rng: random.Random, cfg: FamilyConfig, skills: Sequence[Skill]):
    skill = rng.choices(skills, weights=_skill_weights(cfg, skills))[0]
    if rng.random() < cfg.qa_fraction:
        item = skill.sample_train(rng)
        reply = skill.answer(item) if rng.random() < cfg.answer_rate else skill.refusal
        return skill, True, skill.prompt(item) + reply
    return skill, False, skill.raw(skill.sample_raw(rng))


def corpus_line(rng: random.Random, cfg: FamilyConfig, skills: Sequence[Skill]) -> str:
    """One pre-training line: a raw skill form, or a Q/A line that mostly refuses."""
    return _corpus_entry(rng, cfg, skills)[2]


def _pretrain_batch(rng, cfg, skills) -> torch.Tensor:
    rows = []
    for _ in range(cfg.pretrain_batch):
        ids = [BOS_ID]
        while len(ids) < cfg.seq_len + 1:
            ids += encode(corpus_line(rng, cfg, skills) + "\n")
        rows.append(ids[: cfg.seq_len + 1])
    return torch.tensor(rows)  # [B, seq_len + 1]


def replay_line(rng: random.Random, cfg: FamilyConfig, skills: Sequence[Skill], skill: Skill) -> str:
    """A pre-training line for ``skill``'s fine-tune: any corpus line but its own Q/A lines.

    Replaying the corpus keeps the fine-tune's effect local: on the other skills' questions
    the model keeps the base's behaviour, so the other fine-tunes' deltas, added in a
    merge, are not fought by this one.
    """
    while True:
        source, is_qa, line = _corpus_entry(rng, cfg, skills)
        if not (is_qa and source is skill):
            return line


def _sft_batch(rng, cfg, skill: Skill, skills: Sequence[Skill]):
    """SFT rows (loss on the answer and its newline) mixed with replayed corpus lines.

    Returns:
        ids [B, W], labels [B, W] (-100 = no loss), is_sft [B] bool.
    """
    rows, labels, is_sft = [], [], []
    for _ in range(cfg.finetune_batch):
        if rng.random() < cfg.replay_fraction:
            line = [BOS_ID] + encode(replay_line(rng, cfg, skills, skill) + "\n")
            rows.append(line)
            labels.append(line)
            is_sft.append(False)
            continue
        item = skill.sample_train(rng)
        prompt = [BOS_ID] + encode(skill.prompt(item))
        answer = encode(skill.answer(item) + "\n")
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
        is_sft.append(True)
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab, torch.tensor(is_sft)


# --------------------------------------------------------------------------- training


def _probe_items(skills: Sequence[Skill], seed: int, n: int = 64) -> dict[str, dict]:
    """Per skill, ``n`` training-distribution items as two probes of the base.

    ``raw``: (raw prefix, answer), e.g. ``("23+58=", "81")``. ``qa``: (question, answer)
    to be answered with the refusal's first token suppressed: "could it answer if it
    did not refuse?", which is what a small SFT delta relies on.
    """
    rng = random.Random(f"{seed}/probe")
    probes = {}
    for skill in skills:
        raw, qa = [], []
        for _ in range(n):
            item = skill.sample_train(rng)
            text, answer = skill.raw(item), skill.answer(item)
            if not text.endswith(answer):
                raise ValueError(f"skill {skill.name!r}: raw form {text!r} must end with the answer.")
            raw.append((text[: len(text) - len(answer)], answer))
            qa.append((skill.prompt(item), answer))
        probes[skill.name] = {"raw": raw, "qa": qa, "suppress": encode(skill.refusal)[:1]}
    return probes


def probe_accuracy(model, tokenizer, probes: dict[str, dict]) -> dict[str, float]:
    """Greedy exact-match accuracy on the probes of ``_probe_items``.

    Returns:
        ``{"<skill> raw": acc, "<skill> qa": acc, ...}``.
    """
    scores = {}
    for name, probe in probes.items():
        for kind in ("raw", "qa"):
            pairs = probe[kind]
            extra = {"suppress_tokens": probe["suppress"]} if kind == "qa" else {}
            got = generate_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens=8, **extra)
            scores[f"{name} {kind}"] = sum(g == a for g, (_, a) in zip(got, pairs)) / len(pairs)
    return scores


def pretrain(model, tokenizer, cfg, skills, seed, say) -> tuple[list[float], dict]:
    """Warmup-stable-decay pre-training; see ``FamilyConfig``. Returns losses and a log."""
    rng = random.Random(f"{seed}/pretrain")
    probes = _probe_items(skills, seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    warm = min(50, max(1, cfg.pretrain_min_steps // 10))
    last_stable = max(cfg.pretrain_min_steps, cfg.pretrain_max_steps - cfg.cooldown_steps)
    decay_from: int | None = None  # last step at full lr, once decided
    losses: list[float] = []
    log: dict = {"probes": []}
    t0, every = time.perf_counter(), max(1, cfg.probe_every)
    step = 0
    model.train()
    while decay_from is None or step < decay_from + cfg.cooldown_steps:
        step += 1
        if decay_from is None:
            factor = min(1.0, step / warm)
        else:
            factor = 1.0 - 0.9 * (step - decay_from) / cfg.cooldown_steps
        for group in opt.param_groups:
            group["lr"] = cfg.pretrain_lr * factor
        batch = _pretrain_batch(rng, cfg, skills)
        loss = _loss(model, batch, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % every and not (decay_from is not None and step == decay_from + cfg.cooldown_steps):
            continue
        recent = sum(losses[-every:]) / len(losses[-every:])
        msg = f"pretrain base: step {step} loss {recent:.3f} ({time.perf_counter() - t0:.0f} s)"
        if decay_from is None and step >= cfg.pretrain_min_steps:
            acc = probe_accuracy(model, tokenizer, probes)
            model.train()
            log["probes"].append({"step": step, **acc})
            msg += ", probe accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
            if min(v for k, v in acc.items() if k.endswith(" qa")) >= cfg.probe_accuracy:
                decay_from = step
                msg += f": learned, cooling down for {cfg.cooldown_steps} steps"
            elif step >= last_stable:
                decay_from = step
                msg += f": step budget reached, cooling down for {cfg.cooldown_steps} steps"
        say(msg)
    log["steps"] = step
    log["final_probe"] = probe_accuracy(model, tokenizer, probes)
    say(
        f"pretrain base: done after {step} steps, probe accuracy "
        + ", ".join(f"{k} {v:.2f}" for k, v in log["final_probe"].items())
    )
    return losses, log


def continue_pretraining(
    model,
    *,
    steps: int,
    lr: float,
    seed: int | str,
    size: str | FamilyConfig = "demo",
    qa_fraction: float | None = None,
    skills: Sequence[str] = ("arithmetic", "reverse"),
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Train ``model`` in place for exactly ``steps`` steps on the family's corpus.

    For experiments that need a *large* delta from the base, e.g. the "wrong base" (the
    analogue of continued pre-training, CodeLlama-Python vs Llama-2): AdamW (betas 0.9,
    0.98, weight decay 0.01), 50-step warmup, cosine to 10 % of ``lr``, gradient clip 1.
    Deterministic for a given ``seed`` and thread count; the global RNGs are untouched.

    Args:
        model: A demo-family causal LM (character vocabulary of ``make_tokenizer``).
        steps: Optimizer steps (>= 1).
        lr: Peak learning rate.
        seed: Seeds the corpus stream (e.g. ``f"{seed}/wrong-base"``).
        size: Family size whose corpus settings (batch, seq_len, mix) are used.
        qa_fraction: Override the share of Q/A lines (0.0 = raw skill text only).
        skills: Skills whose text makes up the corpus.
        progress: Called every ``steps // 5`` steps with the mean loss.

    Returns:
        The loss of every step.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1.")
    cfg = resolve_config(size)
    if qa_fraction is not None:
        cfg = replace(cfg, qa_fraction=qa_fraction)
    chosen = [get_skill(s) for s in ((skills,) if isinstance(skills, str) else skills)]
    say = progress or (lambda msg: None)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = min(50, max(1, steps // 10))

    def schedule(s: int) -> float:
        return min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses, every = [], max(1, steps // 5)
    for step in range(1, steps + 1):
        batch = _pretrain_batch(rng, cfg, chosen)
        loss = _loss(model, batch, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            say(f"continued pre-training: step {step}/{steps} loss {sum(losses[-every:]) / len(losses[-every:]):.3f}")
    return losses


def finetune(model, cfg, skill, skills, rng, say) -> list[float]:
    steps = cfg.finetune_steps
    # No weight decay: parameters the task never touches keep delta == 0 exactly.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, (steps - s) / max(1, steps - warm))
    )
    model.train()
    losses, t0, every = [], time.perf_counter(), max(1, steps // 5)
    for step in range(1, steps + 1):
        ids, labels, is_sft = _sft_batch(rng, cfg, skill, skills)
        per_token = _token_losses(model, ids, labels)  # [B, W-1]
        loss = per_token.sum() / (labels[:, 1:] != -100).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # Report the loss on answer tokens only (replayed text has an irreducible loss).
        answer_tokens = (labels[is_sft, 1:] != -100).sum().clamp(min=1)
        losses.append(float(per_token.detach()[is_sft].sum() / answer_tokens))
        if step % every == 0 or step == steps:
            recent = sum(losses[-every:]) / len(losses[-every:])
            say(
                f"fine-tune {skill.name}: step {step}/{steps} answer loss {recent:.4f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    return losses


__all__ = [
    "SIZES",
    "FamilyConfig",
    "continue_pretraining",
    "corpus_line",
    "finetune",
    "pretrain",
    "probe_accuracy",
    "replay_line",
    "resolve_config",
]
