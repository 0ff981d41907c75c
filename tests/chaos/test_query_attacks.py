"""Hostile query requests against one real worker on Apache Kafka, replaying every case of issue 12 (and the ones
that already held) while two other tenants keep asking valid questions.

The worker is configured as a deployment would be: an RS256 public key, no HS256 secret, no development mode.
Asserted for every attack: the other tenants' valid queries keep getting results within their deadline, no
topic appears, nothing an attacker sends is served (no result for any attack request, no hit for a token signed
with the development secret), no reply to a verified attacker lands outside the attacker's own reply topic, and
no attack ends as an ``internal`` error. A worker given the development secret without dev mode refuses to start.

The counts go to the results file (``record_result``), from which ``python -m tests.chaos.report`` writes the
security table of RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiokafka import AIOKafkaConsumer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pipeline.auth import mint_token
from pipeline.client import QueryClient, read_records
from pipeline.kafka import create_topics
from pipeline.settings import DEV_HS256_SECRET, QuerySettings
from schemas.queries import CORRELATION_HEADER, QueryResult, reply_topic_for
from tests.chaos.harness import Scenario, cleanup, metric, record_result, upsert, wait_consuming

QUESTION = "how do I reset my password"
#: the victims' deadline: each of their queries must be answered within it
VICTIM_DEADLINE = 10.0
TEXT = "To reset your password open the account settings, choose 'Forgot password' and follow the link."


def rsa_pair() -> tuple[str, str]:
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


def corpus() -> list[tuple[bytes, bytes]]:
    """acme: public, user-only (alice), group-only (ops) and no-access documents; globex and mallory: public."""
    records = []
    for i in range(4):
        records.append(upsert("acme", f"acme-public-{i}", 1, f"{TEXT} Public acme guide {i}.", public=True))
        records.append(upsert("acme", f"acme-alice-{i}", 1, f"{TEXT} Alice's acme notes {i}.", users=["alice"]))
        records.append(upsert("acme", f"acme-ops-{i}", 1, f"{TEXT} Ops-only acme runbook {i}.", groups=["ops"]))
        records.append(upsert("acme", f"acme-secret-{i}", 1, f"{TEXT} Nobody's acme file {i}.", public=False))
        records.append(upsert("globex", f"globex-{i}", 1, f"{TEXT} Globex guide {i}.", public=True))
        records.append(upsert("mallory", f"mallory-{i}", 1, f"{TEXT} Mallory's own guide {i}.", public=True))
    return records


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_forged(claims: dict[str, Any], key: bytes, alg: str = "HS256") -> str:
    """An HS256 token keyed with bytes PyJWT refuses to use as a secret (the public key: algorithm confusion)."""
    import hashlib
    import hmac

    signing = f"{b64(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing}.{b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())}"


def unsigned(claims: dict[str, Any], alg: str) -> str:
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}."


@dataclass
class Attack:
    name: str
    #: (token tenant or None when no token verifies, request body)
    requests: list[tuple[str | None, dict[str, Any]]]
    #: what the attack tries, for the table
    what: str = ""


@dataclass
class Arena:
    sc: Scenario
    worker: Any
    private: str
    public: str
    prefix: str
    topics_before: set[str]
    victims: dict[str, QueryClient]
    tokens: dict[str, str]
    #: attack -> victim queries that got no result within their deadline
    lost: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)
    current: str = "warm-up"
    #: request id -> (attack, tenant of a verified token or None)
    sent: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    #: attack -> topics that appeared while it ran
    created: dict[str, list[str]] = field(default_factory=dict)
    #: hits a victim got that it may not read (another tenant's, or an acme document alice may not read)
    leaks: list[str] = field(default_factory=list)

    def claims(self, tenant: str = "mallory", **over: Any) -> dict[str, Any]:
        now = int(time.time())
        return {
            "sub": "mallory",
            "tenant": tenant,
            "groups": [],
            "iss": "vectorstream",
            "aud": "vectorstream-query",
            "iat": now,
            "exp": now + 600,
            **over,
        }

    def rs256(self, **claims: Any) -> str:
        return jwt.encode(self.claims(**claims), self.private, algorithm="RS256")

    def body(self, tenant: str, token: str | None, **over: Any) -> dict[str, Any]:
        return {
            "request_id": uuid.uuid4().hex,
            "tenant_id": tenant,
            "token": token,
            "query": QUESTION,
            "top_k": 10,
            "reply_topic": reply_topic_for(self.prefix, tenant),
            "deadline_ms": int((time.time() + 30) * 1000),
            **over,
        }


@pytest.fixture(scope="module")
async def arena(apache_kafka, tmp_path_factory, settings):
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path_factory.mktemp("attacks"), "attacks", settings).setup()
    private, public = rsa_pair()
    prefix = sc.replies
    with cleanup(sc):
        w = sc.worker(
            {
                "VECTORSTREAM_QUERY__PUBLIC_KEY": public,
                "VECTORSTREAM_QUERY__DEV_MODE": "false",
                "VECTORSTREAM_QUERY__MAX_CONCURRENCY": "2",
                "VECTORSTREAM_QUERY__MAX_QUEUE": "8",
                "VECTORSTREAM_QUERY__REPLY_TOPICS_REFRESH_SECONDS": "1",
                "VECTORSTREAM_QUERY__RECALL_SAMPLE_RATE": "0",
            }
        ).start()
        # the tenants' reply topics exist (a deployment provisions them with their ACLs); nothing else may appear
        await create_topics(sc.bootstrap, {reply_topic_for(prefix, t): 1 for t in ("acme", "globex", "mallory")})
        await wait_consuming(w)
        await sc.produce(corpus())
        await sc.wait_caught_up([w])
        auth = QuerySettings(public_key=public)
        tokens = {
            "acme": mint_token(auth, tenant="acme", user="alice", private_key=private, ttl_seconds=3600),
            "globex": mint_token(auth, tenant="globex", user="bob", private_key=private, ttl_seconds=3600),
        }
        victims = {}
        for tenant, token in tokens.items():
            client = QueryClient(
                sc.bootstrap,
                queries_topic=sc.queries,
                replies_topic=prefix,
                tenant=tenant,
                token=token,
                create_reply_topics=False,
            )
            victims[tenant] = await client.__aenter__()
        try:
            for client in victims.values():  # warm: the model and the index answer once
                assert (await client.ask(QUESTION, timeout=60)).hits
            consumer = AIOKafkaConsumer(bootstrap_servers=sc.bootstrap, group_id=None)
            await consumer.start()
            try:
                before = set(await consumer.topics())
            finally:
                await consumer.stop()
            yield Arena(sc, w, private, public, prefix, before, victims, tokens)
        finally:
            for client in victims.values():
                await client.__aexit__(None, None, None)


def attacks(a: Arena) -> list[Attack]:
    """Every case of issue 12, and the ones that already held, as raw request bodies."""
    p = a.prefix
    out = [
        Attack(
            "no token, missing reply topics",
            [(None, a.body(f"ghost-{i}", None)) for i in range(150)],
            "issue 12.1: the error reply waited 1,200 s for the topic; on Tansu each created a topic",
        ),
        Attack(
            "valid token, missing reply topic",
            [(("mallory"), a.body("mallory", a.rs256(), reply_topic=f"{p}.mallory-{i}")) for i in range(150)],
            "issue 12.1: 272 of them filled every admission slot",
        ),
        Attack(
            "valid token, another tenant's reply topic",
            [("mallory", a.body("mallory", a.rs256(), reply_topic=f"{p}.{t}")) for t in ("acme", "globex") * 10],
            "issue 12.3: replies (with text) written to another tenant's topic",
        ),
        Attack(
            "valid token, another tenant's id",
            [("mallory", a.body(t, a.rs256())) for t in ("acme", "globex") * 10],
            "tenant_mismatch: the token's tenant decides",
        ),
        Attack(
            "development secret (HS256)",
            [
                (None, a.body(t, mint_token(QuerySettings(dev_mode=True), tenant=t, user="x", groups=["ops"])))
                for t in ("acme", "globex", "mallory") * 5
            ],
            "issue 12.2: a token signed with the secret printed in the source",
        ),
        Attack(
            "algorithm confusion and unsigned tokens",
            [
                (None, a.body("acme", jwt.encode(a.claims("acme"), "k" * 64, algorithm="HS256"))),
                (None, a.body("acme", hmac_forged(a.claims("acme"), a.public.encode()))),
                *[(None, a.body("acme", unsigned(a.claims("acme"), alg))) for alg in ("none", "None", "NONE", "nOnE")],
                (None, a.body("acme", a.rs256(tenant="acme").rsplit(".", 1)[0] + ".")),  # stripped signature
                (None, a.body("acme", jwt.encode(a.claims("acme"), rsa_pair()[0], algorithm="RS256"))),  # foreign
            ],
            "HS256 with the public key, alg none in every spelling, stripped or foreign signatures",
        ),
        Attack(
            "token lifetime and claim types",
            [
                ("mallory", a.body("mallory", a.rs256(exp=253402300799))),  # the year 9999
                ("mallory", a.body("mallory", a.rs256(exp=str(int(time.time()) + 600)))),  # numeric string
                ("mallory", a.body("mallory", a.rs256(nbf="0"))),
                ("mallory", a.body("mallory", a.rs256(iat=[1]))),
                ("mallory", a.body("mallory", a.rs256(groups="ops"))),
                ("ACME", a.body("acme", a.rs256(tenant="ACME"))),  # another tenant (case counts): its topic is absent
                (None, a.body("acme", a.rs256(tenant=" acme"))),
                (None, a.body("acme", a.rs256(tenant="acme\n"))),
            ],
            "issue 12.5 (exp in 9999, exp as a string), odd claim types, tenant case and whitespace",
        ),
        Attack(
            "filter values the store cannot take",
            [
                ("mallory", a.body("mallory", a.rs256(), filter={"must": [{"key": "lang\n", "match": "en"}]})),
                ("mallory", a.body("mallory", a.rs256(), filter={"must": [{"key": "n", "match": 2**70}]})),
                ("mallory", a.body("mallory", a.rs256(), filter={"must": [{"key": "n", "any": [2**64, 1]}]})),
                ("mallory", a.body("mallory", a.rs256(), filter={"must": [{"key": "n", "any": ["a", 1]}]})),
                ("mallory", a.body("mallory", a.rs256(), filter={"must": [{"key": "tenant_id", "match": "acme"}]})),
                ("mallory", a.body("mallory", a.rs256(), filter={"should": [{"key": "acl_public", "match": True}]})),
                ("mallory", a.body("mallory", a.rs256(), filter={"must": [{"key": "n", "range": {"gt": "NAN"}}]})),
                ("mallory", a.body("mallory", a.rs256(), top_k=10**6)),
            ],
            "issue 12.4 (key with a newline, integers beyond 64 bits, mixed any lists), reserved fields, NaN",
        ),
        Attack(
            "oversize and unreadable requests",
            [
                ("mallory", a.body("mallory", a.rs256(), query="x" * 70_000)),
                (None, {"request_id": uuid.uuid4().hex, "tenant_id": "acme", "reply_topic": f"{p}.acme.x"}),
                (None, {"request_id": uuid.uuid4().hex, "tenant_id": "ghost", "reply_topic": f"{p}.ghost"}),
            ],
            "oversize bodies, requests that do not validate",
        ),
    ]
    return out


async def victims_loop(a: Arena, stop: asyncio.Event) -> None:
    async def one(tenant: str) -> None:
        client = a.victims[tenant]
        while not stop.is_set():
            attack = a.current
            started = time.monotonic()
            try:
                reply = await client.request(client.new_request(QUESTION, timeout=VICTIM_DEADLINE))
                ok = isinstance(reply, QueryResult) and bool(reply.hits)
                if isinstance(reply, QueryResult):
                    allowed = ("acme-public-", "acme-alice-") if tenant == "acme" else ("globex-",)
                    a.leaks += [h.doc_id for h in reply.hits if not h.doc_id.startswith(allowed)]
            except TimeoutError:
                ok = False
            ok = ok and time.monotonic() - started <= VICTIM_DEADLINE
            (a.answered if ok else a.lost)[attack] += 1

    await asyncio.gather(one("acme"), one("globex"))


async def topics(bootstrap: str) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        return set(await consumer.topics())
    finally:
        await consumer.stop()


async def send(a: Arena, attack: Attack) -> None:
    client = a.victims["acme"]
    for tenant, body in attack.requests:
        rid = body["request_id"]
        a.sent[rid] = (attack.name, tenant)
        a.attempts[attack.name] += 1
        value = json.dumps(body).encode()
        if "NAN" in value.decode():
            value = value.replace(b'"NAN"', b"NaN")
        await client.publish_only(rid.encode(), value)


async def test_hostile_requests_cost_the_other_tenants_nothing(arena):
    a = arena
    internal_before = metric(a.worker, "vectorstream_query_errors_total{code=internal}")
    stop = asyncio.Event()
    victims = asyncio.get_running_loop().create_task(victims_loop(a, stop))
    plan = attacks(a)
    try:
        seen = set(a.topics_before)
        for attack in plan:
            a.current = attack.name
            await send(a, attack)
            await asyncio.sleep(3)  # the victims keep asking while the worker works through the attack
            now = await topics(a.sc.bootstrap)
            a.created[attack.name] = sorted(now - seen)
            seen |= now
        a.current = "after"
        await asyncio.sleep(3)
    finally:
        stop.set()
        await victims
    # every reply in the tenants' topics, by request id; a verified attacker's requests all get one (on a
    # loaded machine the last may still be on their way: read again for a while)
    verified = {rid for rid, (_, tenant) in a.sent.items() if tenant == "mallory"}
    deadline = time.monotonic() + 30
    while True:
        landed: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        for tenant in ("acme", "globex", "mallory"):
            for r in await read_records(a.sc.bootstrap, reply_topic_for(a.prefix, tenant)):
                rid = dict(r.headers).get(CORRELATION_HEADER, b"").decode()
                landed[rid].append((tenant, json.loads(r.value)))
        if verified <= set(landed) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    created = sorted(await topics(a.sc.bootstrap) - a.topics_before)
    internal = metric(a.worker, "vectorstream_query_errors_total{code=internal}") - internal_before
    dropped = {
        k.split("reason=", 1)[1].rstrip("}"): v
        for k, v in (a.worker.metrics() or {}).items()
        if k.startswith("vectorstream_query_replies_failed_total{") and v
    }

    rows, problems = [], []
    for attack in plan:
        ids = [rid for rid, (name, _) in a.sent.items() if name == attack.name]
        served = foreign = 0
        for rid in ids:
            token_tenant = a.sent[rid][1]
            for tenant, reply in landed.get(rid, []):
                if reply.get("status") == "ok":
                    served += 1
                if token_tenant is not None and tenant != token_tenant:
                    foreign += 1  # a verified attacker's reply outside its own topic
                if token_tenant is None and reply.get("status") == "ok":
                    foreign += 1
        rows.append(
            {
                "attack": attack.name,
                "what": attack.what,
                "attempts": a.attempts[attack.name],
                "served": served,
                "foreign_replies": foreign,
                "lost_by_others": a.lost[attack.name],
                "answered_others": a.answered[attack.name],
                "topics_created": len(a.created.get(attack.name, [])),
            }
        )
        if served or foreign or a.lost[attack.name]:
            problems.append(rows[-1])
    refused = await refuses_the_dev_secret(a)
    rows.append(
        {
            "attack": "worker started with the development secret",
            "what": "QUERY__HS256_SECRET left at the source's value, no dev mode",
            "attempts": 1,
            "served": 0 if refused else 1,
            "foreign_replies": 0,
            "lost_by_others": 0,
            "answered_others": 0,
            "topics_created": 0,
        }
    )
    alive = a.worker.proc.poll() is None
    stopped = time.monotonic()
    code = await asyncio.to_thread(a.worker.terminate, 30)
    stop_seconds = time.monotonic() - stopped
    record_result(
        "query-attacks",
        events=sum(r["attempts"] for r in rows),
        lost=sum(a.lost.values()),
        leaked=sum(r["served"] + r["foreign_replies"] for r in rows) + len(a.leaks),
        notes=f"{len(rows)} attacks, {sum(r['attempts'] for r in rows)} hostile requests while acme and globex "
        f"asked {sum(a.answered.values()) + sum(a.lost.values())} valid questions "
        f"({sum(a.lost.values())} without a result within {VICTIM_DEADLINE:.0f} s); topics created: "
        f"{len(created)}; internal errors: {internal:.0f}; replies dropped by the worker: "
        + (", ".join(f"{n:.0f} {reason}" for reason, n in sorted(dropped.items())) or "none")
        + f"; SIGTERM exit {code} after {stop_seconds:.1f} s",
        attacks=rows,
        topics_created=created,
    )
    assert alive and code == 0
    assert not created, f"requests made topics appear: {created}"
    assert not problems, problems
    assert not a.leaks, a.leaks
    assert internal == 0, "an attack ended as an internal error"
    assert refused, "a worker with the development secret and no dev mode started"
    assert sum(a.answered.values()) > len(plan), "the victims kept asking during every attack"
    # at most one reply per attack request, never a result, never an internal error; a verified attacker's
    # request gets exactly one refusal, on its own topic (it exists)
    replies = {rid: landed.get(rid, []) for rid in a.sent}
    assert all(len(r) <= 1 for r in replies.values()), {rid: r for rid, r in replies.items() if len(r) > 1}
    codes = Counter(reply["error"]["code"] for r in replies.values() for _, reply in r)
    assert "internal" not in codes and sum(codes.values()) == sum(len(r) for r in replies.values()), codes
    wrong = {
        rid: (a.sent[rid][0], [(t, r.get("error", {}).get("code")) for t, r in replies[rid]])
        for rid in verified
        if [t for t, _ in replies[rid]] != ["mallory"]
    }
    assert verified and not wrong, (wrong, dropped)
    # no token naming a topic that does not exist: nothing anywhere
    ghosts = [rid for rid, (name, _) in a.sent.items() if name == "no token, missing reply topics"]
    assert ghosts and not any(replies[rid] for rid in ghosts)
    # the development secret: refused as unauthenticated, on the topic of the tenant named (no hits there)
    dev = [rid for rid, (name, _) in a.sent.items() if name == "development secret (HS256)"]
    assert {reply["error"]["code"] for rid in dev for _, reply in replies[rid]} == {"unauthenticated"}


async def refuses_the_dev_secret(a: Arena) -> bool:
    """A worker whose HS256 secret is the development default, without dev mode, exits 2 before serving."""
    w = a.sc.worker({"VECTORSTREAM_QUERY__HS256_SECRET": DEV_HS256_SECRET, "VECTORSTREAM_QUERY__DEV_MODE": "false"})
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", w.module, "worker"],
        env=w.env,
        cwd=str(a.sc.tmp),
        capture_output=True,
        timeout=120,
    )
    return proc.returncode == 2 and b"development secret" in proc.stderr + proc.stdout
