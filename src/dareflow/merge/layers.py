"""Plan: group a checkpoint's tensor names into units of work, whatever the architecture.

One unit is one Prefect task: the embeddings, each transformer layer, then everything
else (final norm, output head, pooler, classification heads). A unit's tensors are read,
merged and written together, so peak memory is one layer times the number of models.

Layers are found by a dotted component ``layers.N``, ``layer.N``, ``h.N`` or
``blocks.N`` anywhere in the name (``model.layers.3.``, ``transformer.h.11.``,
``bert.encoder.layer.0.``, ``blocks.2.``); ``heads.1.`` or ``block_h.1.`` are not layers.
An encoder-decoder or a multimodal model with several stacks puts layer N of every stack
in the same unit (correct, just a larger unit).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

UnitKind = Literal["embeddings", "layer", "final"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")

# Dotted components that mark a tensor as part of the input embeddings; `embeddings`
# covers BERT-style `embeddings.{word,position,token_type}_embeddings` and
# `embeddings.LayerNorm`.
_EMBEDDING_COMPONENTS = frozenset(
    {
        "embeddings",
        "embed_tokens",
        "embed_positions",
        "embed_in",
        "tok_embeddings",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "wte",
        "wpe",
    }
)


@dataclass(frozen=True)
class Unit:
    """A group of tensors merged and written together.

    Attributes:
        name: Stable, filesystem-safe name: ``embeddings``, ``layer_000``, ...,
            ``final``.
        kind: ``"embeddings"``, ``"layer"`` or ``"final"``.
        index: The layer index for ``kind == "layer"``, else ``None``.
        tensors: The tensor names, sorted.
    """

    name: str
    kind: UnitKind
    index: int | None
    tensors: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("embeddings", "layer", "final"):
            raise ValueError(
                f"unit kind must be 'embeddings', 'layer' or 'final', got {self.kind!r}"
            )
        if (self.kind == "layer") != (self.index is not None):
            raise ValueError(
                f"unit {self.name!r}: a layer unit needs an index and other units none "
                f"(kind={self.kind!r}, index={self.index!r})"
            )


def unit_name(kind: UnitKind, index: int | None = None) -> str:
    """The unit name for a kind and layer index (``layer_007``, ``embeddings``)."""
    return f"layer_{index:03d}" if kind == "layer" else kind


def classify(name: str) -> tuple[UnitKind, int | None]:
    """Which unit a tensor belongs to.

    Args:
        name: A tensor name such as ``model.layers.3.mlp.up_proj.weight``.

    Returns:
        ``("layer", N)``, ``("embeddings", None)`` or ``("final", None)``.
    """
    match = _LAYER.search(name)
    if match:
        return "layer", int(match.group(1))
    if _EMBEDDING_COMPONENTS.intersection(name.split(".")):
        return "embeddings", None
    return "final", None


def plan_units(names: Iterable[str]) -> list[Unit]:
    """Group tensor names into units: embeddings, layers in ascending order, final.

    Args:
        names: Tensor names (duplicates are ignored), usually ``base.tensors``.

    Returns:
        The non-empty units in order; tensors inside each unit are sorted.
    """
    groups: dict[tuple[int, int], list[str]] = {}
    for name in set(names):
        kind, index = classify(name)
        # Sort key: embeddings first, then layers by index, then final.
        key = {"embeddings": (0, 0), "layer": (1, index or 0), "final": (2, 0)}[kind]
        groups.setdefault(key, []).append(name)
    units = []
    for (order, index), tensors in sorted(groups.items()):
        kind: UnitKind = ("embeddings", "layer", "final")[order]  # type: ignore[assignment]
        layer_index = index if kind == "layer" else None
        units.append(Unit(unit_name(kind, layer_index), kind, layer_index, tuple(sorted(tensors))))
    return units
