"""Model source specs: what a recipe's ``model`` string means.

A source is a Hugging Face Hub repo id (``org/name[@revision]``, or ``hf://org/name`` to force
the Hub), an ``s3://`` prefix or a local folder. :func:`parse_source` turns the string the user
wrote into a :class:`Source`, whose :attr:`Source.safe_id` names its folder in the store.
Parsing only: nothing here reads the network (``dareflow.sources.resolve`` pins a source to a
revision).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["COMMIT_SHA", "Source", "SourceKind", "parse_source"]

SourceKind = Literal["hub", "s3", "local"]

# Hub repo ids: "org/name"; letters, digits, "-", "_", "."; no "--" or ".."; <= 96 chars.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
# A full commit sha: a Hub revision that is already pinned (no lookup needed).
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Source:
    """A parsed source spec.

    Attributes:
        kind: ``hub``, ``s3`` or ``local``.
        id: ``org/name`` (hub), ``s3://bucket/prefix`` without trailing slash (s3), or an
            absolute local path (local).
        revision: the requested Hub revision (branch, tag or sha); None means ``main``.
            Always None for s3 and local.
        spec: the string the user wrote.
    """

    kind: SourceKind
    id: str
    revision: str | None = None
    spec: str = ""

    @property
    def safe_id(self) -> str:
        """A path-safe, human-readable, collision-free name for the store layout."""
        if self.kind == "hub":
            base = "hf--" + self.id.replace("/", "--")
        elif self.kind == "s3":
            base = "s3--" + self.id[len("s3://"):].replace("/", "--")
        else:
            # The folder name alone could collide; the hash of the full path cannot.
            digest = hashlib.sha256(self.id.encode()).hexdigest()[:12]
            base = f"local--{Path(self.id).name}--{digest}"
        base = re.sub(r"[^A-Za-z0-9._-]", "_", base)
        if len(base) > 120:
            base = base[:100] + "--" + hashlib.sha256(base.encode()).hexdigest()[:16]
        return base


def parse_source(spec: str) -> Source:
    """Parse a model source spec.

    Rules, in order:

    1. ``s3://bucket/prefix`` (or ``s3a://``) → S3 prefix.
    2. ``hf://org/name[@revision]`` → Hub, always (forces the Hub when a local folder of the same
       name exists).
    3. ``file://...``, or a path starting with ``/``, ``./``, ``../`` or ``~`` → local folder.
    4. A relative path that is an existing folder → local (an existing folder wins over the Hub).
    5. A relative path without ``@`` whose parent is an existing folder (``models/base``
       where ``models/`` exists) → local, so it must exist: a mistyped folder is never
       fetched from the Hub as the repo it happens to spell (``hf://models/base`` or
       ``models/base@main`` mean the Hub).
    6. ``org/name`` or ``org/name@revision`` (Hub id syntax) → Hub.
    7. Anything else → ``ValueError`` naming the accepted forms.

    Raises:
        ValueError: unsupported scheme, malformed repo id or revision, or a bare name that is
            neither a local folder nor ``org/name``.
        FileNotFoundError: an explicit local path that does not exist or is not a folder.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model source must be a non-empty string, got {spec!r}")
    s = spec.strip()
    scheme = urlsplit(s).scheme.lower() if "://" in s else ""
    if scheme in ("s3", "s3a"):
        rest = s.split("://", 1)[1].strip("/")
        if not rest or rest.startswith("/"):
            raise ValueError(f"S3 source {spec!r} has no bucket; write s3://bucket/prefix")
        return Source("s3", "s3://" + rest, None, spec)
    if scheme == "hf":
        return _parse_hub(s.split("://", 1)[1], spec)
    if scheme == "file":
        return _local(urlsplit(s).path, spec, explicit=True)
    if scheme:
        raise ValueError(
            f"unsupported model source scheme {scheme!r} in {spec!r}; use a Hub id (org/name or "
            "org/name@revision), s3://bucket/prefix, or a local folder (./path, /path, file://)"
        )
    if s.startswith(("/", "./", "../", "~")) or s in (".", ".."):
        return _local(s, spec, explicit=True)
    if Path(s).is_dir():
        return _local(s, spec, explicit=False)
    parent = Path(s).parent
    if "@" not in s and parent != Path(".") and parent.is_dir():  # `@rev`: a Hub id
        raise FileNotFoundError(
            f"local model folder {spec!r} does not exist (resolved to "
            f"{Path(s).expanduser().resolve()}; its parent {parent}/ is a folder here, so it "
            f"is read as a path); check the path, or write hf://{s} for the Hub repo"
        )
    if _REPO_ID.match(s.split("@", 1)[0]):
        return _parse_hub(s, spec)
    if Path(s).exists():
        raise FileNotFoundError(f"model source {spec!r} is a file; point at the model folder")
    raise ValueError(
        f"model source {spec!r} is neither an existing local folder nor a Hub repo id; write "
        f"./{s} for a folder relative to {os.getcwd()}, org/name[@revision] for the Hub, or "
        "s3://bucket/prefix"
    )


def _parse_hub(text: str, spec: str) -> Source:
    repo_id, _, revision = text.partition("@")
    repo_id = repo_id.strip("/")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or len(repo_id) > 96:
        raise ValueError(
            f"invalid Hub repo id {repo_id!r} in {spec!r}: expected org/name with letters, "
            "digits, '-', '_', '.' (no '--' or '..', at most 96 characters)"
        )
    if "@" in text and not revision:
        raise ValueError(f"empty revision after '@' in {spec!r}; write org/name@<branch|tag|sha>")
    return Source("hub", repo_id, revision or None, spec)


def _local(path: str, spec: str, explicit: bool) -> Source:
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(
            f"local model folder {spec!r} does not exist (resolved to {p}); check the path "
            "(relative paths are resolved against the working directory)"
        )
    if not p.is_dir():
        raise FileNotFoundError(f"local model source {spec!r} is a file; point at the folder")
    return Source("local", str(p), None, spec)
