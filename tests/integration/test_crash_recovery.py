"""A worker killed with SIGKILL after the store confirmed its writes but before the offsets were committed
replays those events on restart, and the store ends with every document searchable exactly once."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.client import DocumentPublisher
from pipeline.store.base import DOC, TENANT, VERSION, Filter, Match
from tests.integration.test_ingest_e2e import chunk_versions, good, open_edge
from tests.integration.workers import WorkerProcess

pytestmark = pytest.mark.integration


async def committed_offsets(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(max(o.offset, 0) for o in offsets.values())


async def test_sigkill_between_write_and_commit_replays_without_duplicates(apache_kafka, tmp_path, settings, embedder):
    bootstrap = apache_kafka.bootstrap_servers
    run = uuid.uuid4().hex[:8]
    topic, dlq, group = f"crash-{run}", f"crash-{run}.dlq", f"g-{run}"
    chunker = embedder.chunker()
    docs = [good(i) for i in range(40)]
    expected = {ev.doc_id: len(chunker.split(chunker.document_text(ev.title, ev.text))) for ev in docs}

    common = dict(
        bootstrap=bootstrap,
        store_path=tmp_path / "edge",
        topic=topic,
        dlq=dlq,
        group=group,
        log_path=tmp_path / "worker.log",
    )
    # a commit interval far longer than the test: writes get confirmed, offsets never get committed
    first = WorkerProcess(**common, extra_env={"VECTORSTREAM_KAFKA__COMMIT_INTERVAL_SECONDS": "3600"}).start()
    try:
        async with DocumentPublisher(bootstrap, topic) as pub:
            await pub.publish_many(docs)
        await asyncio.to_thread(first.wait_events, len(docs), 240)
        assert first.events("indexed") == len(docs)
    finally:
        first.kill()  # SIGKILL: no shutdown hook runs, nothing is flushed or committed
    assert await committed_offsets(bootstrap, group) == 0, "killed before any commit"

    second = WorkerProcess(**common).start()
    try:
        # the restarted worker gets every event again and recognises each as already applied
        await asyncio.to_thread(second.wait_events, len(docs), 240)
        assert second.events("ignored_stale") == len(docs)
        assert second.events("indexed") == 0
        await asyncio.to_thread(
            second.wait_for,
            lambda: asyncio.run(committed_offsets(bootstrap, group)) == len(docs),
            60,
            "offsets committed",
        )
    finally:
        assert await asyncio.to_thread(second.terminate) == 0

    store = await open_edge(settings, tmp_path / "edge")
    try:
        for ev in docs:
            assert await chunk_versions(store, "acme", ev.doc_id) == [1] * expected[ev.doc_id], ev.doc_id
        assert await store.count() == sum(expected.values())
        assert await store.count(Filter(must=(Match(TENANT, "acme"),))) == sum(expected.values())
        vec = (await embedder.encode([docs[7].text]))[0]
        top = await store.search(vec, flt=Filter(must=(Match(TENANT, "acme"),)), limit=1)
        assert top[0].payload[DOC] == "doc-7" and top[0].payload[VERSION] == 1
    finally:
        await store.close()


async def test_sigkill_mid_stream_then_restart_indexes_everything_once(apache_kafka, tmp_path, settings, embedder):
    """Killed at an arbitrary moment while batches are being embedded and written."""
    bootstrap = apache_kafka.bootstrap_servers
    run = uuid.uuid4().hex[:8]
    topic, group = f"crash2-{run}", f"g2-{run}"
    chunker = embedder.chunker()
    # 60 short documents (one or two chunks): 8 batches of 8, so the kill lands between batches of real work
    docs = [
        good(i, text=" ".join(f"Document {i} sentence {j} names item {i * 100 + j}." for j in range(5 + 20 * (i % 3))))
        for i in range(60)
    ]
    expected = sum(len(chunker.split(chunker.document_text(ev.title, ev.text))) for ev in docs)
    common = dict(
        bootstrap=bootstrap,
        store_path=tmp_path / "edge",
        topic=topic,
        dlq=f"{topic}.dlq",
        group=group,
        log_path=tmp_path / "worker.log",
        extra_env={"VECTORSTREAM_INGEST__MAX_BATCH_EVENTS": "8"},
    )
    first = WorkerProcess(**common).start()
    try:
        async with DocumentPublisher(bootstrap, topic) as pub:
            await pub.publish_many(docs)
        await asyncio.to_thread(first.wait_for, lambda: first.events() >= 16, 240, "a few batches done")
        done_before_kill = first.events()
    finally:
        first.kill()
    assert done_before_kill < len(docs), "killed while work was still in flight"

    second = WorkerProcess(**common).start()
    try:
        # events up to the last commit are not seen again; the rest are indexed or recognised as replays
        await asyncio.to_thread(
            second.wait_for,
            lambda: asyncio.run(committed_offsets(bootstrap, group)) == len(docs),
            240,
            "all offsets committed",
        )
    finally:
        assert await asyncio.to_thread(second.terminate) == 0
    store = await open_edge(settings, tmp_path / "edge")
    try:
        assert await store.count() == expected
        for ev in docs[::10]:
            assert set(await chunk_versions(store, "acme", ev.doc_id)) == {1}
    finally:
        await store.close()
