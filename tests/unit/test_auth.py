"""Query tokens: only a verified, unexpired token of the right issuer and audience yields a Principal."""

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pipeline.auth import AuthError, Principal, TokenVerifier, mint_token
from pipeline.settings import DEV_HS256_SECRET, QuerySettings
from schemas.queries import ErrorCode

SECRET = "unit-test-secret-that-is-long-enough-0123456789"


@pytest.fixture
def cfg():
    return QuerySettings(hs256_secret=SECRET)


def code_of(verifier, token):
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    return info.value.code


def test_round_trip(cfg):
    token = mint_token(cfg, tenant="acme", user="alice", groups=["ops", "eng", "ops"])
    assert TokenVerifier(cfg).verify(token) == Principal("acme", "alice", ("ops", "eng"))


def test_missing_or_malformed_token_is_unauthenticated(cfg):
    v = TokenVerifier(cfg)
    assert code_of(v, None) == ErrorCode.UNAUTHENTICATED
    assert code_of(v, "") == ErrorCode.UNAUTHENTICATED
    assert code_of(v, "not.a.jwt") == ErrorCode.UNAUTHENTICATED
    assert code_of(v, "garbage") == ErrorCode.UNAUTHENTICATED


def test_expired_token(cfg):
    token = mint_token(cfg, tenant="acme", user="alice", ttl_seconds=-60)
    assert code_of(TokenVerifier(cfg), token) == ErrorCode.TOKEN_EXPIRED


def test_leeway_tolerates_small_skew(cfg):
    token = mint_token(cfg, tenant="acme", user="alice", ttl_seconds=-2)
    assert TokenVerifier(cfg).verify(token).user == "alice"


def test_wrong_secret_issuer_or_audience(cfg):
    v = TokenVerifier(cfg)
    other = QuerySettings(hs256_secret="another-secret-that-is-long-enough-0123456789")
    assert code_of(v, mint_token(other, tenant="acme", user="a")) == ErrorCode.UNAUTHENTICATED
    assert (
        code_of(v, mint_token(cfg.model_copy(update={"issuer": "evil"}), tenant="acme", user="a"))
        == ErrorCode.UNAUTHENTICATED
    )
    assert (
        code_of(v, mint_token(cfg.model_copy(update={"audience": "x"}), tenant="acme", user="a"))
        == ErrorCode.UNAUTHENTICATED
    )


def test_required_claims(cfg):
    v = TokenVerifier(cfg)
    now = int(time.time())
    base = {"sub": "alice", "tenant": "acme", "iss": cfg.issuer, "aud": cfg.audience, "exp": now + 60}
    for missing in ("sub", "tenant", "exp", "iss", "aud"):
        claims = {k: val for k, val in base.items() if k != missing}
        assert code_of(v, jwt.encode(claims, SECRET, algorithm="HS256")) == ErrorCode.UNAUTHENTICATED, missing
    for bad in ({"tenant": "ac/me"}, {"groups": "ops"}, {"groups": [1]}, {"sub": ""}, {"tenant": ["acme"]}):
        token = jwt.encode({**base, **bad}, SECRET, algorithm="HS256")
        assert code_of(v, token) == ErrorCode.UNAUTHENTICATED, bad


def test_unsigned_and_unexpected_algorithms_are_refused(cfg):
    now = int(time.time())
    claims = {"sub": "a", "tenant": "acme", "iss": cfg.issuer, "aud": cfg.audience, "exp": now + 60}
    v = TokenVerifier(cfg)
    assert code_of(v, jwt.encode(claims, None, algorithm="none")) == ErrorCode.UNAUTHENTICATED
    assert code_of(v, jwt.encode(claims, SECRET * 2, algorithm="HS512")) == ErrorCode.UNAUTHENTICATED


def rsa_pair():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def test_rs256_with_a_public_key_and_no_algorithm_confusion(tmp_path):
    private, public = rsa_pair()
    path = tmp_path / "pub.pem"
    path.write_text(public)
    cfg = QuerySettings(hs256_secret="", public_key=str(path))
    v = TokenVerifier(cfg)
    token = mint_token(cfg, tenant="acme", user="bob", groups=["g"], private_key=private)
    assert v.verify(token) == Principal("acme", "bob", ("g",))
    # with only a public key configured, no HS256 token is accepted, whatever secret signed it
    now = int(time.time())
    claims = {"sub": "a", "tenant": "acme", "iss": cfg.issuer, "aud": cfg.audience, "exp": now + 60}
    assert code_of(v, jwt.encode(claims, "x" * 64, algorithm="HS256")) == ErrorCode.UNAUTHENTICATED
    other_private, _ = rsa_pair()
    wrong = mint_token(cfg, tenant="acme", user="bob", private_key=other_private)
    assert code_of(v, wrong) == ErrorCode.UNAUTHENTICATED


def test_settings_need_a_key_and_a_long_secret():
    with pytest.raises(ValueError):
        QuerySettings(hs256_secret="", public_key=None)
    with pytest.raises(ValueError):
        QuerySettings(hs256_secret="short")
    assert TokenVerifier(QuerySettings()).uses_dev_secret
    assert QuerySettings().hs256_secret.get_secret_value() == DEV_HS256_SECRET


def test_query_settings_from_the_environment(monkeypatch):
    from pipeline.settings import Settings

    monkeypatch.setenv("VECTORSTREAM_QUERY__HS256_SECRET", SECRET)
    monkeypatch.setenv("VECTORSTREAM_QUERY__MAX_TOP_K", "20")
    s = Settings(_env_file=None)
    assert s.query.max_top_k == 20 and not TokenVerifier(s.query).uses_dev_secret
    assert SECRET not in repr(s)
    token = mint_token(s.query, tenant="acme", user="alice")
    assert TokenVerifier(s.query).verify(token).tenant_id == "acme"
