"""Secrets never leave the process: redact keys, values and URLs before they are logged.

A key is secret when one of its words is token/secret/password/key/... (`hf_token`,
`db.password`, `authToken`), but not `tokenizer` or `tokens_per_s`. A value is secret
when it is the value of a secret-looking environment variable, looks like a known
token format (hf_..., ghp_..., sk-..., AKIA..., a JWT), or is the user:password part
of a URL. What goes to MLflow (params, tags, JSON artifacts, error messages) passes
through here first.
"""
from __future__ import annotations

import os
import re
from typing import Any

from depthtune.errors import first_line

REDACTED = "<redacted>"

_SECRET_WORDS = {"token", "secret", "password", "passwd", "key", "apikey", "credential", "credentials",
                 "auth", "authorization"}
_SECRET_SUFFIXES = ("token", "secret", "password", "apikey", "accesskey")
_SECRET_VALUE_RE = re.compile(
    r"(hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{20,}|sk-[A-Za-z0-9_-]{16,}"
    r"|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+)")
_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@")


def is_secret_key(key: str) -> bool:
    """`hf_token`, `API_KEY`, `db.password`, `authToken` -> True; `tokenizer`, `tokens_per_s` -> False."""
    # split on punctuation and on camelCase humps: "authToken" -> ["auth", "Token"]
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])", str(key)) if w]
    return any(w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words)


def _secret_env_values() -> list[str]:
    # shorter values would redact ordinary words ("1", "true") everywhere
    return [v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= 6]


def safe_uri(uri: str) -> str:
    """`https://bob:hunter2@host/x` -> `https://<redacted>@host/x`."""
    return _URL_CREDENTIALS_RE.sub(lambda m: m.group("scheme") + REDACTED + "@", uri)


def redact_text(text: str) -> str:
    """Remove env secrets, known token formats and URL credentials from a string."""
    for v in _secret_env_values():
        if v in text:
            text = text.replace(v, REDACTED)
    return safe_uri(_SECRET_VALUE_RE.sub(REDACTED, text))


def redact(obj: Any) -> Any:
    """Deep copy of a JSON-like object with secret-looking keys and values redacted."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and obj[k] not in (None, "", False) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def describe_error(exc: BaseException) -> str:
    """`ConnectionError: first line of the message`, redacted and at most 300 characters: safe to log."""
    kind, text = type(exc).__name__, first_line(exc, limit=300)
    return redact_text(kind if text == kind else f"{kind}: {text}"[:300])  # an empty message: just the type
