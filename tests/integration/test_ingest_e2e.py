"""Streaming ingest end to end on a real broker (Apache Kafka and Tansu) with a real worker process:
good events are all indexed, bad ones land in the dead-letter topic with their reason, versions only move
forward, updates leave no stale chunks, deletes and tombstones remove every chunk."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from pipeline.client import DocumentPublisher
from pipeline.store import open_store
from pipeline.store.base import DOC, TENANT, VERSION, Filter, Match
from schemas.dead_letter import DEAD_LETTER_HEADERS as H
from schemas.events import DocumentDelete, DocumentUpsert
from tests.integration.workers import WorkerProcess

pytestmark = pytest.mark.integration


def doc_text(i: int) -> str:
    n = 5 + (i % 4) * 60  # some single-chunk, some several chunks
    body = " ".join(f"Document {i} sentence {j} describes item {i * 100 + j} of the catalogue." for j in range(n))
    return body + f" The closing remark of document {i} mentions a unique marker zq{i}x."


def good(i: int, version: int = 1, tenant: str = "acme", text: str | None = None) -> DocumentUpsert:
    return DocumentUpsert(
        type="upsert",
        tenant_id=tenant,
        doc_id=f"doc-{i}",
        version=version,
        title=f"Doc {i}",
        text=text or doc_text(i),
        metadata={"n": i},
        access={"public": True},
    )


def raw(doc: str, obj) -> tuple[bytes, bytes]:
    return f"acme/{doc}".encode(), json.dumps(obj).encode()


def base(doc: str, **kw) -> dict:
    return {"type": "upsert", "tenant_id": "acme", "doc_id": doc, "version": 1, "text": "x", **kw}


#: (name, key, value, expected reason): sixteen kinds of bad input
BAD_INPUTS = [
    ("invalid_utf8", b"acme/b1", b"\xff\xfe\xfa not text", "invalid_utf8"),
    ("not_json", b"acme/b2", b"{this is not json", "invalid_json"),
    ("array", b"acme/b3", b"[1, 2, 3]", "not_an_object"),
    ("too_deep", b"acme/b4", b'{"a":' * 64 + b"1" + b"}" * 64, "too_deep"),
    ("unknown_field", *raw("b5", base("b5", colour="red")), "unknown_field"),
    (
        "missing_field",
        *raw("b6", {"type": "upsert", "tenant_id": "acme", "doc_id": "b6", "version": 1}),
        "missing_field",
    ),
    ("wrong_type", *raw("b7", base("b7", version="seven")), "wrong_type"),
    ("bad_tenant_id", b"ac$me/b8", json.dumps(base("b8", tenant_id="ac$me")).encode(), "invalid_value"),
    ("empty_text", *raw("b9", base("b9", text="")), "empty_text"),
    ("whitespace_text", *raw("b10", base("b10", text=" \n\t ")), "empty_text"),
    ("key_mismatch", b"acme/other", json.dumps(base("b11")).encode(), "key_mismatch"),
    ("oversize", *raw("b12", base("b12", text="y " * 600_000)), "oversize"),
    ("unknown_type", *raw("b13", base("b13", type="merge")), "unknown_event_type"),
    ("nul_in_text", *raw("b14", base("b14", text="a\x00b")), "invalid_value"),
    ("nested_metadata", *raw("b15", base("b15", metadata={"a": {"b": 1}})), "wrong_type"),
    (
        "huge_integer",
        b"acme/b16",
        b'{"type":"upsert","tenant_id":"acme","doc_id":"b16","version":' + b"9" * 5000 + b',"text":"x"}',
        "invalid_json",
    ),
    ("tombstone_bad_key", b"no-slash-here", None, "bad_key"),
]


async def read_topic(bootstrap: str, topic: str, n: int, wait_seconds: float = 60) -> list:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    out = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while len(out) < n and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                out.extend(msgs)
        # anything more would be a duplicate or a stray: give it a moment to show up
        extra = await consumer.getmany(timeout_ms=1000)
        for msgs in extra.values():
            out.extend(msgs)
    finally:
        await consumer.stop()
    return out


async def open_edge(settings, path):
    s = settings.model_copy(update={"store": settings.store.model_copy(update={"path": path})})
    store = open_store(s.store)
    await store.open(model="all-MiniLM-L6-v2", dim=384)
    return store


async def chunk_versions(store, tenant: str, doc: str) -> list[int]:
    hits = await store.scroll(Filter(must=(Match(TENANT, tenant), Match(DOC, doc))))
    return sorted(h.payload[VERSION] for h in hits)


async def test_ingest_end_to_end(broker, tmp_path, settings, embedder):
    run = uuid.uuid4().hex[:8]
    topic, dlq = f"docs-{run}", f"docs-{run}.dlq"
    chunker = embedder.chunker()

    def n_chunks(ev: DocumentUpsert) -> int:
        return len(chunker.split(chunker.document_text(ev.title, ev.text)))

    worker = WorkerProcess(
        bootstrap=broker,
        store_path=tmp_path / "edge",
        topic=topic,
        dlq=dlq,
        group=f"g-{run}",
        log_path=tmp_path / "worker.log",
    ).start()
    try:
        # phase 1: good events for two tenants, with every kind of bad input interleaved
        goods = [good(i) for i in range(24)] + [good(i, tenant="globex") for i in range(4)]
        async with DocumentPublisher(broker, topic) as pub:
            bad = iter(BAD_INPUTS)
            for i, ev in enumerate(goods):
                await pub.publish(ev)
                if i % 2 == 0 and (b := next(bad, None)):
                    await pub.send_raw(b[1], b[2])
            for b in bad:
                await pub.send_raw(b[1], b[2])
            await pub.flush()
        phase1 = len(goods) + len(BAD_INPUTS)
        await asyncio.to_thread(worker.wait_events, phase1, 240)

        # phase 2: an update, a late older version, a delete, a tombstone, and an out-of-order pair
        shorter = good(0, version=2, text="The second version of document zero is short.")
        async with DocumentPublisher(broker, topic) as pub:
            await pub.publish(shorter)
            await pub.publish(good(1, version=0, text="an older version arriving late"))
            await pub.publish(DocumentDelete(type="delete", tenant_id="acme", doc_id="doc-2", version=2))
            await pub.tombstone("acme", "doc-3")
            await pub.publish(good(4, version=3, text="version three of document four"))
            await pub.publish(good(4, version=2, text="version two of document four, late"))
            await pub.flush()
        await asyncio.to_thread(worker.wait_events, phase1 + 6, 120)
        metrics = worker.metrics()
    finally:
        code = await asyncio.to_thread(worker.terminate)
    assert code == 0, worker.log_tail()
    assert metrics["vectorstream_events_total{outcome=dead_lettered}"] == len(BAD_INPUTS)

    # the dead-letter topic holds each bad record once, with where it came from and why
    dead = await read_topic(broker, dlq, len(BAD_INPUTS))
    assert len(dead) == len(BAD_INPUTS)
    by_key = {}
    for msg in dead:
        headers = {k: v.decode() for k, v in msg.headers}
        assert headers[H["source_topic"]] == topic
        assert int(headers[H["source_offset"]]) >= 0 and H["source_partition"] in headers
        assert headers[H["stage"]] in {"decode", "validate", "chunk"}
        assert headers[H["error"]]
        by_key[msg.key] = (headers[H["reason"]], msg.value)
    for name, key, value, reason in BAD_INPUTS:
        got_reason, got_value = by_key[key]
        assert got_reason == reason, name
        assert got_value == value, f"{name}: the dead letter carries the original bytes"

    store = await open_edge(settings, tmp_path / "edge")
    try:
        # every good event around the bad ones is indexed, exactly once
        for ev in goods[5:]:
            assert await chunk_versions(store, ev.tenant_id, ev.doc_id) == [1] * n_chunks(ev), ev.doc_id
        assert await chunk_versions(store, "acme", "doc-0") == [2] * n_chunks(shorter)  # no stale chunks
        assert await chunk_versions(store, "acme", "doc-1") == [1] * n_chunks(goods[1])  # late v0 ignored
        assert await chunk_versions(store, "acme", "doc-2") == []  # deleted
        assert await chunk_versions(store, "acme", "doc-3") == []  # tombstone
        assert await chunk_versions(store, "acme", "doc-4") == [3]  # newest wins
        expected = sum(n_chunks(ev) for ev in goods[5:]) + n_chunks(shorter) + n_chunks(goods[1]) + 1
        assert await store.count() == expected
        # the last sentence of a long document is searchable
        long_doc = goods[23]
        assert n_chunks(long_doc) > 1
        vec = (await embedder.encode(["closing remark of document 23 unique marker zq23x"]))[0]
        hits = await store.search(vec, flt=Filter(must=(Match(TENANT, "acme"),)), limit=3)
        assert hits[0].payload[DOC] == "doc-23"
        assert "zq23x" in hits[0].payload["text"]
    finally:
        await store.close()
