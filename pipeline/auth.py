"""Query tokens: verify a caller's signed JWT into a Principal (tenant, user, groups), and mint dev tokens.

The tenant and principals of a query come only from a verified token, never from the request body.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import TypeAdapter, ValidationError

from pipeline.errors import ConfigurationError
from pipeline.settings import DEV_HS256_SECRET, HMAC_ALGORITHMS, RSA_ALGORITHMS, QuerySettings
from schemas.events import PrincipalId, TenantId
from schemas.queries import ErrorCode

MAX_GROUPS = 256
#: the time claims; each must be a JSON number when present (PyJWT alone also takes numeric strings)
TIME_CLAIMS = ("exp", "iat", "nbf")

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


def _public_key_algorithms(pem: str) -> tuple[Any, tuple[str, ...]]:
    """The loaded public key and the algorithms its type can verify (never HMAC: no algorithm confusion)."""
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ConfigurationError(f"query.public_key is not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        alg = by_curve.get(key.curve.name)
        if alg is None:
            raise ConfigurationError(f"query.public_key: curve {key.curve.name} is not supported")
        return key, (alg,)
    raise ConfigurationError(f"query.public_key: a {type(key).__name__} is not supported (RSA or EC)")


def accepted_keys(settings: QuerySettings) -> dict[str, Any]:
    """Algorithm -> key, from configuration only: HS256 when a secret is in effect, the public key's algorithms
    when one is configured, narrowed by ``query.algorithms``. Raises ConfigurationError when nothing could verify
    a token, when an algorithm is listed without its key, or when the development secret is configured outside
    ``query.dev_mode``."""
    secret = settings.hs256_key()
    if secret == DEV_HS256_SECRET and not settings.dev_mode:
        raise ConfigurationError(
            "query.hs256_secret is the development secret printed in the source: anyone could mint tokens "
            "with it. Set a secret of your own (32+ random bytes) or a public key, or set query.dev_mode "
            "(VECTORSTREAM_QUERY__DEV_MODE=true) on a laptop"
        )
    keys: dict[str, Any] = {}
    if secret:
        for alg in HMAC_ALGORITHMS:
            keys[alg] = secret.encode()
    if settings.public_key:
        public, algorithms = _public_key_algorithms(_read_key(settings.public_key))
        for alg in algorithms:
            keys[alg] = public
    if settings.algorithm_list:
        missing = [alg for alg in settings.algorithm_list if alg not in keys]
        if missing:
            raise ConfigurationError(
                f"query.algorithms lists {missing} but no key for them is configured "
                "(HS256 needs query.hs256_secret, RS*/PS* an RSA query.public_key, ES* an EC one)"
            )
        keys = {alg: keys[alg] for alg in settings.algorithm_list}
    if not keys:
        raise ConfigurationError(
            "no key verifies query tokens: set query.public_key or query.hs256_secret (or query.dev_mode on a laptop)"
        )
    return keys


class TokenVerifier:
    """Checks signature, ``exp`` (required, numeric, within ``query.max_token_lifetime_seconds``), ``iat`` and
    ``nbf`` (numeric when present), ``iss``, ``aud`` and the claims ``sub``, ``tenant``, ``groups``.

    The accepted algorithms follow configuration (:func:`accepted_keys`), never the token: an HS256 token is
    checked with the secret only, an RS/ES token with the public key only (no algorithm confusion). Building a
    verifier raises ConfigurationError for a configuration that must not serve (see :func:`accepted_keys`).
    """

    def __init__(self, settings: QuerySettings, *, clock: Any = time.time) -> None:
        self._settings = settings
        self._keys = accepted_keys(settings)
        self._clock = clock
        self.uses_dev_secret = settings.hs256_key() == DEV_HS256_SECRET and "HS256" in self._keys

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def verify(self, token: str | None) -> Principal:
        if not token:
            raise AuthError(ErrorCode.UNAUTHENTICATED, "no token: the request must carry a signed token")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise AuthError(ErrorCode.UNAUTHENTICATED, f"malformed token: {exc}") from None
        if not isinstance(alg, str) or alg not in self._keys:
            raise AuthError(ErrorCode.UNAUTHENTICATED, f"token algorithm {alg!r} is not accepted here")
        key = self._keys[alg]
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
        self._check_lifetime(claims)
        return _principal_from(claims)

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        times: dict[str, float] = {}
        for name in TIME_CLAIMS:
            if name not in claims:
                continue
            value = claims[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AuthError(ErrorCode.UNAUTHENTICATED, f"invalid token: {name} must be a number (NumericDate)")
            times[name] = float(value)
        s = self._settings
        cap = s.max_token_lifetime_seconds
        start = times.get("iat", self._clock())
        if times["exp"] - start > cap + (0 if "iat" in times else s.leeway_seconds):
            raise AuthError(
                ErrorCode.UNAUTHENTICATED,
                f"invalid token: its lifetime exceeds the limit of {cap} s (query.max_token_lifetime_seconds)",
            )


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
    """A token for development and tests: HS256 with the secret in effect (:meth:`QuerySettings.hs256_key`), or
    ``algorithm`` with ``private_key`` (PEM inline or a path). A negative ``ttl_seconds`` mints an already
    expired token."""
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
    secret = settings.hs256_key()
    if not secret:
        raise ValueError("no HS256 secret configured (nor query.dev_mode): pass a private key to mint a token")
    return jwt.encode(claims, secret, algorithm="HS256")
