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
        "reply_topic": cfg.kafka.replies_topic,
        "deadline_ms": int(time.time() * 1000) + 5000,
        "token": mint_token(cfg.query, tenant="acme", user="u"),
        **over,
    }
    return b"r1", json.dumps(body).encode()


async def test_batcher_collects_a_window_then_encodes_once():
    calls = []

    async def encode(texts):
        calls.append(list(texts))
        return np.array([[float(len(t))] for t in texts])

    b = MicroBatcher(encode, window=0.02, max_batch=8)
    out = await asyncio.gather(*(b.embed("x" * i) for i in range(1, 6)))
    assert calls == [["x", "xx", "xxx", "xxxx", "xxxxx"]]
    assert [float(v[0]) for v in out] == [1, 2, 3, 4, 5]
    await b.close()


async def test_batcher_splits_at_max_batch_and_skips_cancelled_callers():
    calls = []
    gate = asyncio.Event()

    async def encode(texts):
        calls.append(list(texts))
        await gate.wait()
        return np.zeros((len(texts), 1))

    b = MicroBatcher(encode, window=0.5, max_batch=2)
    tasks = [asyncio.ensure_future(b.embed(str(i))) for i in range(5)]
    await asyncio.sleep(0.01)
    assert calls == [["0", "1"]]  # a full batch does not wait for the window
    tasks[2].cancel()  # gave up while queued: never encoded
    gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert calls[1:] == [["3", "4"]] or calls[1:] == [["3"], ["4"]]
    await b.close()


async def test_batcher_errors_reach_every_caller():
    async def encode(texts):
        raise RuntimeError("model broke")

    b = MicroBatcher(encode, window=0, max_batch=4)
    results = await asyncio.gather(b.embed("a"), b.embed("b"), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
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


@pytest.mark.parametrize(
    "key,value,request_id",
    [
        (b"k1", b"\xff\xfe", "k1"),
        (None, b"[]", ""),
        (b"k2", b'{"request_id": "from-body", "reply_topic": 5}', "from-body"),
        (b"k3", None, "k3"),
        (b"k4", b"x" * 70_000, "k4"),
    ],
)
def test_unreadable_requests_still_get_a_reply(cfg, key, value, request_id):
    svc = QueryService(cfg, NoStore(), NoEmbedder(), sink=None)
    reply = svc.admit(key, value)
    assert isinstance(reply, Reply) and reply.body.error.code == ErrorCode.BAD_REQUEST
    assert reply.request_id == request_id and reply.topic == cfg.kafka.replies_topic


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
