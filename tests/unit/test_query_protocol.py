"""Query service pieces that need no model or store: micro-batching, request checks, reply records."""

import asyncio
import json
import time

import numpy as np
import pytest
from pydantic import SecretStr

from pipeline.auth import mint_token
from pipeline.query import Admitted, MicroBatcher, QueryService, Reply
from pipeline.settings import Settings
from schemas.queries import CORRELATION_HEADER, ErrorCode, QueryFailure, query_reply_adapter

SECRET = "unit-test-secret-0123456789abcdef-xyz"


class NoStore:
    sparse_record = None  # a dense-only collection

    async def search(self, *a, **kw):
        raise AssertionError("no store call expected")


class NoEmbedder:
    name = "none"

    async def encode_query(self, texts):
        raise AssertionError("no embedding expected")


@pytest.fixture(scope="module")
def cfg():
    s = Settings(_env_file=None)
    return s.model_copy(
        update={
            "query": s.query.model_copy(
                update={"hs256_secret": SecretStr(SECRET), "max_concurrency": 1, "max_queue": 1}
            )
        }
    )


def raw(cfg, **over):
    body = {
        "request_id": "r1",
        "tenant_id": "acme",
        "query": "q",
        "reply_topic": f"{cfg.kafka.replies_topic}.acme",
        "deadline_ms": int(time.time() * 1000) + 5000,
        "token": mint_token(cfg.query, tenant="acme", user="u"),
        **over,
    }
    return b"r1", json.dumps(body).encode()


async def test_batcher_embeds_at_once_when_idle_and_batches_what_waits_while_busy():
    calls = []
    gate = asyncio.Event()

    async def encode(texts):
        calls.append(list(texts))
        if len(calls) == 1:
            await gate.wait()
        return np.array([[float(len(t))] for t in texts])

    b = MicroBatcher(encode, max_batch=8)
    first = asyncio.ensure_future(b.embed("x"))
    await asyncio.sleep(0)  # one loop turn: the lone text is with the model, no window
    await asyncio.sleep(0)
    assert calls == [["x"]]
    rest = [asyncio.ensure_future(b.embed("y" * i)) for i in range(1, 5)]
    await asyncio.sleep(0.01)
    assert calls == [["x"]]  # they wait for the busy model ...
    gate.set()
    out = await asyncio.gather(first, *rest)
    assert calls == [["x"], ["y", "yy", "yyy", "yyyy"]]  # ... and then go together
    assert [float(v[0]) for v in out] == [1, 1, 2, 3, 4]
    await b.close()


async def test_batcher_splits_at_max_batch_and_skips_cancelled_callers():
    calls = []
    gate = asyncio.Event()

    async def encode(texts):
        calls.append(list(texts))
        await gate.wait()
        return np.zeros((len(texts), 1))

    b = MicroBatcher(encode, max_batch=2)
    tasks = [asyncio.ensure_future(b.embed(str(i))) for i in range(5)]
    await asyncio.sleep(0.01)
    assert calls == [["0", "1"]]
    tasks[2].cancel()  # gave up while queued: never encoded
    gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert calls[1:] == [["3", "4"]]
    assert all(t.done() and not t.cancelled() for i, t in enumerate(tasks) if i != 2)
    await b.close()


async def test_batcher_errors_reach_every_caller():
    async def encode(texts):
        raise RuntimeError("model broke")

    b = MicroBatcher(encode, max_batch=4)
    results = await asyncio.gather(b.embed("a"), b.embed("b"), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    await b.close()


async def test_identical_questions_of_the_same_moment_are_embedded_once():
    calls = []
    gate = asyncio.Event()

    async def encode(texts):
        calls.append(list(texts))
        await gate.wait()
        return np.array([[float(len(t))] for t in texts])

    b = MicroBatcher(encode, max_batch=8, cache_size=0)
    running = [asyncio.ensure_future(b.embed("same")) for _ in range(3)]  # the first finds the model idle
    await asyncio.sleep(0.01)
    joined = asyncio.ensure_future(b.embed("same"))  # asked while "same" is being embedded
    waiting = [asyncio.ensure_future(b.embed("other")) for _ in range(3)] + [asyncio.ensure_future(b.embed("x"))]
    await asyncio.sleep(0.01)
    running[1].cancel()  # one caller giving up does not cancel the others' shared vector
    gate.set()
    out = await asyncio.gather(*running, joined, *waiting, return_exceptions=True)
    assert calls == [["same"], ["other", "x"]]
    assert isinstance(out[1], asyncio.CancelledError)
    assert [float(v[0]) for i, v in enumerate(out) if i != 1] == [4, 4, 4, 5, 5, 5, 1]
    await b.close()


def cache_count(result):
    from pipeline import metrics as m

    return m.QUERY_EMBED_CACHE.labels(result=result)._value.get()


async def test_the_cache_keeps_recent_vectors_by_text_and_evicts_the_least_recent():
    calls = []

    async def encode(texts):
        calls.append(list(texts))
        return np.array([[float(len(t))] for t in texts])

    b = MicroBatcher(encode, max_batch=8, cache_size=2, model="m1")
    hits, misses = cache_count("hit"), cache_count("miss")
    assert float((await b.embed("a"))[0]) == 1
    assert float((await b.embed("bb"))[0]) == 2
    assert float((await b.embed("a"))[0]) == 1  # a hit: not embedded again, and now the most recent
    assert calls == [["a"], ["bb"]]
    assert cache_count("hit") - hits == 1 and cache_count("miss") - misses == 2
    await b.embed("ccc")  # evicts "bb", the least recently used
    assert b.cached == 2
    await b.embed("a")
    await b.embed("bb")
    assert calls == [["a"], ["bb"], ["ccc"], ["bb"]]
    vector, started = await b.embed_timed("a")
    with pytest.raises(ValueError):
        vector[0] = 9  # a cached vector is shared: read-only
    await b.close()


async def test_a_cache_of_size_0_embeds_every_time():
    calls = []

    async def encode(texts):
        calls.append(list(texts))
        return np.zeros((len(texts), 1))

    b = MicroBatcher(encode, max_batch=8, cache_size=0)
    for _ in range(3):
        await b.embed("q")
    assert calls == [["q"]] * 3 and b.cached == 0
    await b.close()


def test_admission_is_bounded(cfg):
    svc = QueryService(cfg, NoStore(), NoEmbedder(), sink=None)
    first, second, third = (svc.admit(*raw(cfg)) for _ in range(3))
    assert isinstance(first, Admitted) and isinstance(second, Admitted)
    assert isinstance(third, Reply) and third.body.error.code == ErrorCode.OVERLOADED
    assert svc.admitted == 2


def test_reply_record_shape(cfg):
    svc = QueryService(cfg, NoStore(), NoEmbedder(), sink=None)
    reply = svc.admit(*raw(cfg, token="nope"))
    assert reply.key == b"r1" and reply.headers == [(CORRELATION_HEADER, b"r1")]
    parsed = query_reply_adapter.validate_json(reply.value)
    assert isinstance(parsed, QueryFailure) and parsed.error.code == ErrorCode.UNAUTHENTICATED


def failed(reason):
    from pipeline import metrics as m

    return m.QUERY_REPLIES_FAILED.labels(reason=reason)._value.get()


@pytest.mark.parametrize(
    "key,value",
    [
        (b"k1", b"\xff\xfe"),
        (None, b"[]"),
        (b"k2", b'{"request_id": "from-body", "reply_topic": 5}'),
        (b"k3", None),
        (b"k4", b"x" * 70_000),
        (b"k5", b'{"request_id": "r5", "tenant_id": "acme", "reply_topic": "vectorstream.replies.globex"}'),
        (b"k6", b'{"request_id": "r6", "reply_topic": "vectorstream.replies.acme"}'),
        (b"k7", b'{"request_id": "r7", "tenant_id": "ac me", "reply_topic": "vectorstream.replies.ac me"}'),
        (b"k8", b'{"request_id": "r8", "tenant_id": "acme", "reply_topic": "vectorstream.replies"}'),
    ],
)
def test_unreadable_requests_naming_no_topic_of_their_tenant_are_dropped_and_counted(cfg, key, value):
    """Before a token is verified the server writes only to the reply topic of the tenant a request names, and
    only when the request named that topic: anything else is dropped (counted), never sent to a default."""
    svc = QueryService(cfg, NoStore(), NoEmbedder(), sink=None)
    before = failed("no_reply_topic")
    assert svc.admit(key, value) is None
    assert failed("no_reply_topic") == before + 1


@pytest.mark.parametrize(
    "value",
    [
        b'{"request_id": "r1", "tenant_id": "acme", "reply_topic": "vectorstream.replies.acme"}',
        b'{"request_id": "r1", "tenant_id": "acme", "reply_topic": "vectorstream.replies.acme", "query": ""}',
        b'{"request_id": "r1", "tenant_id": "acme", "reply_topic": "vectorstream.replies.acme", "x": "'
        + b"1" * 70_000
        + b'"}',
    ],
)
def test_unreadable_requests_naming_their_tenants_topic_get_one_error_there(cfg, value):
    svc = QueryService(cfg, NoStore(), NoEmbedder(), sink=None)
    reply = svc.admit(b"k", value)
    assert isinstance(reply, Reply) and reply.body.error.code == ErrorCode.BAD_REQUEST
    assert reply.topic == "vectorstream.replies.acme"
    assert reply.request_id == "r1"  # salvaged from the body


def test_unauthenticated_requests_are_answered_only_on_the_named_tenants_own_topic(cfg):
    svc = QueryService(cfg, NoStore(), NoEmbedder(), sink=None)
    reply = svc.admit(*raw(cfg, token=None))
    assert isinstance(reply, Reply) and reply.body.error.code == ErrorCode.UNAUTHENTICATED
    assert reply.topic == "vectorstream.replies.acme"
    # naming another tenant's topic, or a topic under the prefix that is nobody's: no reply at all
    for topic in ("vectorstream.replies.globex", "vectorstream.replies.acme.x", "vectorstream.replies"):
        assert svc.admit(*raw(cfg, token=None, reply_topic=topic)) is None, topic


def test_a_verified_tenant_gets_replies_on_its_own_topic_only(cfg):
    svc = QueryService(cfg, NoStore(), NoEmbedder(), sink=None)
    for topic in ("vectorstream.replies.globex", "vectorstream.replies.acme.mine", "vectorstream.replies"):
        reply = svc.admit(*raw(cfg, reply_topic=topic))
        assert isinstance(reply, Reply) and reply.body.error.code == ErrorCode.BAD_REQUEST, topic
        assert reply.topic == "vectorstream.replies.acme" and "not allowed" in reply.body.error.message
    # a token of acme asking as globex: refused, on acme's topic (the verified tenant's), never globex's
    mismatch = svc.admit(*raw(cfg, tenant_id="globex", reply_topic="vectorstream.replies.globex"))
    assert isinstance(mismatch, Reply) and mismatch.body.error.code == ErrorCode.TENANT_MISMATCH
    assert mismatch.topic == "vectorstream.replies.acme"
    assert svc.admitted == 0


class Sink:
    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.sent = []

    async def send(self, reply):
        await self.behaviour(reply)
        self.sent.append(reply)


async def test_undeliverable_replies_are_counted_dropped_and_never_raise(cfg):
    from pipeline.query import UnknownReplyTopic

    async def hang(reply):
        await asyncio.sleep(3600)

    async def unknown(reply):
        raise UnknownReplyTopic(reply.topic)

    async def broken(reply):
        raise RuntimeError("broker says no")

    quick = cfg.model_copy(update={"query": cfg.query.model_copy(update={"reply_timeout_seconds": 0.05})})
    for behaviour, reason in ((hang, "timeout"), (unknown, "unknown_topic"), (broken, "broker_error")):
        svc = QueryService(quick, NoStore(), NoEmbedder(), Sink(behaviour))
        reply = svc.admit(*raw(quick, token=None))
        before = failed(reason)
        assert await svc.send(reply) is False
        assert failed(reason) == before + 1, reason


async def test_error_replies_beyond_the_backlog_are_dropped(cfg):
    gate = asyncio.Event()

    async def wait(reply):
        await gate.wait()

    small = cfg.model_copy(update={"query": cfg.query.model_copy(update={"max_pending_replies": 2})})
    sink = Sink(wait)
    svc = QueryService(small, NoStore(), NoEmbedder(), sink)
    before = failed("backlog")
    tasks = [svc.send_later(svc.admit(*raw(small, token=None))) for _ in range(3)]
    assert tasks[0] is not None and tasks[1] is not None and tasks[2] is None
    assert failed("backlog") == before + 1 and svc.pending_replies == 2
    gate.set()
    assert await asyncio.gather(tasks[0], tasks[1]) == [True, True]
    assert len(sink.sent) == 2 and svc.pending_replies == 0


async def test_the_admission_slot_is_free_before_the_reply_is_produced(cfg):
    """A reply that hangs (a broker that never confirms) must not hold the admission slot of its request."""

    class OneHitStore:
        sparse_record = None

        async def search(self, *a, **kw):
            return []

    class Embedder:
        name = "e"

        async def encode_query(self, texts):
            return np.zeros((len(texts), 4), dtype=np.float32)

    seen = []
    svc = None

    async def record(reply):
        seen.append(svc.admitted)
        await asyncio.sleep(3600)

    quick = cfg.model_copy(update={"query": cfg.query.model_copy(update={"reply_timeout_seconds": 0.2})})
    svc = QueryService(quick, OneHitStore(), Embedder(), Sink(record))
    job = svc.admit(*raw(quick))
    assert isinstance(job, Admitted) and svc.admitted == 1
    before = failed("timeout")
    reply = await svc.run(job)
    assert reply.ok and seen == [0] and svc.admitted == 0
    assert failed("timeout") == before + 1
    await svc.close()


def test_invalid_request_with_a_passed_deadline_is_dropped(cfg):
    svc = QueryService(cfg, NoStore(), NoEmbedder(), sink=None)
    assert svc.admit(*raw(cfg, top_k=0, deadline_ms=1)) is None


def test_hits_table():
    from agents.commands import hits_table
    from schemas.queries import QueryHit, QueryResult

    result = QueryResult(
        request_id="r",
        took_ms=1.0,
        model="m",
        hits=[
            QueryHit(doc_id="pw", chunk_index=0, score=0.91234, title="Reset", text="Reset\n\nOpen the settings."),
            QueryHit(doc_id="x" * 80, chunk_index=3, score=0.5, title="T", text=None),
        ],
    )
    lines = hits_table(result, width=100).splitlines()
    assert lines[0].split() == ["#", "score", "doc_id", "chunk", "title", "text"]
    assert "0.912" in lines[2] and "Open the settings." in lines[2] and "Reset  Reset" not in lines[2]
    assert all(len(line) <= 100 for line in lines)
    assert "(no readable chunk matches)" in hits_table(QueryResult(request_id="r", took_ms=1, model="m", hits=[]))
