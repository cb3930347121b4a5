"""Mirror model sources into the artifact store once per revision: one model, or every model
of a recipe.

:func:`mirror_source` pins a source (:func:`dareflow.sources.resolve.resolve`), copies the files
a merge needs into ``{store_uri}/sources/{safe_id}/{revision}/`` and commits a
``_COMPLETE.json`` marker last; a later call that finds a valid marker downloads nothing.

Store layout (README, "Artifact store and caching")::

    {store}/sources/{safe_id}/{revision}/<files>, _COMPLETE.json   one folder per revision
    {store}/sources/{safe_id}/refs/{branch}.json                   last sha seen (offline)

A local source with a local store is read in place (no copy) unless ``copy_local=True``.
The Hub token (``HF_TOKEN``) is sent to the Hub only; it is never logged or written.

For a recipe, :func:`source_specs` lists its models (base first), :func:`mirror_model` mirrors
one and returns a redacted record, and :func:`collect_sources` joins the records into what
planning needs. Mask keys keep using the recipe's ``model`` strings, never the mirrored URIs, so
one recipe gives the same bytes wherever its inputs were mirrored.

No Prefect here: the merge flow's tasks (``dareflow.tasks.merge``) wrap :func:`mirror_model` and
:func:`collect_sources`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from dareflow.io import storage
from dareflow.io.s3 import redact
from dareflow.recipe import Recipe, fine_tunes
from dareflow.sources.resolve import (
    ResolvedSource,
    hub_endpoint,
    hub_token,
    resolve,
    select_files,
)
from dareflow.sources.spec import COMMIT_SHA, Source, parse_source
from dareflow.sources.store import Store, json_bytes
from dareflow.sources.transfer import copy_all, reader_for

__all__ = [
    "MARKER",
    "MirrorResult",
    "collect_sources",
    "mirror",
    "mirror_model",
    "mirror_source",
    "source_specs",
]

logger = logging.getLogger(__name__)

MARKER = "_COMPLETE.json"
MARKER_FORMAT = 1


@dataclass(frozen=True)
class MirrorResult:
    """Where a source lives in the store and what it holds.

    Attributes:
        uri: the folder to read the model from (a store folder, or the source folder itself for
            a local source used in place).
        source: the pinned source.
        files: ``{"name", "size", "sha256"}`` per mirrored file (from the marker; empty when
            used in place, where nothing was hashed).
        cached: True when a complete mirror was found and nothing was downloaded.
        in_place: True for a local source read where it is.
    """

    uri: str
    source: ResolvedSource
    files: tuple[dict, ...] = ()
    cached: bool = False
    in_place: bool = False


def mirror(
    source: Source | str,
    store_uri: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    allow_pickle: bool = False,
    copy_local: bool = False,
    source_options: dict | None = None,
    store_options: dict | None = None,
) -> str:
    """Mirror ``source`` into ``store_uri`` once and return the mirrored folder's URI.

    See :func:`mirror_source` for the arguments; this returns only ``.uri``.
    """
    return mirror_source(
        source, store_uri, token=token, endpoint=endpoint, allow_pickle=allow_pickle,
        copy_local=copy_local, source_options=source_options, store_options=store_options,
    ).uri


def pin_source(src: Source, store: Store, *, token: str | None, endpoint: str,
               source_options: dict[str, Any] | None = None) -> MirrorResult | ResolvedSource:
    """What ``src`` is pinned to: a mirrored copy the store already holds, else ``src``
    resolved to a revision. Used by :func:`mirror_source` and by the pre-flight
    (:mod:`dareflow.sources.headers`), so both take the same decisions in the same order.

    A Hub commit sha already mirrored needs no network at all; with ``HF_HUB_OFFLINE=1`` or
    the Hub unreachable, the revision last mirrored for the requested one is used.

    Raises:
        ConnectionError: the Hub is unreachable and nothing is mirrored for ``src``.
        FileNotFoundError, PermissionError, OSError: see :func:`resolve`.
    """
    base = store.join("sources", src.safe_id)
    if src.kind == "hub" and src.revision and COMMIT_SHA.match(src.revision):
        hit = check_marker(store, storage.join(base, src.revision))
        if hit is not None:
            return hit
    try:
        if src.kind == "hub" and _env_flag("HF_HUB_OFFLINE"):
            raise ConnectionError("HF_HUB_OFFLINE=1")
        return resolve(src, token=token, endpoint=endpoint, storage_options=source_options)
    except ConnectionError as exc:
        hit = _offline_hit(store, base, src) if src.kind == "hub" else None
        if hit is None:
            raise
        logger.warning("%s: Hub not reachable (%s); using the mirror of %s", src.id, exc,
                       hit.source.revision)
        return hit


def mirror_source(
    source: Source | str,
    store_uri: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    allow_pickle: bool = False,
    copy_local: bool = False,
    source_options: dict | None = None,
    store_options: dict | None = None,
) -> MirrorResult:
    """Copy a source's allowed files to ``{store_uri}/sources/{safe_id}/{revision}/`` once.

    Steps: pin the revision (:func:`resolve`); if that folder has a ``_COMPLETE.json`` whose
    listed files all exist with the listed sizes, return it (nothing downloaded). Otherwise
    stream each selected file into the folder, each written atomically through
    :func:`dareflow.io.storage.open_write_atomic` (temp file + rename locally, one complete PUT on
    S3) after its size and hash are checked against the source, and write the marker (file
    list, sizes, sha256, pinned revision) last. Readers trust a folder only with its marker, so
    a killed mirror is redone, never used half-written; two concurrent mirrors of one revision
    write identical bytes and either marker is valid.

    A local source with a local store is used in place (nothing copied; ``in_place=True``)
    unless ``copy_local`` is set or pickle weights must be converted. With
    ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, a Hub source whose requested
    revision was mirrored before is served from the store (the sha is read from
    ``sources/{safe_id}/refs/{revision}.json``). A spec pinned to a 40-hex commit sha that is
    already mirrored makes no network request at all.

    Args:
        source: a spec (see :func:`parse_source`) or a :class:`Source`.
        store_uri: the store root (local path, ``file://`` or ``s3://``).
        token: Hub token; default ``HF_TOKEN``. Sent only to the Hub; never logged or written.
        endpoint: Hub endpoint; default ``HF_ENDPOINT`` or https://huggingface.co.
        allow_pickle: convert pickle-only checkpoints (trusted sources only).
        copy_local: mirror local sources even into a local store.
        source_options, store_options: fsspec options for s3 URIs (default: the AWS
            environment variables through :func:`dareflow.io.s3.storage_options_for`).

    Returns:
        A :class:`MirrorResult`.

    Raises:
        ValueError: pickle-only source without ``allow_pickle``; bad spec.
        FileNotFoundError, PermissionError, ConnectionError, OSError: see :func:`resolve` and
            :mod:`dareflow.io.storage` (messages name the URI or repo).
    """
    src = parse_source(source) if isinstance(source, str) else source
    token = hub_token(token)
    endpoint = hub_endpoint(endpoint)
    store = Store(store_uri, store_options)
    base = store.join("sources", src.safe_id)
    pinned = pin_source(src, store, token=token, endpoint=endpoint,
                        source_options=source_options)
    if isinstance(pinned, MirrorResult):
        return pinned
    resolved = pinned
    selection = select_files(resolved, allow_pickle=allow_pickle)

    if src.kind == "local" and store.local and not copy_local and not selection.pickles:
        logger.info("%s: local source used in place (revision %s)", src.id, resolved.revision)
        return MirrorResult(src.id, resolved, in_place=True)

    dest = storage.join(base, resolved.revision)
    hit = check_marker(store, dest, resolved)
    if hit is not None:
        _write_ref(store, base, resolved)
        return hit

    t0 = time.monotonic()
    with reader_for(resolved, token=token, endpoint=endpoint, options=source_options) as reader:
        records, converted = copy_all(reader, selection, store, dest)
    marker = {
        "format": MARKER_FORMAT,
        "source": {
            "kind": resolved.kind,
            "id": resolved.id,
            "revision": resolved.revision,
            "requested_revision": resolved.requested_revision,
            "spec": resolved.spec,
        },
        "files": records,
        "converted_from_pickle": converted,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write(storage.join(dest, MARKER), json_bytes(redact(marker, [token or ""])))
    _write_ref(store, base, resolved)
    total = sum(r["size"] for r in records)
    logger.info("%s: mirrored %d files (%.1f MB) to %s in %.1f s", resolved.where, len(records),
                total / 1e6, dest, time.monotonic() - t0)
    return MirrorResult(dest, resolved, tuple(records), cached=False)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_marker(
    store: Store, dest: str, resolved: ResolvedSource | None = None
) -> MirrorResult | None:
    """The mirror at ``dest`` if its marker exists and every listed file has its listed size.

    Sizes, not hashes: re-hashing gigabytes on every run would defeat the cache; the sha256 in
    the marker is for manifests and for anyone who wants a full check.
    """
    marker_uri = storage.join(dest, MARKER)
    raw = store.read(marker_uri)
    if raw is None:
        return None
    try:
        marker = json.loads(raw)
        files = [{"name": str(r["name"]), "size": int(r["size"]), "sha256": str(r["sha256"])}
                 for r in marker["files"]]
        src = marker["source"]
        ok = marker.get("format") == MARKER_FORMAT
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        logger.warning("%s: unreadable or unknown marker; mirroring again", marker_uri)
        return None
    bad = [f["name"] for f in files if store.size(storage.join(dest, f["name"])) != f["size"]]
    if bad:
        logger.warning("%s: %d listed files missing or resized (%s); mirroring again",
                       dest, len(bad), ", ".join(bad[:5]))
        return None
    if resolved is None:
        resolved = ResolvedSource(src["kind"], src["id"], src["revision"], (),
                                  src.get("requested_revision"), src.get("spec", ""))
    return MirrorResult(dest, resolved, tuple(files), cached=True)


def _ref_uri(base: str, requested: str) -> str:
    return storage.join(base, "refs", quote(requested, safe="") + ".json")


def _write_ref(store: Store, base: str, resolved: ResolvedSource) -> None:
    """Remember which commit a branch/tag pointed to (for offline runs)."""
    if resolved.kind != "hub" or not resolved.requested_revision:
        return
    store.write(_ref_uri(base, resolved.requested_revision),
                json_bytes({"requested_revision": resolved.requested_revision,
                            "revision": resolved.revision}))


def _offline_hit(store: Store, base: str, src: Source) -> MirrorResult | None:
    raw = store.read(_ref_uri(base, src.revision or "main"))
    if raw is None:
        return None
    try:
        revision = json.loads(raw)["revision"]
    except (ValueError, KeyError, TypeError):
        return None
    return check_marker(store, storage.join(base, revision))


# -- a recipe's models ---------------------------------------------------------------------------


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
    """Mirror one model into the store (see :func:`mirror_source`).

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
    result = mirror_source(spec["model"], store_uri, allow_pickle=bool(spec.get("allow_pickle")))
    src = result.source
    secrets = [hub_token() or ""]
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
