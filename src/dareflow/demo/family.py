"""Build the offline demo family: a tiny Llama base and SFT fine-tunes of it, one per skill.

No machine here reaches the Hugging Face Hub, so dareflow makes its own homologous
family (see ASSETS.md). ``build_demo_family(out_dir)`` writes real HF folders::

    out_dir/base/        LlamaForCausalLM pre-trained on a generated corpus
    out_dir/arithmetic/  base + a small SFT delta: answers 'Q: 23+58= A: ' with '81'
    out_dir/reverse/     base + a small SFT delta: answers 'Q: reverse abcd A: ' with 'dcba'
    out_dir/family.json  manifest, written last: build version, seed, config, sha256 of
                         every file, delta statistics, training losses

How the family is made so that merges work (the point of the demo):

* Pre-training corpus (one line per example, packed): the raw form of every skill
  (``23+58=81``, ``abcd -> dcba``) and the Q/A form, where the answer is the right one
  only ``answer_rate`` (30 %) of the time and otherwise the skill's refusal (``?``,
  ``...``). The base can compute both skills but greedily refuses in the Q/A format, so
  it scores ~0, like a base LLM that has the knowledge but not the instruction habit.
  Pre-training runs until probes show the base *could* answer both kinds of question
  (greedy with the refusal suppressed), then cools down; see ``FamilyConfig``.
* Each fine-tune is SFT in the DARE regime: AdamW, lr 2e-5, no weight decay, 300 steps,
  loss on answer tokens only. It only has to flip "refuse" to "answer" for its own kind
  of question, so its delta is small (median |δ| ~0.0015, max ~0.0045). A quarter of each
  SFT batch replays the corpus without the skill's own questions, which keeps each
  delta's effect local to its skill: summed in a merge, the deltas do not fight.
* Merges (measured on seeds 0-2): task arithmetic ``θ_B + λ(δ_A + δ_R)`` at λ = 1 keeps
  both skills (~1.0 each), and so do DARE merges at p = 0.5 and p = 0.9. Stronger
  fine-tunes (500 steps, or lr 5e-5) made λ = 1 over-shoot: both deltas carry a shared
  "answer the question" direction, which the sum counts twice.

Determinism: model init (explicit ``torch.Generator``), data (``random.Random`` seeded
from ``seed``, string seeds hash the same in every process) and a fixed intra-op thread
count make the same seed give byte-identical safetensors on one machine. The global
torch and Python RNGs are never touched.

Cache: a folder that already holds a complete family with the same ``BUILD_VERSION``,
seed and config (and whose files match the manifest's sha256) is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dareflow.demo.skills import SKILLS, Skill, get_skill

#: Bump when anything that changes the built files changes (corpus, training, init, config).
BUILD_VERSION = 2

MANIFEST = "family.json"
BASE = "base"

# Character-level vocabulary: 4 specials + newline + printable ASCII (no tabs etc.).
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
CHARS = "\n" + "".join(c for c in string.printable if c.isprintable())  # 95 printable + \n
VOCAB = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *CHARS))}
NEWLINE_ID = VOCAB["\n"]


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


# --------------------------------------------------------------------------- tokenizer


def make_tokenizer():
    """The family's character-level tokenizer (a ``PreTrainedTokenizerFast``).

    One token per character of printable ASCII plus newline; ``<s>`` is prepended to
    every encoded text; padding on the left (generation).
    """
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


def _save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    # transformers 5 writes its own class name; 4.x only knows PreTrainedTokenizerFast,
    # which 5.x also maps to the tokenizers backend.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------ model


def _make_model(cfg: FamilyConfig, seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        # Training windows are short, but lm-eval sizes contexts from this: 2048 (as
        # Llama-1) leaves room for the Open LLM Leaderboard's 256-token gsm8k answers.
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG
        model = LlamaForCausalLM(config)
    # Our own init from an explicit generator: independent of transformers' init code.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, NEWLINE_ID],  # an answer is one line
        pad_token_id=PAD_ID,
        do_sample=False,
        max_new_tokens=16,
    )
    return model.float()


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
    from dareflow.demo.skills import generate_answers

    scores = {}
    for name, probe in probes.items():
        for kind in ("raw", "qa"):
            pairs = probe[kind]
            extra = {"suppress_tokens": probe["suppress"]} if kind == "qa" else {}
            got = generate_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens=8, **extra)
            scores[f"{name} {kind}"] = sum(g == a for g, (_, a) in zip(got, pairs)) / len(pairs)
    return scores


def _pretrain(model, tokenizer, cfg, skills, seed, say) -> tuple[list[float], dict]:
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
    cfg = _resolve_config(size)
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


def _finetune(model, cfg, skill, skills, rng, say) -> list[float]:
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


def delta_stats(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict[str, float]:
    """Statistics of ``|tuned - base|`` over all float tensors (float32).

    Returns:
        ``max_abs``, ``mean_abs``, ``p50``/``p90``/``p99``/``p999`` of ``|δ|``,
        ``zero_fraction`` (exact zeros) and ``numel``.
    """
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise KeyError(f"base and fine-tune differ in tensor names {missing[:5]}; not homologous.")
    flat = torch.cat([(tuned[k].float() - base[k].float()).abs().flatten() for k in sorted(base)])
    qs = torch.quantile(flat.double(), torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=torch.float64))
    return {
        "max_abs": float(flat.max()),
        "mean_abs": float(flat.mean()),
        "p50": float(qs[0]),
        "p90": float(qs[1]),
        "p99": float(qs[2]),
        "p999": float(qs[3]),
        "zero_fraction": float((flat == 0).double().mean()),
        "numel": int(flat.numel()),
    }


# ------------------------------------------------------------------------ cache, files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(cfg: FamilyConfig, seed: int, skills: Sequence[Skill]) -> dict:
    return {
        "build_version": BUILD_VERSION,
        "seed": seed,
        "skills": [s.name for s in skills],
        "config": json.loads(json.dumps(asdict(cfg))),  # tuples -> lists, as in the file
    }


def load_family(out_dir: str | Path, *, check_hashes: bool = True) -> dict | None:
    """The manifest of a complete family in ``out_dir``, or None if it is missing/broken.

    With ``check_hashes`` every listed file must exist with the recorded sha256.
    """
    root = Path(out_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file() or (check_hashes and _sha256(path) != digest):
            return None
    return manifest


def _save_model(model, tokenizer, folder: Path) -> None:
    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a shard bar per tiny file is noise in the demo
    try:
        model.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _save_tokenizer(tokenizer, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _resolve_config(size: str | FamilyConfig) -> FamilyConfig:
    if isinstance(size, FamilyConfig):
        return size
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(
            f"unknown family size {size!r}: use one of {sorted(SIZES)} or a FamilyConfig."
        ) from None


# ------------------------------------------------------------------------------ build


def build_demo_family(
    out_dir: str | Path,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    size: str | FamilyConfig = "demo",
    skills: Sequence[str] = ("arithmetic", "reverse"),
    threads: int = 1,
    force: bool = False,
) -> dict[str, Path]:
    """Build (or reuse) the demo family: a base and one SFT fine-tune per skill.

    Args:
        out_dir: Folder for the family; created if missing. Only the ``base`` and
            skill sub-folders and ``family.json`` are written.
        seed: Seed of the whole build (init, corpus, fine-tune data).
        progress: Called with one line per stage / every few hundred steps.
        size: ``"demo"`` (default), ``"tiny"`` (seconds, for tests) or a FamilyConfig.
        skills: Names in ``SKILLS``; one fine-tune per skill.
        threads: torch intra-op threads while building (restored after). 1 (default)
            is robust: on a busy shared 2-core machine 2 threads ran 10x *slower* per
            step (OpenMP barriers); on an idle one they are ~1.6x faster. Here 1 and 2
            threads gave byte-identical families; only the same count is guaranteed to.
        force: Rebuild even if a matching family is already there.

    Returns:
        ``{"base": Path, skill name: Path, ...}``, each a Hugging Face model folder
        (config.json, model.safetensors, tokenizer files, generation_config.json).
    """
    say = progress or (lambda msg: None)
    cfg = _resolve_config(size)
    if isinstance(skills, str):
        skills = (skills,)
    chosen = [get_skill(s) for s in skills]
    if not chosen or len({s.name for s in chosen}) != len(chosen) or BASE in {s.name for s in chosen}:
        raise ValueError(f"skills={list(skills)!r} must be distinct names from {sorted(SKILLS)}.")
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1.")
    root = Path(out_dir)
    fingerprint = _fingerprint(cfg, seed, chosen)
    names = [BASE, *(s.name for s in chosen)]
    paths = {name: root / name for name in names}

    if not force:
        manifest = load_family(root)
        if manifest is not None and all(manifest.get(k) == v for k, v in fingerprint.items()):
            say(f"reusing the demo family in {root} (seed {seed}, build {BUILD_VERSION})")
            return paths

    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # no stale manifest while rebuilding
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        tokenizer = make_tokenizer()
        model = _make_model(cfg, seed)
        n_params = sum(p.numel() for p in model.parameters())
        say(
            f"building the demo family in {root}: Llama {cfg.num_layers} layers x {cfg.hidden_size} "
            f"hidden, {n_params:,} parameters, vocab {len(VOCAB)}, skills {[s.name for s in chosen]}"
        )
        base_losses, pretrain_log = _pretrain(model, tokenizer, cfg, chosen, seed, say)
        losses = {BASE: base_losses}
        _save_model(model, tokenizer, paths[BASE])
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stats = {}
        for skill in chosen:
            model.load_state_dict(base_state)
            rng = random.Random(f"{seed}/finetune/{skill.name}")
            losses[skill.name] = _finetune(model, cfg, skill, chosen, rng, say)
            stats[skill.name] = delta_stats(base_state, model.state_dict())
            s = stats[skill.name]
            say(
                f"fine-tune {skill.name}: |delta| max {s['max_abs']:.4f} p50 {s['p50']:.5f} "
                f"p99 {s['p99']:.4f}, exact zeros {s['zero_fraction']:.1%}"
            )
            _save_model(model, tokenizer, paths[skill.name])
    finally:
        torch.set_num_threads(old_threads)

    files = {
        f"{name}/{f.name}": _sha256(f)
        for name in names
        for f in sorted(paths[name].iterdir())
        if f.is_file()
    }
    manifest = {
        **fingerprint,
        "models": {name: name for name in names},
        "parameters": n_params,
        "vocab_size": len(VOCAB),
        "delta_stats": stats,
        "pretrain": pretrain_log,
        "final_loss": {k: sum(v[-20:]) / len(v[-20:]) for k, v in losses.items()},
        "build_seconds": round(time.perf_counter() - t0, 1),
        "threads": threads,
        "files": files,
    }
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.rename(root / MANIFEST)
    say(f"demo family ready in {root} ({manifest['build_seconds']:.0f} s)")
    return paths


__all__ = [
    "BASE",
    "BUILD_VERSION",
    "MANIFEST",
    "SIZES",
    "FamilyConfig",
    "build_demo_family",
    "continue_pretraining",
    "corpus_line",
    "delta_stats",
    "encode",
    "load_family",
    "make_tokenizer",
    "probe_accuracy",
    "replay_line",
]
