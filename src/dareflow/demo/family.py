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

This module builds, saves and reuses the family folder (model init, manifest,
fingerprints); ``FamilyConfig`` and the training loops are in ``dareflow.demo.train``,
the character vocabulary and tokenizer in ``dareflow.demo.vocab``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from dareflow.demo.skills import SKILLS, Skill, get_skill
from dareflow.demo.train import FamilyConfig, finetune, pretrain, resolve_config
from dareflow.demo.vocab import BOS_ID, EOS_ID, NEWLINE_ID, PAD_ID, VOCAB, make_tokenizer

#: Bump when anything that changes the built files changes (corpus, training, init, config).
BUILD_VERSION = 2

MANIFEST = "family.json"
BASE = "base"


# ------------------------------------------------------------------------------ model


def _make_model(cfg: FamilyConfig, seed: int):
    # transformers takes seconds to import: only when a model is built
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


def _save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    # transformers 5 writes its own class name; 4.x only knows PreTrainedTokenizerFast,
    # which 5.x also maps to the tokenizers backend.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_model(model, tokenizer, folder: Path) -> None:
    from transformers.utils import logging as hf_logging  # heavy: only when saving

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
    cfg = resolve_config(size)
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
        base_losses, pretrain_log = pretrain(model, tokenizer, cfg, chosen, seed, say)
        losses = {BASE: base_losses}
        save_model(model, tokenizer, paths[BASE])
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stats = {}
        for skill in chosen:
            model.load_state_dict(base_state)
            rng = random.Random(f"{seed}/finetune/{skill.name}")
            losses[skill.name] = finetune(model, cfg, skill, chosen, rng, say)
            stats[skill.name] = delta_stats(base_state, model.state_dict())
            s = stats[skill.name]
            say(
                f"fine-tune {skill.name}: |delta| max {s['max_abs']:.4f} p50 {s['p50']:.5f} "
                f"p99 {s['p99']:.4f}, exact zeros {s['zero_fraction']:.1%}"
            )
            save_model(model, tokenizer, paths[skill.name])
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
    "build_demo_family",
    "delta_stats",
    "load_family",
    "save_model",
]
