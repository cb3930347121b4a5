"""One parity case's outputs and their comparison (see ``benchmarks/parity_compare.py``
for the bounds): model folders read into memory, then structure (tensor names, shapes,
dtypes, ``vocab_size``, ``tie_word_embeddings``, vocabulary, chat template) and values."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.merge_vs_mergekit import _tensor_files
from benchmarks.parity_compare import (
    VOCAB_TENSORS,
    DareSummary,
    Exact,
    align_rows,
    chat_template_difference,
    dare_tensor,
    delta_ratio,
    rescale_rel,
    vocab_difference,
)

#: methods without randomness: compared element by element
DETERMINISTIC = ("linear", "task_arithmetic", "ties")


# ----------------------------------------------------------------------------- outputs


@dataclass
class Model:
    """A model folder's tensors, config and vocabulary (token -> id)."""

    tensors: dict[str, torch.Tensor]
    config: dict
    vocab: dict[str, int] | None
    chat_template: str | None = None
    files: list[str] = field(default_factory=list)
    # added tokens of tokenizer.json: content -> special (how they decode)
    added: dict[str, bool] = field(default_factory=dict)


def _vocab(folder: Path) -> dict[str, int] | None:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True) \
        if path.exists() else None


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    return json.loads(cfg.read_text()).get("chat_template") if cfg.exists() else None


def load_model(folder: Path) -> Model:
    """Read a model folder (single file or sharded safetensors)."""
    from safetensors import safe_open

    tensors = {}
    for name, path in _tensor_files(folder).items():
        with safe_open(str(path), "pt") as f:
            tensors[name] = f.get_tensor(name)
    tok = folder / "tokenizer.json"
    added = {t["content"]: bool(t.get("special")) for t in
             json.loads(tok.read_text()).get("added_tokens", [])} if tok.exists() else {}
    return Model(tensors, json.loads((folder / "config.json").read_text()), _vocab(folder),
                 _chat_template(folder), sorted(p.name for p in folder.iterdir()), added)


def _input(model: Model, name: str) -> torch.Tensor | None:
    # a tied head is the embedding (what mergekit loads through tied_names)
    if name not in model.tensors and name == "lm_head.weight":
        return model.tensors.get("model.embed_tokens.weight")
    return model.tensors.get(name)


# ----------------------------------------------------------------------------- compare


@dataclass
class Verdict:
    ok: bool
    verdict: str
    agreement: str
    norm: str = "—"
    details: list[str] = field(default_factory=list)


def _structure(df: Model, mk: Model) -> list[str]:
    problems = []
    missing, extra = sorted(set(mk.tensors) - set(df.tensors)), sorted(set(df.tensors) - set(mk.tensors))
    if missing:
        problems.append(f"tensors missing in dareflow's output: {missing}")
    if extra:
        problems.append(f"tensors only in dareflow's output: {extra}")
    for name in sorted(set(df.tensors) & set(mk.tensors)):
        a, b = df.tensors[name], mk.tensors[name]
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} vs mergekit's {tuple(b.shape)}")
        elif a.dtype != b.dtype:
            problems.append(f"{name}: dtype {a.dtype} vs mergekit's {b.dtype}")
    for key in ("vocab_size", "tie_word_embeddings"):
        if df.config.get(key) != mk.config.get(key):
            problems.append(f"config.json {key}: {df.config.get(key)!r} vs mergekit's "
                            f"{mk.config.get(key)!r}")
    if mk.vocab is not None or df.vocab is not None:
        if df.vocab is None:
            problems.append("dareflow's output has no tokenizer.json")
        elif mk.vocab is not None and (diff := vocab_difference(df.vocab, mk.vocab)):
            problems.append(f"vocabulary: {diff}")
        elif mk.vocab is not None and df.added != mk.added:
            problems.append(f"added tokens (content: special): {df.added} vs mergekit's "
                            f"{mk.added}")
    if diff := chat_template_difference(df.chat_template, mk.chat_template):
        problems.append(f"chat template: {diff}")
    embed = df.tensors.get("model.embed_tokens.weight")
    if embed is not None:  # the output's own files must agree with its rows
        rows = embed.shape[0]
        if df.config.get("vocab_size") != rows:
            problems.append(f"dareflow's config.json vocab_size {df.config.get('vocab_size')} "
                            f"!= its {rows} embedding rows")
        if df.vocab and max(df.vocab.values()) >= rows:
            problems.append(f"dareflow's tokenizer has id {max(df.vocab.values())} past its "
                            f"{rows} embedding rows")
    return problems


def compare_case(recipe: dict, df: Model, mk: Model, members: dict[str, Model],
                 ulps: float, sigmas: float) -> Verdict:
    """Compare dareflow's output with mergekit's for one recipe (as written: member names).

    Args:
        recipe: The corpus recipe (its method, base_model and parameters are read).
        df: dareflow's output. mk: mergekit's output.
        members: The family members the recipe names (inputs, for the tolerance and the
            base of the DARE statistics).
        ulps: The deterministic tolerance (float32 ulps of the operands).
        sigmas: The DARE bound (standard deviations of the difference).
    """
    method = recipe.get("merge_method")
    details = _structure(df, mk)
    exact = Exact(ulps=ulps)
    dare = DareSummary(sigmas=sigmas)
    base_name = recipe.get("base_model")
    base = members.get(base_name) if base_name else None
    deterministic = method in DETERMINISTIC
    rescaled = method == "ties" and bool((recipe.get("parameters") or {}).get("rescale"))
    ss_df = ss_mk = 0.0
    out_vocab = mk.vocab if mk.vocab is not None else df.vocab
    for name in sorted(set(df.tensors) & set(mk.tensors)):
        a, b = df.tensors[name].float(), mk.tensors[name].float()
        if a.shape != b.shape:
            continue
        by_token = name in VOCAB_TENSORS and mk.vocab is not None
        inputs, raw = [], []
        for member in members.values():
            t = _input(member, name)
            if t is None:
                continue
            raw.append(t)
            if by_token:
                inputs.append(align_rows(t, member.vocab, out_vocab, a.shape[0]))
            elif t.shape == a.shape:
                inputs.append(t.float())
            elif name in VOCAB_TENSORS:
                inputs.append(align_rows(t, None, None, a.shape[0]))
        if by_token and raw and a.shape[0] > len(out_vocab):
            # padding rows are means of each model's rows: they round like those rows
            pad = torch.full_like(a, float("nan"))
            pad[len(out_vocab):] = torch.stack([t.float().abs().amax(dim=0) for t in raw]).amax(0)
            inputs.append(pad)
        b_in = None
        if base is not None and (t := _input(base, name)) is not None:
            b_in = align_rows(t, base.vocab, out_vocab, a.shape[0]) if by_token else (
                t.float() if t.shape == a.shape else align_rows(t, None, None, a.shape[0]))
        if deterministic or b_in is None:
            rel = rescale_rel(a.numel()) if rescaled else 0.0
            delta = b - b_in if b_in is not None else None
            if not exact.add(name, a, b, inputs, delta, rel) and b_in is not None:
                details.append(f"{name}: merged delta ratio dareflow/mergekit (median) "
                               f"{delta_ratio(a, b, b_in):.4f}")
            if b_in is not None:
                defined = torch.isfinite(b_in)
                ss_df += float(((a - b_in)[defined].double() ** 2).sum())
                ss_mk += float(((b - b_in)[defined].double() ** 2).sum())
            continue
        dare.add(dare_tensor(name, a, b, b_in))
        rows = ~torch.isfinite(b_in).reshape(b_in.shape[0], -1).all(dim=1)
        if bool(rows.any()):  # tokens the base lacks: mergekit copies a row, no DARE
            exact.add(f"{name} rows {rows.nonzero().flatten().tolist()}", a[rows], b[rows],
                      [x[rows] for x in inputs])
    details += exact.worst
    details += dare.failing()
    if deterministic:
        bound = f"{ulps:g} ulp" + (" + L1 rescale rounding" if rescaled else "")
        agreement = (f"max abs diff {exact.max_abs:.2g}; {exact.fraction:.4%} within "
                     f"{bound} (max {exact.max_ulps:.1f} ulp)")
        norm = f"{(ss_df / ss_mk) ** 0.5:.4f}" if ss_mk else "—"
        ok = not details
    else:
        agreement = (f"kept {dare.kept_df:.4f} vs {dare.kept_mk:.4f} (max "
                     f"{dare.max_kept_z:.1f}σ); ‖δ‖² max {dare.max_ss_z:.1f}σ, all "
                     f"{dare.total_ss_z:.1f}σ")
        if exact.elements:
            agreement += f"; new-token rows max diff {exact.max_abs:.2g}"
        norm = f"{dare.norm_ratio:.4f}"
        ok = not details and dare.ok
    return Verdict(ok, "ok" if ok else "FAIL", agreement, norm, details)
