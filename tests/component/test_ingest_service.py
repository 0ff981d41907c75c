"""The ingest service against a real Qdrant Edge store and the real model (no broker): versions, updates,
deletes, replays, reuse of unchanged chunks, transient failures and a crash between two writes."""

import functools
import json

import pytest

from pipeline.decode import Record
from pipeline.errors import StoreUnavailableError
from pipeline.ingest import IngestService
from pipeline.store import open_store
from pipeline.store.base import DOC, TENANT, VERSION, Filter, Match, VectorStore
from schemas.dead_letter import DeadLetterReason as R


class RecordingDeadLetters:
    def __init__(self):
        self.sent = []

    async def send(self, record, rejected):
        self.sent.append((record, rejected))


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so no retry catches it."""


class FaultyStore:
    """Delegates to a real store; ``fail[method] = n`` fails the next n calls (``Crash`` or transient)."""

    def __init__(self, inner):
        self.inner = inner
        self.fail = {}
        self.calls = {}

    def __getattr__(self, name):
        if name == "write_batch":  # the port's default, so that its calls go through the wrappers below
            return functools.partial(VectorStore.write_batch, self)
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        async def wrapped(*a, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            spec = self.fail.get(name)
            if spec and spec[1] > 0:
                self.fail[name] = (spec[0], spec[1] - 1)
                raise spec[0]("injected")
            return await attr(*a, **kw)

        return wrapped


@pytest.fixture
async def store(tmp_path, settings, embedder):
    s = settings.model_copy(update={"store": settings.store.model_copy(update={"path": tmp_path / "edge"})})
    st = open_store(s.store)
    await st.open(model=embedder.name, dim=embedder.dim)
    yield FaultyStore(st)
    await st.close()


@pytest.fixture
def service(settings, store, embedder):
    async def no_sleep(_):
        return None

    svc = IngestService(settings, store, embedder, RecordingDeadLetters(), sleep=no_sleep)
    return svc


_offset = iter(range(10**9))


def rec(event=None, *, key=None, value=None, raw=False):
    if not raw:
        key = f"{event['tenant_id']}/{event['doc_id']}".encode()
        value = json.dumps(event).encode()
    return Record("docs", 0, next(_offset), key, value, timestamp_ms=1)


def up(doc, version, text, tenant="acme", **extra):
    return {"type": "upsert", "tenant_id": tenant, "doc_id": doc, "version": version, "text": text, **extra}


def long_text(tag, n=60):
    return " ".join(f"Paragraph {i} of {tag} explains part {i} of the subject at length." for i in range(n))


async def chunks_of(store, doc, tenant="acme"):
    hits = await store.scroll(Filter(must=(Match(TENANT, tenant), Match(DOC, doc))))
    return sorted(hits, key=lambda h: h.payload["chunk_index"])


async def test_update_leaves_no_stale_chunks(service, store):
    await service.handle([rec(up("d", 1, long_text("v1", 120)))])
    before = await chunks_of(store, "d")
    assert len(before) >= 4
    report = await service.handle([rec(up("d", 2, "a much shorter second version"))])
    after = await chunks_of(store, "d")
    assert report.indexed == 1
    assert len(after) == 1 and {h.payload[VERSION] for h in after} == {2}


async def test_late_older_version_is_ignored(service, store):
    await service.handle([rec(up("d", 5, "version five"))])
    report = await service.handle([rec(up("d", 3, "version three, late"))])
    assert report.ignored == 1 and report.indexed == 0
    assert [h.payload["text"] for h in await chunks_of(store, "d")] == ["version five"]


async def test_delete_removes_every_chunk_and_wins_over_older_upserts(service, store):
    await service.handle([rec(up("d", 1, long_text("x", 80)))])
    await service.handle([rec({"type": "delete", "tenant_id": "acme", "doc_id": "d", "version": 2})])
    assert await chunks_of(store, "d") == []
    await service.handle([rec(up("d", 2, "same version as the delete"))])
    assert await chunks_of(store, "d") == []
    await service.handle([rec(up("d", 3, "newer than the delete"))])
    assert len(await chunks_of(store, "d")) == 1


async def test_tombstone_removes_every_chunk(service, store):
    await service.handle([rec(up("d", 7, long_text("y", 80)))])
    assert len(await chunks_of(store, "d")) > 1
    await service.handle([rec(key=b"acme/d", value=None, raw=True)])
    assert await chunks_of(store, "d") == []
    report = await service.handle([rec(up("d", 7, "the version before the tombstone"))])
    assert report.ignored == 1 and await chunks_of(store, "d") == []


async def test_same_document_twice_in_a_batch_writes_only_the_latest(service, store):
    report = await service.handle([rec(up("d", 1, long_text("one", 80))), rec(up("d", 2, "two"))])
    assert report.indexed == 1 and report.ignored == 1
    assert report.chunks_embedded == 1
    assert [h.payload["text"] for h in await chunks_of(store, "d")] == ["two"]


async def test_replaying_a_batch_changes_nothing(service, store):
    batch = [rec(up(f"d{i}", 1, long_text(f"doc{i}", 30))) for i in range(5)]
    await service.handle(batch)
    count = await store.count()
    report = await service.handle(batch)
    assert report.ignored == 5 and report.chunks_embedded == 0
    assert await store.count() == count


async def test_tenants_with_the_same_doc_id_do_not_collide(service, store):
    await service.handle([rec(up("d", 1, "acme text")), rec(up("d", 1, "globex text", tenant="globex"))])
    assert [h.payload["text"] for h in await chunks_of(store, "d")] == ["acme text"]
    assert [h.payload["text"] for h in await chunks_of(store, "d", tenant="globex")] == ["globex text"]


async def test_unchanged_chunks_reuse_their_vectors(service, store):
    paragraphs = [long_text(f"section {i}", 12) for i in range(6)]
    await service.handle([rec(up("d", 1, "\n".join(paragraphs)))])
    n = len(await chunks_of(store, "d"))
    paragraphs[-1] = "The last section was rewritten entirely and says something else now."
    report = await service.handle([rec(up("d", 2, "\n".join(paragraphs)))])
    assert report.chunks_reused >= n - 2 and report.chunks_embedded <= 2
    assert {h.payload[VERSION] for h in await chunks_of(store, "d")} == {2}


async def test_transient_store_failure_is_retried_not_dead_lettered(service, store):
    store.fail["upsert_chunks"] = (StoreUnavailableError, 3)
    report = await service.handle([rec(up("d", 1, "hello"))])
    assert report.retries == 3 and report.indexed == 1 and report.dead_lettered == 0
    assert service.dead_letters.sent == []
    assert len(await chunks_of(store, "d")) == 1


async def test_bad_records_are_dead_lettered_and_good_ones_indexed(service, store):
    batch = [
        rec(up("a", 1, "good one")),
        rec(key=b"acme/b", value=b"\xff not utf-8", raw=True),
        rec(up("c", 1, "   ")),
        rec(key=b"acme/x", value=json.dumps(up("y", 1, "mismatch")).encode(), raw=True),
        rec(up("d", 1, "good two")),
    ]
    report = await service.handle(batch)
    assert report.indexed == 2 and report.dead_lettered == 3
    assert [r.reason for _, r in service.dead_letters.sent] == [R.INVALID_UTF8, R.EMPTY_TEXT, R.KEY_MISMATCH]
    assert [rec.offset for rec, _ in service.dead_letters.sent] == [batch[1].offset, batch[2].offset, batch[3].offset]


async def test_crash_between_new_chunks_and_cleanup_leaves_document_searchable_then_replay_cleans(
    service, store, settings, embedder
):
    await service.handle([rec(up("d", 1, long_text("old", 120)))])
    old_n = len(await chunks_of(store, "d"))
    update = [rec(up("d", 2, long_text("new", 40)))]
    store.fail["delete_chunks"] = (Crash, 1)
    with pytest.raises(Crash):
        await service.handle(update)
    mid = await chunks_of(store, "d")
    assert mid, "the document stays searchable after a crash mid-update"
    assert len(mid) == old_n and {h.payload[VERSION] for h in mid} == {1, 2}
    # a new process replays the uncommitted batch
    report = await IngestService(settings, store, embedder, RecordingDeadLetters()).handle(update)
    assert report.indexed == 1
    final = await chunks_of(store, "d")
    assert {h.payload[VERSION] for h in final} == {2} and len(final) < old_n


async def test_worker_builds_the_hnsw_index_once_writes_go_quiet(service, store, embedder):
    await service.handle([rec(up(f"d{i}", 1, long_text(f"doc {i}", 20))) for i in range(30)])
    assert service.unindexed_points > 0
    assert not await service.maybe_build_index(idle_seconds=3600, max_unindexed=10**9)  # not quiet yet
    assert await service.maybe_build_index(idle_seconds=0, max_unindexed=10**9)
    info = await store.inner.open(model=embedder.name, dim=embedder.dim)
    assert info.extra["indexed_vectors"] == await store.count() > 0
    assert service.unindexed_points == 0
    assert not await service.maybe_build_index(idle_seconds=0, max_unindexed=10**9)  # nothing new


async def test_breaker_stops_a_bad_deploy_from_draining_the_topic(settings, store, embedder):
    from pipeline.errors import BreakerOpenError

    s = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"breaker_consecutive_failures": 5})})
    svc = IngestService(s, store, embedder, RecordingDeadLetters())
    garbage = [rec(key=b"acme/x", value=b"not json %d" % i, raw=True) for i in range(8)]
    with pytest.raises(BreakerOpenError, match="5 records in a row failed"):
        await svc.handle(garbage)
    assert len(svc.dead_letters.sent) == 5, "stops at the threshold, the rest stays in the topic"


async def test_breaker_ignores_bad_records_mixed_with_good_ones(settings, store, embedder):
    s = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"breaker_consecutive_failures": 3})})
    svc = IngestService(s, store, embedder, RecordingDeadLetters())
    for round_ in range(3):
        batch = [rec(key=b"acme/x", value=b"junk", raw=True) for _ in range(5)]
        batch.append(rec(up(f"ok{round_}", 1, "a good document")))
        report = await svc.handle(batch)
        assert report.dead_lettered == 5 and report.indexed == 1
    assert svc.consecutive_failures == 0


class PoisonedEmbedder:
    """Delegates to the real embedder, but cannot embed any text containing ``poison`` (a model that chokes on
    one document's content: a permanent, per-record failure)."""

    def __init__(self, inner, poison):
        self.inner = inner
        self.poison = poison

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def encode(self, texts, lengths=None):
        if any(self.poison in t for t in texts):
            raise ValueError("the model cannot embed this text")
        return await self.inner.encode(texts, lengths)


async def test_a_record_that_fails_to_embed_is_dead_lettered_once_when_the_write_is_retried(settings, store, embedder):
    # regression: the dead letter was produced inside the write's retry loop, so a transient registry failure
    # after it replayed the batch and dead-lettered the same record a second time (dead_lettered == 2)
    async def no_sleep(_):
        return None

    svc = IngestService(settings, store, PoisonedEmbedder(embedder, "POISON"), RecordingDeadLetters(), sleep=no_sleep)
    store.fail["put_doc_states"] = (StoreUnavailableError, 1)
    bad = rec(up("bad", 1, "this text is POISON to the model"))
    report = await svc.handle([rec(up("good", 1, "a document the model embeds")), bad])
    assert report.retries == 1
    assert report.dead_lettered == 1 and report.reasons == {R.EMBEDDING_FAILED.value: 1}
    assert [(r.offset, why.reason) for r, why in svc.dead_letters.sent] == [(bad.offset, R.EMBEDDING_FAILED)]
    assert report.indexed == 1
    assert [h.payload["text"] for h in await chunks_of(store, "good")] == ["a document the model embeds"]
    assert await chunks_of(store, "bad") == []
    states = await store.get_doc_states([("acme", "good"), ("acme", "bad")])
    assert set(states) == {("acme", "good")}, "the registry records the written document, not the rejected one"


class CountingEmbedder:
    """Delegates to the real embedder and counts the texts it was asked to embed."""

    def __init__(self, inner):
        self.inner = inner
        self.texts = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def encode(self, texts, lengths=None):
        self.texts += len(texts)
        return await self.inner.encode(texts, lengths)


async def test_a_retried_write_repeats_the_writes_not_the_embedding(settings, store, embedder):
    async def no_sleep(_):
        return None

    counting = CountingEmbedder(embedder)
    svc = IngestService(settings, store, counting, RecordingDeadLetters(), sleep=no_sleep)
    store.fail["put_doc_states"] = (StoreUnavailableError, 2)
    report = await svc.handle([rec(up("d", 1, long_text("retried", 40)))])
    n = len(await chunks_of(store, "d"))
    assert report.retries == 2 and report.indexed == 1 and n > 1
    assert counting.texts == report.chunks_embedded == n, "each chunk embedded once, whatever the retries"
    assert store.calls["upsert_chunks"] == 3, "the writes are repeated from the plan"


async def test_a_transient_registry_read_failure_is_retried(service, store):
    store.fail["get_doc_states"] = (StoreUnavailableError, 2)
    report = await service.handle([rec(up("d", 1, "hello"))])
    assert report.retries == 2 and report.indexed == 1 and report.dead_lettered == 0
    assert [h.payload["text"] for h in await chunks_of(store, "d")] == ["hello"]


async def test_stopping_while_the_write_waits_dead_letters_nothing_and_gives_the_batch_back(settings, store, embedder):
    from pipeline.errors import ShutdownRequested

    svc = None

    async def stop_while_waiting(_):
        svc.stopping = True

    svc = IngestService(
        settings, store, PoisonedEmbedder(embedder, "POISON"), RecordingDeadLetters(), sleep=stop_while_waiting
    )
    store.fail["put_doc_states"] = (StoreUnavailableError, 10**6)
    batch = [
        rec(up("good", 1, "fine text")),
        rec(up("bad", 1, "POISON text")),
        rec(key=b"acme/x", value=b"junk", raw=True),
    ]
    with pytest.raises(ShutdownRequested):
        await svc.handle(batch)
    assert svc.dead_letters.sent == [], "no dead letter before the batch's writes are confirmed"
    assert not svc.paused
    # the replay, once the store is back, writes the good record and dead-letters each bad one once
    store.fail.clear()
    replay = IngestService(settings, store, PoisonedEmbedder(embedder, "POISON"), RecordingDeadLetters())
    report = await replay.handle(batch)
    assert report.indexed == 1 and report.dead_lettered == 2
    assert [r.offset for r, _ in replay.dead_letters.sent] == [batch[1].offset, batch[2].offset]


async def test_breaker_stops_a_model_that_embeds_nothing(settings, store, embedder):
    from pipeline.errors import BreakerOpenError

    s = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"breaker_consecutive_failures": 3})})
    svc = IngestService(s, store, PoisonedEmbedder(embedder, " "), RecordingDeadLetters())
    batch = [rec(up(f"d{i}", 1, f"document number {i}")) for i in range(6)]
    with pytest.raises(BreakerOpenError, match="3 records in a row failed"):
        await svc.handle(batch)
    assert [why.reason for _, why in svc.dead_letters.sent] == [R.EMBEDDING_FAILED] * 3
    assert await store.count() == 0


# --- two batches in flight (the agent's ingest.batches_in_flight) ---------------------------------------------


async def test_overlapping_batches_of_the_same_document_resolve_in_order(service, store):
    """The second batch names a document the first is still writing: it plans on the first one's result, so the
    older version in the later batch is ignored and the newer one of the first batch stays."""
    import asyncio

    first = asyncio.ensure_future(service.handle([rec(up("d", 2, long_text("v2", 40)))]))
    second = asyncio.ensure_future(service.handle([rec(up("d", 1, "version one, late"))]))
    r1, r2 = await asyncio.gather(first, second)
    assert r1.indexed == 1 and r2.ignored == 1 and r2.indexed == 0
    assert {h.payload[VERSION] for h in await chunks_of(store, "d")} == {2}


async def test_overlapping_batches_write_and_finish_in_batch_order(service, store):
    """Disjoint documents overlap (the second plans and embeds while the first writes), but the first batch's
    writes are confirmed before the second's start, so acks never run ahead of a write."""
    import asyncio

    order = []
    inner_write = store.inner.upsert_chunks

    async def recording_upsert(points, *a, **kw):
        order.append({p.payload[DOC] for p in points})
        return await inner_write(points, *a, **kw)

    store.inner.upsert_chunks = recording_upsert
    first = asyncio.ensure_future(service.handle([rec(up("a", 1, long_text("a", 80)))]))
    second = asyncio.ensure_future(service.handle([rec(up("b", 1, "short b"))]))
    done_order = []
    first.add_done_callback(lambda _: done_order.append("first"))
    second.add_done_callback(lambda _: done_order.append("second"))
    r1, r2 = await asyncio.gather(first, second)
    assert r1.indexed == 1 and r2.indexed == 1
    assert order and order[0] == {"a"} and order[-1] == {"b"}
    assert done_order == ["first", "second"]


async def test_three_in_flight_resolve_against_a_batch_two_back(service, store):
    """With more than two batches in flight (ingest.batches_in_flight up to 8) the document may be two batches
    back: the third batch names the first one's document, not the second's, and still plans on its result."""
    import asyncio

    first = asyncio.ensure_future(service.handle([rec(up("d", 2, long_text("v2", 40)))]))
    second = asyncio.ensure_future(service.handle([rec(up("other", 1, long_text("o", 40)))]))
    third = asyncio.ensure_future(service.handle([rec(up("d", 1, "version one, late"))]))
    r1, r2, r3 = await asyncio.gather(first, second, third)
    assert r1.indexed == 1 and r2.indexed == 1
    assert r3.ignored == 1 and r3.indexed == 0
    assert {h.payload[VERSION] for h in await chunks_of(store, "d")} == {2}


async def test_a_batch_after_a_failed_one_writes_nothing(service, store):
    """The first batch dies (a crash in its write): the one after it in flight is given back without writing."""
    import asyncio

    from pipeline.ingest import EarlierBatchFailed

    store.fail["upsert_chunks"] = (Crash, 1)
    first = asyncio.ensure_future(service.handle([rec(up("a", 1, "doc a"))]))
    second = asyncio.ensure_future(service.handle([rec(up("b", 1, "doc b"))]))
    with pytest.raises(Crash):
        await first
    with pytest.raises(EarlierBatchFailed):
        await second
    assert await chunks_of(store, "b") == []
    # the service is usable again afterwards: nothing in flight is left behind
    report = await service.handle([rec(up("b", 1, "doc b"))])
    assert report.indexed == 1
