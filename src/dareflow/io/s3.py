"""S3 settings for s3fs: where credentials come from, how they reach s3fs, how they stay secret.

Sources, highest precedence first:

1. a config section (``S3Settings.load({"endpoint_url": ..., ...})``), for team defaults such
   as the endpoint and the addressing style;
2. the standard AWS environment variables: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
   ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
   ``AWS_DEFAULT_REGION`` / ``AWS_REGION``, ``AWS_PROFILE``;
3. whatever botocore finds on its own (``~/.aws``, instance roles) when nothing is set.

Secrets are ``SecretStr``: ``repr``, ``str`` and ``model_dump(mode="json")`` show
``**********``. :func:`redact` scrubs any dict before it is logged or written (manifests,
model cards, markers).

Loopback S3 servers (moto, nanio, Ceph): region goes to botocore's config, never to
``client_kwargs["region_name"]`` (s3fs would send it as a bucket LocationConstraint, which
``us-east-1`` rejects), and addressing is path-style by default whenever an endpoint is set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

__all__ = [
    "REDACTED",
    "S3Settings",
    "explain_s3_error",
    "is_s3_uri",
    "redact",
    "storage_options_for",
    "verify_s3_access",
]

REDACTED = "**********"
S3_SCHEMES = ("s3", "s3a")

# Environment variable → S3Settings field, first one set wins.
_ENV_FIELDS: dict[str, tuple[str, ...]] = {
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    "endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "region": ("AWS_DEFAULT_REGION", "AWS_REGION"),
    "profile": ("AWS_PROFILE",),
}


class S3Settings(BaseModel):
    """How to reach an S3-compatible store.

    Attributes:
        endpoint_url: e.g. ``http://127.0.0.1:9000`` for a local server; None means AWS.
        access_key_id: the key id (an identifier, shown masked in messages).
        secret_access_key: the secret key (never shown).
        session_token: temporary-credential token (never shown).
        region: signing region; None lets botocore decide.
        addressing_style: ``path`` (``endpoint/bucket/key``), ``virtual``
            (``bucket.endpoint/key``) or ``auto``. None means ``path`` when
            ``endpoint_url`` is set (what MinIO/Ceph/moto/nanio need) and ``auto`` otherwise.
        profile: an AWS shared-config profile name, used when no key is given.
        anon: unsigned requests (public buckets).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(default=None, pattern=r"^https?://")
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    region: str | None = None
    addressing_style: Literal["path", "virtual", "auto"] | None = None
    profile: str | None = None
    anon: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Settings from the standard AWS environment variables (unset ones stay None)."""
        return cls.load(None, environ=environ)

    @classmethod
    def load(
        cls,
        section: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> S3Settings:
        """Merge a config section over the AWS environment variables.

        Args:
            section: keys of this model (unknown keys are an error); values that are None
                fall back to the environment.
            environ: defaults to ``os.environ``.

        Raises:
            ValueError: the section has unknown keys or bad values; every problem is listed
                and secret values are never echoed.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variables in _ENV_FIELDS.items():
            for var in variables:
                if env.get(var):
                    values[name] = env[var]
                    break
        values.update({k: v for k, v in (section or {}).items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(section)'}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(
                f"invalid S3 settings: {problems}. Known keys: {', '.join(cls.model_fields)}; "
                "credentials normally come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
            ) from None

    @property
    def effective_addressing_style(self) -> str:
        if self.addressing_style is not None:
            return self.addressing_style
        return "path" if self.endpoint_url else "auto"

    def masked_key_id(self) -> str:
        """The key id with all but its last 4 characters hidden (for messages)."""
        key = self.access_key_id
        if not key:
            return "(none)"
        return "*" * max(len(key) - 4, 0) + key[-4:]

    def describe(self) -> str:
        """A one-line, secret-free description for messages."""
        return (
            f"endpoint={self.endpoint_url or 'AWS default'}, access key id={self.masked_key_id()}, "
            f"secret={'set' if self.secret_access_key else 'not set'}, "
            f"region={self.region or 'botocore default'}, "
            f"addressing={self.effective_addressing_style}"
        )


def is_s3_uri(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` (or ``s3a://``) URI."""
    return urlsplit(str(uri)).scheme.lower() in S3_SCHEMES


def storage_options_for(uri: str, settings: S3Settings | None = None) -> dict[str, Any]:
    """fsspec ``storage_options`` for ``uri``: s3fs keyword arguments, or ``{}`` for other schemes.

    Args:
        uri: any fsspec URI or local path.
        settings: None reads the AWS environment variables (:meth:`S3Settings.from_env`).

    Returns:
        A fresh dict (safe to mutate). It contains plain-text secrets: pass it to fsspec,
        never log or write it (use :func:`redact`).
    """
    if not is_s3_uri(uri):
        return {}
    s = S3Settings.from_env() if settings is None else settings
    opts: dict[str, Any] = {}
    if s.anon:
        opts["anon"] = True
    if s.access_key_id:
        opts["key"] = s.access_key_id
    if s.secret_access_key is not None:
        opts["secret"] = s.secret_access_key.get_secret_value()
    if s.session_token is not None:
        opts["token"] = s.session_token.get_secret_value()
    if s.profile and not s.access_key_id:
        opts["profile"] = s.profile
    if s.endpoint_url:
        opts["endpoint_url"] = s.endpoint_url
    config_kwargs: dict[str, Any] = {}
    if s.effective_addressing_style != "auto":
        config_kwargs["s3"] = {"addressing_style": s.effective_addressing_style}
    if s.region:
        # botocore's Config region == AWS_DEFAULT_REGION. Never client_kwargs["region_name"]:
        # s3fs turns that into a LocationConstraint that loopback servers reject for us-east-1.
        config_kwargs["region_name"] = s.region
    if config_kwargs:
        opts["config_kwargs"] = config_kwargs
    return opts


# ------------------------------------------------------------------------------------------------
# redaction
# ------------------------------------------------------------------------------------------------

# A key is secret when its last word (split on _ - . and camelCase) is one of these, or the whole
# key is in _SECRET_KEYS. "pad_token_id" ends in "id" and survives; "hf_token" does not.
_SECRET_LAST_WORDS = {
    "secret", "token", "password", "passwd", "pwd", "authorization", "credential",
    "credentials", "apikey", "cookie",
}
_SECRET_KEYS = {
    "key", "api_key", "access_key", "secret_key", "private_key", "secret_access_key",
    "aws_secret_access_key", "aws_session_token", "x-amz-security-token", "hf_token",
}
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+")


def _is_secret_key(key: str) -> bool:
    k = key.strip().lower()
    if k in _SECRET_KEYS:
        return True
    words = [w for w in re.split(r"[_\-.\s]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", key)) if w]
    return bool(words) and words[-1].lower() in _SECRET_LAST_WORDS


def redact(obj: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of ``obj`` with secrets replaced by ``**********``, safe to log or write.

    Removes: values under secret-looking keys (``secret``, ``*_token``, ``password``,
    ``authorization``, s3fs's ``key``...), ``SecretStr`` values, credentials embedded in URLs
    (``scheme://user:pass@host``), Hugging Face tokens (``hf_...``), bearer tokens, and every
    occurrence of the given ``secrets`` strings anywhere. Pydantic models are dumped first.

    Args:
        obj: dicts, lists, tuples, sets, strings, pydantic models, scalars (nested freely).
        secrets: extra literal values to scrub (e.g. the token actually used).
    """
    literal = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
    return _redact(obj, literal)


def _redact(obj: Any, literal: list[str]) -> Any:
    if isinstance(obj, SecretStr):
        return REDACTED
    if isinstance(obj, BaseModel):
        return _redact(obj.model_dump(), literal)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and _is_secret_key(k) and v not in (None, "", False):
                out[k] = REDACTED
            else:
                out[_redact(k, literal) if isinstance(k, str) else k] = _redact(v, literal)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_redact(v, literal) for v in obj))
    if isinstance(obj, list | tuple | set | frozenset):
        return type(obj)(_redact(v, literal) for v in obj)
    if isinstance(obj, str):
        s = _URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", obj)
        s = _HF_TOKEN.sub(REDACTED, s)
        s = _BEARER.sub("Bearer " + REDACTED, s)
        for secret in literal:
            s = s.replace(secret, REDACTED)
        return s
    return obj


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def explain_s3_error(exc: BaseException, uri: str, settings: S3Settings | None = None) -> Exception:
    """Turn an s3fs/botocore error into a built-in exception naming the URI and the fix.

    ``PermissionError`` (bad key or secret, 403), ``FileNotFoundError`` (bucket or key missing)
    and ``ConnectionError`` (nothing listening at the endpoint) get a message with the
    endpoint and masked key id; anything else is returned unchanged. Secrets never appear.
    """
    s = S3Settings.from_env() if settings is None else settings
    where = f"{uri} ({s.describe()})"
    text = redact(str(exc), [v.get_secret_value() for v in (s.secret_access_key, s.session_token)
                             if v is not None])
    if isinstance(exc, PermissionError):
        return PermissionError(
            f"access denied to {where}: {text}. Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or the s3 config section) match a user of this endpoint that may access the bucket."
        )
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(
            f"not found: {where}: {text}. Check the bucket and prefix exist on this endpoint "
            "(create the bucket first; s3fs does not create buckets on write)."
        )
    name = type(exc).__name__
    if isinstance(exc, ConnectionError) or "EndpointConnectionError" in name or \
            "ConnectError" in name or "Could not connect" in str(exc):
        return ConnectionError(
            f"cannot reach the S3 endpoint for {where}: {text}. Is the server running, and is "
            "AWS_ENDPOINT_URL (or endpoint_url in the s3 config section) right?"
        )
    return exc if isinstance(exc, Exception) else RuntimeError(text)


def verify_s3_access(uri: str, settings: S3Settings | None = None) -> None:
    """List ``uri``'s bucket once and raise a clear error when that fails.

    Raises:
        PermissionError, FileNotFoundError, ConnectionError: see :func:`explain_s3_error`.
    """
    import fsspec  # local import: this module is also used where only settings are needed

    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    opts = storage_options_for(uri, settings)
    fs, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True, **opts)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except Exception as exc:  # noqa: BLE001 - botocore raises many types; translated
        raise explain_s3_error(exc, uri, settings) from None
