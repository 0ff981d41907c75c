"""Queries end to end on a real broker (Apache Kafka and Tansu) with a real worker process: request -> reply
for text queries, filters, permissions and tenants, the search modes (a rare identifier that sparse and hybrid
search find and dense search misses), every error code, a missed deadline, and overload.

One worker per broker serves every case of this module; the last case reads the tenants' reply topics and checks
that every request got exactly one reply, keyed by its request id and carrying the correlation header, on the
reply topic of its tenant."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from pipeline.auth import mint_token
from pipeline.client import DocumentPublisher, QueryClient
from pipeline.settings import QuerySettings
from schemas.events import DocumentUpsert
from schemas.queries import CORRELATION_HEADER, ErrorCode, QueryFailure, QueryResult
from tests.integration.workers import WorkerProcess

pytestmark = pytest.mark.integration

SECRET = "integration-test-secret-0123456789abcdef"
AUTH = QuerySettings(hs256_secret=SECRET)
#: small on purpose, so that a burst overloads the worker
MAX_CONCURRENCY, MAX_QUEUE = 2, 4

DOCS = [
    # tenant, doc, title, text, access, metadata
    (
        "acme",
        "pw",
        "Resetting your password",
        "To reset your password open the account settings, choose 'Forgot password' and follow the e-mailed link.",
        {"public": True},
        {"year": 2023, "lang": "en"},
    ),
    (
        "acme",
        "pw-de",
        "Passwort zurücksetzen",
        "Um Ihr Passwort zurückzusetzen, öffnen Sie die Kontoeinstellungen und wählen Sie 'Passwort vergessen'.",
        {"public": True},
        {"year": 2021, "lang": "de"},
    ),
    (
        "acme",
        "vpn",
        "VPN setup for staff",
        "Install the VPN client, import the company profile and sign in with your staff credentials.",
        {"groups": ["ops"]},
        {"year": 2022, "lang": "en"},
    ),
    (
        "acme",
        "salary",
        "Salary review notes",
        "Notes from the salary review meeting: budgets for next year and promotion decisions.",
        {"users": ["carol"]},
        {"year": 2024, "lang": "en"},
    ),
    (
        "acme",
        "coffee",
        "Coffee machine",
        "The coffee machine on the third floor is descaled every Friday; report faults to facilities.",
        {"public": True},
        {"year": 2020, "lang": "en"},
    ),
    # field notes only dave may read: near-identical identifiers, one of them QX-7741-B (see test_search_modes)
    *(
        (
            "acme",
            f"note-{code}",
            f"Field note {n}",
            f"After the firmware update the unit reported {code}; the vendor replaced the {part}.",
            {"users": ["dave"]},
            {},
        )
        for n, code, part in (
            (7, "QX-7741-B", "board"),
            (1, "QX-7714-B", "fan"),
            (2, "QX-1477-B", "cable"),
            (3, "QX-4177-B", "disk"),
            (4, "QX-7471-B", "battery"),
            (5, "QX-1747-B", "screen"),
        )
    ),  # fmt: skip
    (
        "globex",
        "pw",
        "Resetting your Globex password",
        "To reset your password open the account settings, choose 'Forgot password' and follow the e-mailed link.",
        {"public": True},
        {"year": 2023, "lang": "en"},
    ),
]


class Served:
    def __init__(self, bootstrap: str, worker: WorkerProcess, client: QueryClient, replies_prefix: str):
        self.bootstrap = bootstrap
        self.worker = worker
        self.client = client
        #: tenant T's replies come on "<replies_prefix>.T"
        self.replies_prefix = replies_prefix
        #: request ids sent that must get exactly one reply / none at all
        self.expect_one: set[str] = set()
        self.expect_none: set[str] = set()
        #: request id -> the tenant of its token, where its reply must land
        self.tenant_of: dict[str, str] = {}

    def token(self, tenant="acme", user="alice", groups=(), ttl=300, settings=AUTH):
        return mint_token(settings, tenant=tenant, user=user, groups=list(groups), ttl_seconds=ttl)

    async def reply(self, query="how do I reset my password", *, tenant="acme", token=None, wait=60.0, **kw):
        req = self.client.new_request(
            query, tenant=tenant, token=self.token(tenant) if token is None else token, timeout=wait, **kw
        )
        self.expect_one.add(req.request_id)
        if token is None:
            self.tenant_of[req.request_id] = tenant
        return await self.client.request(req)

    async def docs(self, query="how do I reset my password", **kw) -> list[str]:
        reply = await self.reply(query, **kw)
        assert isinstance(reply, QueryResult), reply
        return [h.doc_id for h in reply.hits]

    async def error(self, query="how do I reset my password", **kw) -> ErrorCode:
        reply = await self.reply(query, **kw)
        assert isinstance(reply, QueryFailure), reply
        return reply.error.code


@pytest.fixture(scope="module", params=["apache", "tansu"])
async def served(request, tmp_path_factory):
    bootstrap = request.getfixturevalue({"apache": "apache_kafka", "tansu": "tansu"}[request.param]).bootstrap_servers
    tmp: Path = tmp_path_factory.mktemp(f"query-{request.param}")
    run = uuid.uuid4().hex[:8]
    topic, queries, replies = f"docs-{run}", f"queries-{run}", f"replies-{run}"
    worker = WorkerProcess(
        bootstrap=bootstrap,
        store_path=tmp / "edge",
        topic=topic,
        dlq=f"{topic}.dlq",
        group=f"g-{run}",
        log_path=tmp / "worker.log",
        extra_env={
            "VECTORSTREAM_KAFKA__QUERIES_TOPIC": queries,
            "VECTORSTREAM_KAFKA__REPLIES_TOPIC": replies,
            "VECTORSTREAM_QUERY__HS256_SECRET": SECRET,
            "VECTORSTREAM_QUERY__REPLY_TOPICS_REFRESH_SECONDS": "1",
            "VECTORSTREAM_QUERY__MAX_CONCURRENCY": str(MAX_CONCURRENCY),
            "VECTORSTREAM_QUERY__MAX_QUEUE": str(MAX_QUEUE),
            # the filters below run on declared (indexed) and undeclared metadata fields alike
            "VECTORSTREAM_STORE__METADATA_INDEXES": "year:integer,lang:keyword",
        },
    ).start()
    try:
        await asyncio.to_thread(worker.wait_for, lambda: worker.metrics() is not None, 180, "the worker's /metrics")
        async with DocumentPublisher(bootstrap, topic) as pub:
            await pub.publish_many(
                DocumentUpsert(
                    type="upsert",
                    tenant_id=t,
                    doc_id=d,
                    version=1,
                    title=title,
                    text=text,
                    access=access,
                    metadata=meta,
                )
                for t, d, title, text, access, meta in DOCS
            )
        # the documents and the queries topic are consumed by the same consumer: once the documents are
        # indexed, the query agent is assigned its partitions too
        await asyncio.to_thread(worker.wait_events, len(DOCS), 240)
        async with QueryClient(bootstrap, queries_topic=queries, replies_topic=replies) as client:
            # the client creates each tenant's reply topic (the worker never creates one); a token of one
            # tenant asking as the other is answered on the token's tenant's topic, so read both from the start
            for tenant in ("acme", "globex"):
                await client.listen(tenant)
            yield Served(bootstrap, worker, client, replies)
    finally:
        code = await asyncio.to_thread(worker.terminate)
    assert code == 0, worker.log_tail()


async def test_text_query_gets_the_best_chunks(served):
    reply = await served.reply(top_k=3)
    assert isinstance(reply, QueryResult), reply
    assert reply.hits[0].doc_id == "pw" and reply.hits[0].title == "Resetting your password"
    assert "Forgot password" in reply.hits[0].text
    assert reply.hits[0].metadata == {"year": 2023, "lang": "en"}
    assert reply.model == "all-MiniLM-L6-v2" and reply.took_ms > 0
    assert [h.score for h in reply.hits] == sorted((h.score for h in reply.hits), reverse=True)


#: the micro-batch window the worker used to wait on every request (query.batch_window_ms, 5 ms in this test)
OLD_BATCH_WINDOW = 0.005


async def test_an_idle_worker_embeds_a_lone_request_at_once(served):
    """No batching delay when the model is idle: the worker's own break-down (vectorstream_query_stage_seconds)
    says each lone request's queue_wait, admitted until its embedding started, is ~0 (the median of five
    is under half the window it used to wait), and each of them was embedded (a cache miss, not a hit)."""

    def stage(m, name):
        return m[f"vectorstream_query_stage_seconds_sum{{stage={name}}}"], m[
            f"vectorstream_query_stage_seconds_count{{stage={name}}}"
        ]

    waits = []
    for q in ("lone question one", "a second lone one", "third alone", "fourth, alone", "the fifth lone question"):
        before = served.worker.metrics()
        reply = await served.reply(q)  # one at a time: the worker is idle when each arrives
        assert isinstance(reply, QueryResult), reply
        after = served.worker.metrics()
        (w0, n0), (w1, n1) = stage(before, "queue_wait"), stage(after, "queue_wait")
        assert n1 - n0 == 1
        waits.append(w1 - w0)
        missed = "vectorstream_query_embedding_cache_total{result=miss}"
        assert after[missed] - before[missed] == 1
    waits.sort()
    assert waits[2] < OLD_BATCH_WINDOW / 2, waits


async def test_what_to_return_and_search_params(served):
    reply = await served.reply(top_k=2, with_text=False, with_metadata=False, hnsw_ef=256)
    assert reply.hits and all(h.text is None and h.metadata is None for h in reply.hits)
    assert await served.docs(top_k=2, exact=True) == await served.docs(top_k=2)


async def test_tenants_and_permissions(served):
    q = "VPN client, salary review, password, coffee"
    assert set(await served.docs(q)) == {"pw", "pw-de", "coffee"}
    assert set(await served.docs(q, token=served.token(groups=["ops"]))) == {"pw", "pw-de", "coffee", "vpn"}
    assert set(await served.docs(q, token=served.token(user="carol"))) == {"pw", "pw-de", "coffee", "salary"}
    globex = await served.reply(q, tenant="globex")
    assert [h.title for h in globex.hits] == ["Resetting your Globex password"]


async def test_filters(served):
    assert await served.docs(filter={"must": [{"key": "lang", "match": "de"}]}) == ["pw-de"]
    assert set(await served.docs(filter={"must": [{"key": "year", "range": {"gte": 2021, "lte": 2023}}]})) == {
        "pw",
        "pw-de",
    }
    assert "pw" not in await served.docs(filter={"must_not": [{"key": "year", "any": [2023]}]})
    assert set(
        await served.docs(filter={"should": [{"key": "lang", "match": "de"}, {"key": "year", "range": {"lt": 2021}}]})
    ) == {"pw-de", "coffee"}


async def test_search_modes_find_a_rare_identifier_dense_misses(served):
    """The collection has BM25 sparse vectors (the worker's default): hybrid is the default mode, and the reply
    says which mode served it. Among near-identical field notes, dense search ranks another code first; BM25
    and both fusions rank the note that names the identifier first."""
    dave = served.token(user="dave")
    question = "unit reported QX-7741-B"
    dense = await served.reply(question, token=dave, top_k=1, mode="dense")
    assert isinstance(dense, QueryResult) and dense.mode == "dense", dense
    assert dense.hits and dense.hits[0].doc_id != "note-QX-7741-B"
    for mode, fusion in (("sparse", None), ("hybrid", "rrf"), ("hybrid", "dbsf"), (None, None)):
        reply = await served.reply(question, token=dave, top_k=1, mode=mode, fusion=fusion)
        assert isinstance(reply, QueryResult), reply
        assert reply.mode == (mode or "hybrid") and reply.fusion == (
            fusion or ("rrf" if reply.mode == "hybrid" else None)
        )
        assert [h.doc_id for h in reply.hits] == ["note-QX-7741-B"], (mode, fusion)
    # alice may not read the notes: no mode shows them to her
    for mode in ("dense", "sparse", "hybrid"):
        assert not any(d.startswith("note-") for d in await served.docs(question, mode=mode))


@pytest.mark.parametrize(
    "case,code",
    [
        ("bad_token", ErrorCode.UNAUTHENTICATED),
        ("missing_token", ErrorCode.UNAUTHENTICATED),
        ("wrong_key", ErrorCode.UNAUTHENTICATED),
        ("expired_token", ErrorCode.TOKEN_EXPIRED),
        ("tenant_mismatch", ErrorCode.TENANT_MISMATCH),
        ("forbidden_filter_tenant", ErrorCode.FORBIDDEN_FILTER_FIELD),
        ("forbidden_filter_acl", ErrorCode.FORBIDDEN_FILTER_FIELD),
        ("oversize_top_k", ErrorCode.TOP_K_TOO_LARGE),
        ("ef_above_cap", ErrorCode.BAD_REQUEST),
    ],
)
async def test_errors(served, case, code):
    other = QuerySettings(hs256_secret="a-different-secret-0123456789abcdefgh")
    kw = {
        "bad_token": {"token": "not-a-token"},
        "missing_token": {"token": ""},
        "wrong_key": {"token": served.token(settings=other)},
        "expired_token": {"token": served.token(ttl=-60)},
        "tenant_mismatch": {"token": served.token(tenant="globex")},
        "forbidden_filter_tenant": {"filter": {"must": [{"key": "tenant_id", "match": "globex"}]}},
        "forbidden_filter_acl": {"filter": {"should": [{"key": "acl_groups", "any": ["ops"]}]}},
        "oversize_top_k": {"top_k": 101},
        "ef_above_cap": {"hnsw_ef": 4096},
    }[case]
    reply = await served.reply(**kw)
    assert isinstance(reply, QueryFailure), reply
    assert reply.error.code == code and reply.error.message and not reply.error.retriable


async def test_unreadable_request_gets_a_bad_request_reply(served):
    # unreadable and naming no reply topic of its tenant: dropped (the server has nowhere it may write)
    request_id = uuid.uuid4().hex
    served.expect_none.add(request_id)
    with pytest.raises(TimeoutError):
        await served.client.send_raw(request_id.encode(), b'{"request_id": "', request_id=request_id, timeout=3)
    # invalid, but naming its tenant and that tenant's own reply topic: one bad_request reply there
    request_id = uuid.uuid4().hex
    served.expect_one.add(request_id)
    body = {"request_id": request_id, "tenant_id": "acme", "reply_topic": f"{served.replies_prefix}.acme"}
    reply = await served.client.send_raw(request_id.encode(), json.dumps(body).encode(), request_id=request_id)
    assert isinstance(reply, QueryFailure) and reply.error.code == ErrorCode.BAD_REQUEST
    # a query text above the contract's limit (the client would refuse to build it: send the JSON as is)
    body = served.client.new_request("placeholder", tenant="acme", token=served.token(), timeout=60).model_dump()
    body["query"] = "x" * 5000
    served.expect_one.add(body["request_id"])
    reply = await served.client.send_raw(
        body["request_id"].encode(), json.dumps(body).encode(), request_id=body["request_id"], timeout=60
    )
    assert isinstance(reply, QueryFailure) and reply.error.code == ErrorCode.BAD_REQUEST
    assert "query" in reply.error.message


async def test_missed_deadline_is_dropped_and_counted(served):
    def expired() -> float:
        return (served.worker.metrics() or {}).get("vectorstream_queries_expired_total", 0.0)

    before = expired()
    req = served.client.new_request("how do I reset my password", tenant="acme", token=served.token(), timeout=-1)
    served.expect_none.add(req.request_id)
    with pytest.raises(TimeoutError):
        await served.client.request(req, timeout=3)
    await asyncio.to_thread(served.worker.wait_for, lambda: expired() >= before + 1, 30, "the expired counter")
    # the server is still serving
    assert (await served.docs())[0] == "pw"


async def test_burst_overload_is_answered_not_queued(served):
    n = 40
    replies = await asyncio.gather(*(served.reply(f"question number {i} about passwords") for i in range(n)))
    codes = [r.error.code if isinstance(r, QueryFailure) else "ok" for r in replies]
    assert set(codes) <= {"ok", ErrorCode.OVERLOADED}, codes
    assert codes.count("ok") >= MAX_CONCURRENCY, codes
    assert codes.count(ErrorCode.OVERLOADED) >= 1, "a burst of 40 against 2 slots and a queue of 4"
    assert all(r.error.retriable for r in replies if isinstance(r, QueryFailure))
    # batches are sized by what waits, with no window: how many share a call depends on how the broker hands
    # the burst over (Apache Kafka in one fetch, Tansu record by record), but never more than the slots let in
    # (the batching itself: tests/component/test_query_service.py, tests/unit/test_query_protocol.py)
    metrics = served.worker.metrics()
    batches = metrics["vectorstream_query_embedding_batch_size_count"]
    within_slots = metrics[f"vectorstream_query_embedding_batch_size_bucket{{le={float(MAX_CONCURRENCY)}}}"]
    assert batches > 0 and within_slots == batches


async def test_no_topic_appears_and_serving_goes_on(served):
    """Requests without a token naming reply topics that do not exist, a few with a valid token naming another
    tenant's topic: no topic appears (on Tansu a produce would create it), and queries keep being served."""
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    topics = [f"{served.replies_prefix}.{ghost}-{i}" for i in range(30)]
    for i, topic in enumerate(topics):
        req = served.client.new_request("password", tenant=f"{ghost}-{i}", token="", timeout=30).model_dump()
        req["reply_topic"] = topic
        served.expect_none.add(req["request_id"])
        await served.client.publish_only(req["request_id"].encode(), json.dumps(req).encode())
    assert (await served.docs())[0] == "pw"
    consumer = AIOKafkaConsumer(bootstrap_servers=served.bootstrap, group_id=None)
    await consumer.start()
    try:
        present = await consumer.topics()
    finally:
        await consumer.stop()
    assert not [t for t in present if ghost in t], "a request made a topic appear"
    # each is dropped after one topic listing that started after it came (at most one listing a second)
    deadline = time.monotonic() + 15
    while True:
        failed = served.worker.metrics() or {}
        dropped = failed.get("vectorstream_query_replies_failed_total{reason=unknown_topic}", 0)
        if dropped >= len(topics) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert dropped >= len(topics)


async def test_zz_every_request_got_exactly_one_reply(served):
    consumer = AIOKafkaConsumer(
        f"{served.replies_prefix}.acme",
        f"{served.replies_prefix}.globex",
        bootstrap_servers=served.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: dict[str, int] = {}
    topics: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not served.expect_one <= set(seen):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    headers = dict(r.headers)
                    request_id = headers[CORRELATION_HEADER].decode()
                    assert r.key.decode() == request_id
                    assert json.loads(r.value)["request_id"] == request_id
                    seen[request_id] = seen.get(request_id, 0) + 1
                    topics[request_id] = r.topic
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            for r in records:
                request_id = dict(r.headers)[CORRELATION_HEADER].decode()
                seen[request_id] = seen.get(request_id, 0) + 1
    finally:
        await consumer.stop()
    assert served.expect_one and served.expect_none
    assert {rid: seen.get(rid, 0) for rid in served.expect_one} == dict.fromkeys(served.expect_one, 1)
    assert not served.expect_none & set(seen)
    assert {rid: topics[rid] for rid in served.tenant_of} == {
        rid: f"{served.replies_prefix}.{tenant}" for rid, tenant in served.tenant_of.items()
    }
    assert "globex" in served.tenant_of.values()
