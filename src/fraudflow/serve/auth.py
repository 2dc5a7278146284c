"""API keys: ``Authorization: Bearer <key>``, client keys and admin keys.

Keys come from ``FRAUDFLOW_API_KEYS`` / ``FRAUDFLOW_ADMIN_KEYS`` (comma-separated) and the files
named by ``FRAUDFLOW_API_KEYS_FILE`` / ``FRAUDFLOW_ADMIN_KEYS_FILE`` (one key per line, ``#``
comments). An admin key is also a client key.

Only SHA-256 digests of the keys are kept, and a presented key is compared with every digest
using ``hmac.compare_digest`` without stopping at the first match, so the time taken does not
tell which key (or how much of one) matched. Keys never reach logs or metrics: nothing here
formats one into a string.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from fraudflow.errors import ConfigError
from fraudflow.serve.settings import ServeSettings

__all__ = ["NO_VALID_KEY", "ApiKeys", "Role", "bearer_token", "load_api_keys"]

Role = Literal["client", "admin"]
# The 401 detail (sent with ``WWW-Authenticate: Bearer``) of every route that needs a key.
NO_VALID_KEY = "missing or invalid API key"
_BEARER = "bearer "


@dataclass(frozen=True)
class ApiKeys:
    clients: tuple[bytes, ...]  # SHA-256 digests; admins included
    admins: tuple[bytes, ...]
    open_access: bool = False  # --insecure-no-auth: every caller is an admin

    def role(self, token: str | None) -> Role | None:
        """The role of a presented key, or None for a missing or unknown one."""
        if self.open_access:
            return "admin"
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        if _matches_any(digest, self.admins):
            return "admin"
        return "client" if _matches_any(digest, self.clients) else None

    def role_of_header(self, authorization: str | None) -> Role | None:
        """``role`` of the key in an ``Authorization`` header value."""
        return self.role(bearer_token(authorization))


def _matches_any(digest: bytes, known: tuple[bytes, ...]) -> bool:
    found = False
    for candidate in known:  # no early exit: constant time in which key matched
        found |= hmac.compare_digest(digest, candidate)
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value; None otherwise."""
    if authorization is None or authorization[: len(_BEARER)].lower() != _BEARER:
        return None
    return authorization[len(_BEARER) :].strip() or None


def load_api_keys(settings: ServeSettings) -> ApiKeys:
    """The configured keys; ``ConfigError`` when none are (unless --insecure-no-auth)."""
    admins = _keys(settings.admin_keys, settings.admin_keys_file)
    clients = _keys(settings.api_keys, settings.api_keys_file) | admins
    if settings.insecure_no_auth:
        return ApiKeys(clients=(), admins=(), open_access=True)
    if not clients:
        raise ConfigError(
            "no API keys are configured (the key settings are empty): set FRAUDFLOW_API_KEYS "
            "and FRAUDFLOW_ADMIN_KEYS, or pass --insecure-no-auth"
        )
    return ApiKeys(clients=_digests(clients), admins=_digests(admins))


def _keys(inline: SecretStr | None, file: Path | None) -> set[str]:
    keys = set()
    if inline is not None:
        keys |= {k.strip() for k in inline.get_secret_value().split(",")}
    if file is not None:
        try:
            lines = file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"API key file {file} cannot be read: {exc.strerror}") from None
        keys |= {line.split("#", 1)[0].strip() for line in lines}
    return {k for k in keys if k}


def _digests(keys: set[str]) -> tuple[bytes, ...]:
    return tuple(sorted(hashlib.sha256(k.encode()).digest() for k in keys))
