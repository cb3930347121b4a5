"""Where each model of a recipe is read from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import Recipe, fine_tunes


def _local_uri(model: str) -> str:
    path = Path(model[len("file://"):] if model.startswith("file://") else model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model '{model}' is not a local folder ({path.resolve()} does not exist); "
            "give the path of a Hugging Face model folder (config.json + *.safetensors)"
        )
    return str(path.resolve())


def resolve_local_sources(recipe: Recipe) -> dict[str, Any]:
    """Resolve every model of ``recipe`` to a local checkpoint folder.

    Returns:
        ``{"base_uri": str | None, "model_uris": {model id: uri}, "sources": [...]}``
        where ``sources`` is what the model card records.

    Raises:
        FileNotFoundError: a model is not an existing local folder.
    """
    base_uri = _local_uri(recipe.base_model) if recipe.base_model else None
    model_uris = {m.model: _local_uri(m.model) for m in fine_tunes(recipe)}
    sources = []
    if recipe.base_model:
        sources.append({"role": "base", "model": recipe.base_model, "uri": base_uri,
                        "kind": "local", "revision": None})
    sources += [{"role": "fine-tuned", "model": mid, "uri": uri, "kind": "local",
                 "revision": None} for mid, uri in model_uris.items()]
    return {"base_uri": base_uri, "model_uris": model_uris, "sources": sources}
