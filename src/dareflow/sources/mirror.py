"""Where each model of a recipe is read from: mirrored into the artifact store.

Every model (Hub repo id, ``s3://`` prefix or local folder) goes through
``dareflow.sources.download.mirror_source``: pinned to a revision (a Hub commit sha, a hash of S3
ETags, a hash of local file stats), copied once into ``{store}/sources/{safe_id}/{rev}/``
and reused by later runs. A local folder with a local store is read in place.

Mask keys keep using the recipe's ``model`` strings, never the mirrored URIs, so one
recipe gives the same bytes wherever its inputs were mirrored.
"""

from __future__ import annotations

from typing import Any

from dareflow.io.s3 import redact
from dareflow.recipe import Recipe, fine_tunes
from dareflow.sources import download


def source_specs(recipe: Recipe) -> list[dict[str, Any]]:
    """The models to mirror, base first: ``{"role", "model", "allow_pickle"}`` each.

    The base model takes ``allow_pickle`` from a ``models:`` entry naming it, if any.
    """
    entries = {m.model: m for m in recipe.models}
    specs = []
    if recipe.base_model:
        entry = entries.get(recipe.base_model)
        specs.append({"role": "base", "model": recipe.base_model,
                      "allow_pickle": bool(entry and entry.allow_pickle)})
    specs += [{"role": "fine-tuned", "model": m.model, "allow_pickle": m.allow_pickle}
              for m in fine_tunes(recipe)]
    return specs


def mirror_model(spec: dict[str, Any], store_uri: str) -> dict[str, Any]:
    """Mirror one model into the store (see ``dareflow.sources.download.mirror_source``).

    Args:
        spec: One item of ``source_specs``.
        store_uri: The artifact store root.

    Returns:
        ``{"role", "model", "kind", "id", "requested_revision", "revision", "uri",
        "cached", "in_place"}``: ``uri`` is the folder the merge reads (the mirror, or
        the local folder itself); every value is redacted (no credentials, no tokens).

    Raises:
        ValueError: a pickle-only source without ``allow_pickle``, or a bad spec.
        FileNotFoundError, PermissionError, ConnectionError, OSError: the source or the
            store cannot be read or written (the message names which).
    """
    result = download.mirror_source(spec["model"], store_uri,
                                    allow_pickle=bool(spec.get("allow_pickle")))
    src = result.source
    secrets = [download.hub_token() or ""]
    return redact({
        "role": spec["role"],
        "model": spec["model"],
        "kind": src.kind,
        "id": src.id,
        "requested_revision": src.requested_revision,
        "revision": src.revision,
        "uri": result.uri,
        "cached": result.cached,
        "in_place": result.in_place,
    }, secrets)


def collect_sources(recipe: Recipe, mirrored: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the mirrored models into what planning needs.

    Args:
        recipe: The recipe.
        mirrored: ``mirror_model`` results, in ``source_specs`` order.

    Returns:
        ``{"base_uri": str | None, "model_uris": {recipe model string: uri},
        "sources": [...]}``; ``sources`` is what the model card and manifest record
        (role, model, kind, id, requested and pinned revision, mirrored URI).

    Raises:
        KeyError: a model of the recipe has no mirrored entry.
    """
    by_role = {(m["role"], m["model"]): m for m in mirrored}

    def uri_of(role: str, model: str) -> str:
        try:
            return by_role[(role, model)]["uri"]
        except KeyError:
            raise KeyError(
                f"model '{model}' ({role}) was not mirrored; mirror every item of "
                "source_specs(recipe) before planning"
            ) from None

    base_uri = uri_of("base", recipe.base_model) if recipe.base_model else None
    model_uris = {m.model: uri_of("fine-tuned", m.model) for m in fine_tunes(recipe)}
    keys = ("role", "model", "kind", "id", "requested_revision", "revision", "uri")
    sources = [{k: m.get(k) for k in keys} for m in mirrored]
    return {"base_uri": base_uri, "model_uris": model_uris, "sources": sources}


