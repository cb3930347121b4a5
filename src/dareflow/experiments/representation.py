"""Representation similarity: how far DARE / DropOnly move a fine-tune's hidden states.

The paper's Figures 6 and 7: for a calibration set of prompts, the cosine similarity,
layer by layer, between the hidden states of a fine-tuned model and of its DARE (or
DropOnly) version at drop rate p. DARE's rescale keeps the expected delta, so its
hidden states stay close to the fine-tune's (~1) at high p; DropOnly shrinks the delta
by (1 − p) and drifts towards the base.

Similarity of layer l: the mean over every non-padding token of every prompt of
``cos(h_l^ft[token], h_l^variant[token])``, where ``h_0`` is the embedding output and
``h_l`` the output of decoder layer l (transformers' ``output_hidden_states``; the last
one is after the final norm).

Models are loaded whole with transformers (a research tool for small models; the merged
variants themselves come from the streaming merge). No Prefect here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from dareflow.delta_stats import save_figure
from dareflow.demo.skills import get_skill, split_items

_IMPORT_LOCK = threading.Lock()


def calibration_prompts(skills: Sequence[str], n: int) -> list[str]:
    """Calibration texts: the first ``n`` VALIDATION items of each demo skill, as
    question and answer (so the states cover the answer tokens too)."""
    texts = []
    for name in skills:
        skill = get_skill(name)
        texts += [skill.prompt(x) + skill.answer(x) for x in split_items(name, "validation", n)]
    return texts


@torch.inference_mode()
def hidden_states(model, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Hidden states of every non-padding token, per layer.

    Returns:
        ``L + 1`` float32 tensors of shape ``[T, H]`` (T = non-padding tokens of all
        prompts, in prompt order; index 0 = embeddings).
    """
    if not prompts:
        raise ValueError("prompts is empty; pass at least one calibration prompt")
    model.eval()
    per_layer: list[list[torch.Tensor]] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True)
        out = model(**enc, output_hidden_states=True)
        keep = enc["attention_mask"].bool()  # [B, S]
        for layer, h in enumerate(out.hidden_states):  # h: [B, S, H]
            if len(per_layer) <= layer:
                per_layer.append([])
            per_layer[layer].append(h[keep].float())
    return [torch.cat(chunks) for chunks in per_layer]


def layer_cosine(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> list[float]:
    """Mean token-wise cosine similarity per layer of two ``hidden_states`` results.

    Raises:
        ValueError: the layer counts or token counts differ (not the same prompts or
            not the same architecture).
    """
    if len(reference) != len(other):
        raise ValueError(f"layer counts differ: {len(reference)} vs {len(other)}; compare a "
                         "model with a merge of the same architecture")
    sims = []
    for layer, (a, b) in enumerate(zip(reference, other)):
        if a.shape != b.shape:
            raise ValueError(f"layer {layer}: hidden states {tuple(a.shape)} vs {tuple(b.shape)}; "
                             "use the same prompts and tokenizer for both models")
        sims.append(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()))
    return sims


def load(model_uri: str):
    """A local HF folder as (model, tokenizer) in float32, padding on the right."""
    # heavy: transformers (~1 s), only when loading a model; under a lock because its lazy
    # imports are not thread-safe (mapped tasks)
    with _IMPORT_LOCK:
        from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_uri, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_uri)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def similarity_rows(reference_uri: str, variants: dict[str, str], prompts: Sequence[str]) -> list[dict]:
    """Per-layer similarity of each variant to the reference model.

    Args:
        reference_uri: The fine-tuned model folder.
        variants: label → merged model folder (e.g. ``"dare p=0.9"``).
        prompts: Calibration texts.

    Returns:
        Rows ``{"variant", "layer", "cosine"}``.
    """
    model, tokenizer = load(reference_uri)
    ref = hidden_states(model, tokenizer, prompts)
    rows = []
    for label, uri in variants.items():
        other_model, _ = load(uri)
        sims = layer_cosine(ref, hidden_states(other_model, tokenizer, prompts))
        rows += [{"variant": label, "layer": i, "cosine": s} for i, s in enumerate(sims)]
        del other_model
    return rows


def plot_similarity(table, uri: str, *, title: str) -> str:
    """Cosine similarity vs layer, one line per variant (Figures 6-7). PNG at ``uri``."""
    # heavy: matplotlib (~0.5 s), only when plotting
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot picks its backend on import

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, rows in table.groupby("variant", sort=False):
        ax.plot(rows["layer"], rows["cosine"], marker="o", label=label)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("mean cosine similarity to the fine-tune")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, uri)
