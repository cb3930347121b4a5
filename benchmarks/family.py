"""A synthetic model family of a real architecture, cached on disk.

Base: random Llama weights (normal, std 0.02; norms 1). Fine-tunes: base + Gaussian
deltas of std 0.002 (the size of SFT deltas, DARE paper Sec. 4), every tensor. All
three are written with transformers' ``save_pretrained`` in bfloat16, so both dareflow
and mergekit read exactly what they would read from the Hub.

Weights come from a local ``torch.Generator`` per (model, tensor), so the family is
the same bytes on every machine and every run.

A family too large to hold in memory (the 7B-shaped one: ~14.5 GB per model) is written
``streamed``: one tensor at a time straight into ``model.safetensors`` (the same values,
one file per model), with the config ``save_pretrained`` writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: Written last into a family folder; its presence (with the same spec) means "done".
DONE_NAME = "family.json"

BASE_STD = 0.02
DELTA_STD = 0.002


@dataclass(frozen=True)
class FamilySpec:
    """Shape of a Llama family (defaults: the ~0.84 B benchmark family)."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 16
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    fine_tunes: int = 2
    seed: int = 0

    @property
    def name(self) -> str:
        """Folder name: the shape plus a short hash of the whole spec."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"llama-h{self.hidden}-l{self.layers}-{digest[:8]}"

    def num_params(self) -> int:
        """Parameters of one model (untied embeddings and head)."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h


def _config(spec: FamilySpec):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=spec.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def _generator(spec: FamilySpec, model: str, tensor: str) -> torch.Generator:
    digest = hashlib.sha256(f"{spec.seed}/{model}/{tensor}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _base_tensor(spec: FamilySpec, name: str, shape: torch.Size) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    noise = torch.randn(shape, generator=_generator(spec, "base", name))
    return noise.mul_(BASE_STD).to(torch.bfloat16)


def family_paths(root: str | os.PathLike, spec: FamilySpec) -> dict[str, Path]:
    """``{"base": ..., "ft0": ..., "ft1": ...}`` folders of the family under ``root``."""
    folder = Path(root) / spec.name
    paths = {"base": folder / "base"}
    paths.update({f"ft{k}": folder / f"ft{k}" for k in range(spec.fine_tunes)})
    return paths


def _tensor(spec: FamilySpec, role: str, name: str, shape: torch.Size) -> torch.Tensor:
    """One tensor of one model: the base's, or base + delta for a fine-tune (bf16)."""
    base = _base_tensor(spec, name, shape)
    if role == "base":
        return base
    delta = torch.randn(shape, generator=_generator(spec, role, name))
    return delta.mul_(DELTA_STD).add_(base).to(torch.bfloat16)


def write_streamed(folder: Path, spec: FamilySpec, role: str) -> None:
    """Write one model of the family tensor by tensor: ``config.json`` and one
    ``model.safetensors`` (header first, from the shapes; then each tensor's bytes), so
    no more than one tensor is in memory."""
    from transformers import LlamaForCausalLM

    config = _config(spec)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    config.architectures = ["LlamaForCausalLM"]  # as the model's save_pretrained writes it
    config.save_pretrained(folder)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes.items():
            f.write(_tensor(spec, role, name, shape).view(torch.int16).numpy().tobytes())


def generate_family(root: str | os.PathLike, spec: FamilySpec = FamilySpec(), *,
                    log=print, streamed: bool = False) -> dict[str, Path]:
    """Write the family once; later calls return the cached folders.

    Args:
        root: Cache folder (``.bench/`` of the repository by default in the script).
        spec: The architecture and seed.
        log: Where progress lines go.
        streamed: Write tensor by tensor (:func:`write_streamed`; the same values), for
            families larger than memory.

    Returns:
        The model folders by role (``base``, ``ft0``, ``ft1``, ...).
    """
    from transformers import LlamaForCausalLM

    paths = family_paths(root, spec)
    folder = paths["base"].parent
    done = folder / DONE_NAME
    if done.exists() and json.loads(done.read_text()) == asdict(spec):
        return paths
    if folder.exists():
        shutil.rmtree(folder)
    log(f"generating the {spec.num_params() / 1e9:.2f} B-parameter family in {folder} (once)")
    if streamed:
        for role, path in paths.items():
            write_streamed(path, spec, role)
            log(f"  wrote {path}")
        done.write_text(json.dumps(asdict(spec), sort_keys=True))
        return paths
    with torch.device("meta"):
        model = LlamaForCausalLM(_config(spec))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    base: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            base[name] = _base_tensor(spec, name, param.shape)
            param.copy_(base[name])
        model.save_pretrained(paths["base"])
        log(f"  wrote {paths['base']}")
        for k in range(spec.fine_tunes):
            role = f"ft{k}"
            for name, param in model.named_parameters():
                delta = torch.randn(param.shape, generator=_generator(spec, role, name))
                param.copy_(delta.mul_(DELTA_STD).add_(base[name]))
            model.save_pretrained(paths[role])
            log(f"  wrote {paths[role]}")
    done.write_text(json.dumps(asdict(spec), sort_keys=True))
    return paths
