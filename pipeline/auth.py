"""Query tokens: verify a caller's signed JWT into a Principal (tenant, user, groups), and mint dev tokens.

The tenant and principals of a query come only from a verified token, never from the request body.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from pydantic import TypeAdapter, ValidationError

from pipeline.settings import DEV_HS256_SECRET, QuerySettings
from schemas.events import PrincipalId, TenantId
from schemas.queries import ErrorCode

#: asymmetric algorithms accepted with ``query.public_key``; HS256 only with ``query.hs256_secret``
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
MAX_GROUPS = 256

_tenant = TypeAdapter(TenantId)
_principal = TypeAdapter(PrincipalId)


@dataclass(frozen=True)
class Principal:
    """Who is asking: from a verified token only."""

    tenant_id: str
    user: str
    groups: tuple[str, ...] = ()


class AuthError(Exception):
    """A token that does not let its bearer query: ``code`` is ``unauthenticated`` or ``token_expired``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _read_key(value: str) -> str:
    """A PEM given inline, or the path of a file holding one."""
    if "-----BEGIN" in value:
        return value
    return Path(value).expanduser().read_text()


class TokenVerifier:
    """Checks signature, ``exp`` (required), ``iss``, ``aud`` and the claims ``sub``, ``tenant``, ``groups``.

    The algorithm is chosen by which key is configured, never by the token alone: an HS256 token is checked
    with the secret only, an RS/ES token with the public key only (no algorithm confusion).
    """

    def __init__(self, settings: QuerySettings) -> None:
        self._settings = settings
        secret = settings.hs256_secret.get_secret_value()
        self._keys: dict[str, Any] = {}
        if secret:
            self._keys["HS256"] = secret.encode()
        if settings.public_key:
            public = _read_key(settings.public_key)
            for alg in ASYMMETRIC_ALGORITHMS:
                self._keys[alg] = public
        self.uses_dev_secret = secret == DEV_HS256_SECRET

    def verify(self, token: str | None) -> Principal:
        if not token:
            raise AuthError(ErrorCode.UNAUTHENTICATED, "no token: the request must carry a signed token")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise AuthError(ErrorCode.UNAUTHENTICATED, f"malformed token: {exc}") from None
        key = self._keys.get(alg) if isinstance(alg, str) else None
        if key is None:
            raise AuthError(ErrorCode.UNAUTHENTICATED, f"token algorithm {alg!r} is not accepted here")
        s = self._settings
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_seconds,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "the token has expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(ErrorCode.UNAUTHENTICATED, f"invalid token: {exc}") from None
        return _principal_from(claims)


def _principal_from(claims: dict[str, Any]) -> Principal:
    tenant, user, groups = claims.get("tenant"), claims.get("sub"), claims.get("groups", [])
    try:
        tenant = _tenant.validate_python(tenant, strict=True)
        user = _principal.validate_python(user, strict=True)
        if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
            raise ValueError(f"groups must be a list of at most {MAX_GROUPS} ids")
        groups = tuple(dict.fromkeys(_principal.validate_python(g, strict=True) for g in groups))
    except (ValidationError, ValueError) as exc:
        raise AuthError(ErrorCode.UNAUTHENTICATED, f"token claims are not valid: {exc}") from None
    return Principal(tenant_id=tenant, user=user, groups=groups)


def mint_token(
    settings: QuerySettings,
    *,
    tenant: str,
    user: str,
    groups: Sequence[str] = (),
    ttl_seconds: float | None = None,
    private_key: str | None = None,
    algorithm: str | None = None,
    now: float | None = None,
) -> str:
    """A token for development and tests: HS256 with the configured secret, or ``algorithm`` with
    ``private_key`` (PEM inline or a path). A negative ``ttl_seconds`` mints an already expired token."""
    issued = int(time.time() if now is None else now)
    ttl = settings.dev_token_ttl_seconds if ttl_seconds is None else ttl_seconds
    claims = {
        "sub": user,
        "tenant": tenant,
        "groups": list(groups),
        "iss": settings.issuer,
        "aud": settings.audience,
        "iat": issued,
        "exp": int(issued + ttl),
    }
    if private_key is not None:
        return jwt.encode(claims, _read_key(private_key), algorithm=algorithm or "RS256")
    secret = settings.hs256_secret.get_secret_value()
    if not secret:
        raise ValueError("no HS256 secret configured: pass a private key to mint a token")
    return jwt.encode(claims, secret, algorithm="HS256")
