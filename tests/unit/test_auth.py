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


def test_no_key_no_dev_secret_outside_dev_mode_and_a_long_secret():
    from pipeline.errors import ConfigurationError

    with pytest.raises(ValueError):
        QuerySettings(hs256_secret="short")
    # nothing configured: nothing can verify a token, so a query worker must not start
    assert QuerySettings().hs256_key() == ""
    with pytest.raises(ConfigurationError, match="no key"):
        TokenVerifier(QuerySettings())
    # the secret printed in the source is refused unless development mode says so ...
    with pytest.raises(ConfigurationError, match="development secret"):
        TokenVerifier(QuerySettings(hs256_secret=DEV_HS256_SECRET))
    # ... also next to a public key (the outsider's token of the issue was HS256 with that secret)
    _, public = rsa_pair()
    with pytest.raises(ConfigurationError, match="development secret"):
        TokenVerifier(QuerySettings(hs256_secret=DEV_HS256_SECRET, public_key=public))
    dev = QuerySettings(dev_mode=True)
    assert dev.hs256_key() == DEV_HS256_SECRET and TokenVerifier(dev).uses_dev_secret
    assert TokenVerifier(dev).verify(mint_token(dev, tenant="acme", user="a")).tenant_id == "acme"
    # an explicit secret wins over dev mode
    assert not TokenVerifier(QuerySettings(hs256_secret=SECRET, dev_mode=True)).uses_dev_secret


def test_a_token_signed_with_the_dev_secret_is_refused_by_a_configured_worker():
    _, public = rsa_pair()
    v = TokenVerifier(QuerySettings(public_key=public))
    outsider = mint_token(QuerySettings(dev_mode=True), tenant="acme", user="mallory", groups=["admins"])
    assert v.algorithms == ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    assert code_of(v, outsider) == ErrorCode.UNAUTHENTICATED


def test_the_algorithm_allow_list_follows_configuration():
    from pipeline.errors import ConfigurationError

    private, public = rsa_pair()
    both = QuerySettings(hs256_secret=SECRET, public_key=public)
    assert set(TokenVerifier(both).algorithms) == {"HS256", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    only_rs256 = both.model_copy(update={"algorithms": "RS256"})
    v = TokenVerifier(only_rs256)
    assert v.algorithms == ("RS256",)
    assert code_of(v, mint_token(both, tenant="acme", user="a")) == ErrorCode.UNAUTHENTICATED  # HS256 now off
    assert code_of(v, mint_token(both, tenant="acme", user="a", private_key=private, algorithm="PS256")) == (
        ErrorCode.UNAUTHENTICATED
    )
    assert v.verify(mint_token(both, tenant="acme", user="a", private_key=private)).user == "a"
    with pytest.raises(ConfigurationError, match="no key for them"):
        TokenVerifier(QuerySettings(hs256_secret=SECRET, algorithms="RS256"))
    with pytest.raises(ConfigurationError, match="not a PEM public key"):
        TokenVerifier(QuerySettings(public_key="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"))


def test_es256_public_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    cfg = QuerySettings(public_key=public)
    v = TokenVerifier(cfg)
    assert v.algorithms == ("ES256",)
    assert v.verify(mint_token(cfg, tenant="acme", user="e", private_key=private, algorithm="ES256")).user == "e"


def test_token_lifetime_is_capped_and_time_claims_are_numbers(cfg):
    v = TokenVerifier(cfg)
    now = int(time.time())
    base = {"sub": "alice", "tenant": "acme", "iss": cfg.issuer, "aud": cfg.audience}

    def signed(**claims):
        return jwt.encode({**base, **claims}, SECRET, algorithm="HS256")

    assert v.verify(signed(iat=now, exp=now + 24 * 3600)).user == "alice"
    assert v.verify(signed(exp=now + 3600)).user == "alice"  # no iat: counted from now
    for bad in (
        {"iat": now, "exp": 253402300799},  # the year 9999
        {"exp": 253402300799},
        {"iat": now, "exp": now + 24 * 3600 + 1},
        {"iat": now - 48 * 3600, "exp": now + 60},  # issued long ago, still a 48 h token
        {"exp": str(now + 60)},  # a numeric string: PyJWT alone accepts it
        {"iat": str(now), "exp": now + 60},
        {"nbf": str(now), "exp": now + 60},
        {"exp": True},
        {"exp": now + 60, "iat": [now]},
    ):
        assert code_of(v, signed(**bad)) in (ErrorCode.UNAUTHENTICATED, ErrorCode.TOKEN_EXPIRED), bad
        assert code_of(v, signed(**bad)) == ErrorCode.UNAUTHENTICATED or bad == {"exp": True}, bad
    short = TokenVerifier(cfg.model_copy(update={"max_token_lifetime_seconds": 600}))
    assert code_of(short, signed(iat=now, exp=now + 601)) == ErrorCode.UNAUTHENTICATED
    assert short.verify(signed(iat=now, exp=now + 600)).user == "alice"
    with pytest.raises(ValueError):
        QuerySettings(hs256_secret=SECRET, max_token_lifetime_seconds=600, dev_token_ttl_seconds=3600)


def test_query_settings_from_the_environment(monkeypatch):
    from pipeline.settings import Settings

    monkeypatch.setenv("VECTORSTREAM_QUERY__HS256_SECRET", SECRET)
    monkeypatch.setenv("VECTORSTREAM_QUERY__MAX_TOP_K", "20")
    s = Settings(_env_file=None)
    assert s.query.max_top_k == 20 and not TokenVerifier(s.query).uses_dev_secret
    assert SECRET not in repr(s)
    token = mint_token(s.query, tenant="acme", user="alice")
    assert TokenVerifier(s.query).verify(token).tenant_id == "acme"
