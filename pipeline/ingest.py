"""Ingest: apply a batch of consumed document events to the vector store, exactly once in effect.

Delivery contract — at-least-once from Kafka, idempotent into Qdrant, so the visible result is
exactly-once. The agent that feeds :meth:`IngestService.handle` relies on these rules:

1. Point ids are deterministic: ``uuid5(tenant, document, chunk index)``. A replayed event overwrites
   the same points instead of adding new ones.
2. ``handle`` takes a batch through three steps, and returns only when the last one is done:

   - **plan**: decode every record, read the registry, resolve the version rules (rule 4), chunk, and
     reuse (rule 6) or embed every chunk to write. The result, a :class:`BatchPlan`, holds everything the
     batch will write and every record it rejects; nothing has been written yet. A record that cannot be
     decoded or embedded is rejected here, once.
   - **write**: the plan's writes, in the order of rule 5, each confirmed by the store (``wait=True``),
     under one retry policy (rule 3). Every write is idempotent, so a retry repeats the plan's writes;
     it never plans, embeds or rejects again.
   - **acknowledge**: once every write is confirmed, each rejected record is produced to the dead-letter
     topic, once, with the broker's confirmation, in batch order.

   The caller acks (commits) the batch's offsets after ``handle`` returns, never before and never in a
   ``finally``: an exception or a cancellation at any step leaves the whole batch uncommitted, to be
   replayed (the replay finds the written documents' versions in the registry and ignores them).
3. Transient failures (the store or the broker unreachable, timeouts, anything unexpected) are retried
   with capped exponential backoff while consumption waits (the ``vectorstream_ingest_paused`` gauge
   is 1). They never dead-letter good data and never let an offset be committed past it. A stop
   requested meanwhile gives the batch back uncommitted (``ShutdownRequested``).
   Permanent failures of one record (undecodable, schema violation, oversize, empty text, a text the
   model cannot embed) dead-letter that record only; the rest of the batch is indexed. When every
   record in a row fails (``ingest.breaker_consecutive_failures``), the breaker stops consumption
   instead (``BreakerOpenError``): a batch with good records in it is bad data, not a bad deploy, so
   its undecodable records do not count towards that; records the model cannot embed always do.
4. Versions only move forward. A registry (one record per document) remembers the newest version
   applied and whether it was deleted. An upsert or delete whose version is not above the stored one
   is ignored; a delete of the same version as a stored upsert wins. A tombstone (null value) deletes
   whatever version is stored. A batch's events of one document are resolved in offset order against
   the stored state (``resolve``), and only their net effect is written.
5. An update first writes the new version's chunks (overwriting the old ones index by index), then
   removes the old version's leftover chunks, then records the new version in the registry. A crash
   between any two steps leaves the old or the new document searchable, never neither, and the replay
   completes it because the registry still names the old version.
6. Chunks whose text did not change since the stored version reuse their stored vectors (checked
   against the stored point's own content hash) instead of being embedded again.
7. In a collection with sparse vectors every chunk written also gets its BM25 vector, from its text under
   the collection's own tokenizer record (``VectorStore.sparse_record``; the store refused to open with a
   different one). That covers reused chunks too: tokenizing is deterministic under the record, so a
   rewritten unchanged chunk gets the very vector it had, and no chunk is ever written without one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from pipeline import metrics as m
from pipeline.chunking import Chunk
from pipeline.decode import Event, Record, Rejected, Tombstone, decode_record
from pipeline.embedding import Embedder
from pipeline.errors import BreakerOpenError, EmbeddingError, ShutdownRequested, VectorstreamError
from pipeline.settings import Settings
from pipeline.sparse import SparseEncoder
from pipeline.store.base import (
    ACL_GROUPS,
    ACL_PUBLIC,
    ACL_USERS,
    CHUNK_INDEX,
    CONTENT_HASH,
    DOC,
    META_PREFIX,
    MODEL,
    TENANT,
    TEXT,
    TITLE,
    VERSION,
    ChunkPoint,
    DocState,
    Filter,
    Match,
    Range,
    SparseVector,
    VectorStore,
    chunk_point_id,
)
from schemas.dead_letter import DeadLetterReason, DeadLetterStage
from schemas.events import DocumentDelete, DocumentUpsert

log = logging.getLogger(__name__)
T = TypeVar("T")
DocKey = tuple[str, str]


class DeadLetterSink(Protocol):
    async def send(self, record: Record, rejected: Rejected) -> None:
        """Produce the record to the dead-letter topic and return once the broker confirmed it."""


@dataclass
class BatchReport:
    records: int = 0
    indexed: int = 0
    deleted: int = 0
    ignored: int = 0
    dead_lettered: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    retries: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


# --- the version rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpsertOp:
    """The net effect of a batch on one document: write this version (``record`` carried it)."""

    key: DocKey
    record: Record
    event: DocumentUpsert
    is_delete: ClassVar[bool] = False

    @property
    def version(self) -> int:
        return self.event.version


@dataclass(frozen=True)
class DeleteOp:
    """The net effect of a batch on one document: delete it, and record it deleted at ``version``."""

    key: DocKey
    record: Record
    version: int
    is_delete: ClassVar[bool] = True


Op = UpsertOp | DeleteOp


def _key_of(event: Event) -> DocKey:
    return (event.tenant_id, event.doc_id)


def doc_key_of(payload: Mapping[str, Any]) -> DocKey | None:
    """The (tenant, document) a stored chunk belongs to, or None for a point without one."""
    tenant_id, doc_id = payload.get(TENANT), payload.get(DOC)
    if isinstance(tenant_id, str) and isinstance(doc_id, str):
        return (tenant_id, doc_id)
    return None


def source_of(record: Record) -> tuple[str, int, int, int]:
    """Where ``record`` sits in the log, as a DocState records it: (topic, partition, offset, timestamp_ms or -1)."""
    return (record.topic, record.partition, record.offset, record.timestamp_ms if record.timestamp_ms else -1)


def replayed(record: Record, source: tuple[str, int, int, int] | None) -> bool:
    """Whether ``record`` sits before the event that produced the current state, in the same partition: it was
    applied already and is being read again (a lost commit: a crash, a rebalance).

    Offsets restart when a topic is deleted and recreated, so the record must also not be younger than that
    event (record timestamps; when either is unknown, the offsets decide alone)."""
    if source is None:
        return False
    topic, partition, offset, timestamp_ms = source
    if (record.topic, record.partition) != (topic, partition) or record.offset >= offset:
        return False
    return not (record.timestamp_ms and timestamp_ms >= 0 and record.timestamp_ms > timestamp_ms)


def resolve(events: Sequence[tuple[Record, Event]], stored: Mapping[DocKey, DocState]) -> list[Op]:
    """Apply the version rules event by event, starting from the registry's state, and return the net
    change per document (``events`` in consumption order; one document's events are in offset order).

    - an upsert applies when its version is above the current one;
    - a delete applies when its version is above the current one, or equal to a live upsert's;
    - a tombstone deletes whatever is there and keeps the current version, unless it is a replay: it sits
      before the event that produced the current state (a tombstone has no version of its own, so without
      this a replayed "v1, tombstone, v2" would delete v2 and then ignore the replayed v2 as not newer);
    - anything else is stale (a late older version, or a replay) and changes nothing.
    Documents whose state did not change get no op.
    """
    state: dict[DocKey, tuple[int | None, bool, tuple[str, int, int, int] | None]] = {
        k: (s.version, s.deleted, s.source) for k, s in stored.items()
    }
    ops: dict[DocKey, Op] = {}
    for record, event in events:
        key = _key_of(event)
        version, deleted, source = state.get(key, (None, False, None))
        op: Op
        if isinstance(event, Tombstone):
            if deleted or replayed(record, source):
                continue
            op = DeleteOp(key, record, version or 0)
        elif isinstance(event, DocumentDelete):
            if version is not None and (event.version < version or (event.version == version and deleted)):
                continue
            op = DeleteOp(key, record, event.version)
        else:
            if version is not None and event.version <= version:
                continue
            op = UpsertOp(key, record, event)
        state[key] = (op.version, op.is_delete, source_of(record))
        ops[key] = op
    return list(ops.values())


def chunk_payload(event: DocumentUpsert, chunk: Chunk, model: str) -> dict:
    return {
        TENANT: event.tenant_id,
        DOC: event.doc_id,
        VERSION: event.version,
        CHUNK_INDEX: chunk.index,
        TITLE: event.title,
        TEXT: chunk.text,
        META_PREFIX: dict(event.metadata),
        ACL_PUBLIC: event.access.public,
        ACL_USERS: list(event.access.users),
        ACL_GROUPS: list(event.access.groups),
        CONTENT_HASH: chunk.content_hash,
        MODEL: model,
    }


# --- the plan of one batch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedUpsert:
    """One document version to write: its chunks and, index for index, their vectors."""

    op: UpsertOp
    chunks: tuple[Chunk, ...]
    vectors: tuple[list[float], ...]
    #: index for index, the chunks' BM25 vectors (rule 7); empty when the collection has no sparse vectors
    sparse: tuple[SparseVector, ...] = ()

    def points(self, model: str) -> list[ChunkPoint]:
        ev = self.op.event
        sparse: Sequence[SparseVector | None] = self.sparse or [None] * len(self.chunks)
        return [
            ChunkPoint(
                chunk_point_id(ev.tenant_id, ev.doc_id, chunk.index), vector, chunk_payload(ev, chunk, model), terms
            )
            for chunk, vector, terms in zip(self.chunks, self.vectors, sparse, strict=True)
        ]

    def state(self) -> DocState:
        ev = self.op.event
        hashes = tuple(c.content_hash for c in self.chunks)
        return DocState(ev.tenant_id, ev.doc_id, ev.version, False, len(hashes), hashes, source_of(self.op.record))


@dataclass(frozen=True)
class RejectedRecord:
    """A record that can never be processed, and where it sits in its batch."""

    position: int
    record: Record
    why: Rejected


@dataclass
class BatchPlan:
    """Everything one batch does, decided before anything is written (see rule 2)."""

    records: int
    #: records that decoded to a document event
    decoded: int = 0
    upserts: list[PlannedUpsert] = field(default_factory=list)
    deletes: list[DeleteOp] = field(default_factory=list)
    #: decoded events that change nothing: stale, replayed, or superseded within the batch
    ignored: int = 0
    #: in batch order
    rejected: list[RejectedRecord] = field(default_factory=list)
    chunks_embedded: int = 0
    chunks_reused: int = 0

    @property
    def has_writes(self) -> bool:
        return bool(self.upserts or self.deletes)

    def doc_states(self) -> list[DocState]:
        """What the registry records once the chunks are written."""
        return [
            *(u.state() for u in self.upserts),
            *(DocState(op.key[0], op.key[1], op.version, True, 0, (), source_of(op.record)) for op in self.deletes),
        ]


class EarlierBatchFailed(VectorstreamError):
    """The batch before this one failed; this one wrote nothing and is given back uncommitted with it."""


@dataclass
class _Admitted:
    """A batch in flight: its documents, and whether its writes and dead letters were confirmed."""

    keys: frozenset[DocKey]
    done: asyncio.Future[bool]
    #: the documents of this batch and of every earlier batch still in flight when it was admitted: a batch
    #: finishes only after its predecessor did, so waiting for this one waits for all of those
    covers: frozenset[DocKey] = frozenset()

    async def wait(self) -> None:
        if not await asyncio.shield(self.done):
            raise EarlierBatchFailed("an earlier batch in flight failed; this one is given back with it")


class IngestService:
    """Plans, writes and acknowledges batches of document events; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        embedder: Embedder,
        dead_letters: DeadLetterSink,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.chunker = embedder.chunker()
        self.dead_letters = dead_letters
        self._sleep = sleep
        self.upsert_batch_points = 512
        #: chunk points written since the HNSW index was last built, and when the last write happened
        self.unindexed_points = 0
        self.last_write = 0.0
        #: batches being applied, and when the last one finished: the index is built only when neither is recent
        self._in_flight = 0
        self._last_busy = 0.0
        #: dead letters since the last record that was applied, in batch order (the breaker's evidence)
        self.consecutive_failures = 0
        #: set when the process is asked to stop: a batch waiting in a retry loop is given back
        self.stopping = False
        #: true while a batch waits in a retry loop for a dependency
        self.paused = False
        #: the last batch admitted by ``handle`` and still in flight (the next one orders itself after it)
        self._last_admitted: _Admitted | None = None
        self._sparse: SparseEncoder | None = None

    def sparse_encoder(self) -> SparseEncoder | None:
        """The BM25 encoder of the open collection's tokenizer record (rule 7); None when it has no sparse vectors."""
        record = self.store.sparse_record
        if record is None:
            return None
        if self._sparse is None or self._sparse.record() != record:
            self._sparse = SparseEncoder.from_record(record)
        return self._sparse

    # --- the entry point ---------------------------------------------------------------------------------

    async def handle(self, records: Sequence[Record]) -> BatchReport:
        """Plan, write, then dead-letter the rejected records; returns only when all are confirmed (rule 2).

        Two calls may overlap (the agent plans and embeds the next batch while this one writes, so the model
        is not idle during the writes): a batch plans only after every earlier batch in flight that holds one
        of its documents has written, and it writes and dead-letters only after the batch before it did, so
        writes, dead letters and acks keep batch order. A batch whose predecessor failed writes nothing and
        raises :class:`EarlierBatchFailed`.
        """
        self._in_flight += 1
        # admitted in call order, before the first await: the decode is pure and needs no I/O
        plan = BatchPlan(records=len(records))
        events, position = self._decode(records, plan)
        keys = frozenset(_key_of(ev) for _, ev in events)
        earlier = self._last_admitted
        pending = earlier.covers if earlier is not None and not earlier.done.done() else frozenset()
        mine = _Admitted(keys, asyncio.get_running_loop().create_future(), covers=keys | pending)
        self._last_admitted = mine
        ok = False
        try:
            report = BatchReport(records=len(records))
            m.BATCH_EVENTS.observe(len(records))
            if earlier is not None and pending & keys:
                # the same document in an earlier batch still in flight (not only the one just before: with
                # batches_in_flight > 2 it may be two back): resolve against its written state
                await earlier.wait()
            await self._plan(plan, events, position, report)
            if earlier is not None:
                await earlier.wait()
            if plan.has_writes:
                await self._retrying(lambda: self._write(plan), report)
            self._written(plan, report)
            await self._acknowledge(plan, report)
            ok = True
            return report
        finally:
            mine.done.set_result(ok)
            if self._last_admitted is mine:
                self._last_admitted = None
            self._in_flight -= 1
            self._last_busy = time.monotonic()

    async def maybe_build_index(self, *, idle_seconds: float, max_unindexed: int) -> bool:
        """Build (extend) the HNSW index once writes went quiet, or when too much is unindexed.

        Qdrant Edge indexes only when asked; a Qdrant server indexes by itself and this is cheap there.
        """
        if not self.unindexed_points:
            return False
        # quiet means no batch in flight either: a build while the model embeds the next batch takes cores from
        # it (measured at 100k chunks: the worker's embedding took twice as long)
        quiet = not self._in_flight and time.monotonic() - max(self.last_write, self._last_busy) >= idle_seconds
        if not quiet and self.unindexed_points < max_unindexed:
            return False
        pending = self.unindexed_points
        started = time.perf_counter()
        await self.store.build_index()
        self.unindexed_points = max(0, self.unindexed_points - pending)
        m.INDEX_BUILDS.inc()
        m.INDEX_BUILD_SECONDS.observe(time.perf_counter() - started)
        log.info("HNSW index built over %d new points in %.2fs", pending, time.perf_counter() - started)
        return True

    # --- plan: decide everything, write nothing --------------------------------------------------------------

    def _decode(
        self, records: Sequence[Record], plan: BatchPlan
    ) -> tuple[list[tuple[Record, Event]], dict[tuple[str, int, int], int]]:
        """Decode every record; the undecodable ones join the plan's rejected records."""
        cfg = self.settings.ingest
        events: list[tuple[Record, Event]] = []
        position: dict[tuple[str, int, int], int] = {}
        for i, record in enumerate(records):
            decoded = decode_record(record, max_bytes=cfg.max_message_bytes, max_depth=cfg.max_json_depth)
            if isinstance(decoded, Rejected):
                plan.rejected.append(RejectedRecord(i, record, decoded))
            else:
                events.append((record, decoded))
                position[_coordinates(record)] = i
        plan.decoded = len(events)
        return events, position

    async def _plan(
        self,
        plan: BatchPlan,
        events: list[tuple[Record, Event]],
        position: dict[tuple[str, int, int], int],
        report: BatchReport,
    ) -> BatchPlan:
        """Resolve the decoded events against the registry, chunk, reuse or embed. Reads the store (each read
        retried, like the writes, with ``report`` counting the retries) but never writes to it."""
        if not events:
            return plan

        keys = list(dict.fromkeys(_key_of(ev) for _, ev in events))
        states = await self._retrying(lambda: self.store.get_doc_states(keys), report)
        ops = resolve(events, states)
        plan.ignored = len(events) - len(ops)
        plan.deletes = [op for op in ops if isinstance(op, DeleteOp)]
        upserts = [op for op in ops if isinstance(op, UpsertOp)]
        if not upserts:
            return plan

        chunks = {
            op.key: tuple(self.chunker.split(self.chunker.document_text(op.event.title, op.event.text)))
            for op in upserts
        }
        previous = [op for op in upserts if (s := states.get(op.key)) and not s.deleted]
        reusable = await self._retrying(lambda: self._reusable_vectors(previous, chunks), report)
        vectors: dict[tuple[DocKey, int], np.ndarray] = {}
        to_embed: list[tuple[DocKey, Chunk]] = []
        for op in upserts:
            for chunk in chunks[op.key]:
                vec = reusable.get((op.key, chunk.content_hash))
                if vec is not None:
                    vectors[(op.key, chunk.index)] = vec
                else:
                    to_embed.append((op.key, chunk))
        plan.chunks_reused = len(vectors)
        computed, failed = await self._embed(to_embed)
        plan.chunks_embedded = len(computed)
        vectors.update(computed)

        encoder = self.sparse_encoder()
        for op in upserts:
            error = failed.get(op.key)
            if error is not None:
                plan.rejected.append(RejectedRecord(position[_coordinates(op.record)], op.record, Rejected.of(error)))
                continue
            doc_chunks = chunks[op.key]
            terms = tuple(encoder.encode_document(c.text) for c in doc_chunks) if encoder is not None else ()
            plan.upserts.append(
                PlannedUpsert(op, doc_chunks, tuple(vectors[(op.key, c.index)].tolist() for c in doc_chunks), terms)
            )
        plan.rejected.sort(key=lambda r: r.position)
        return plan

    async def _reusable_vectors(
        self, ops: list[UpsertOp], chunks: Mapping[DocKey, tuple[Chunk, ...]]
    ) -> dict[tuple[DocKey, str], np.ndarray]:
        """Stored vectors of the documents' current chunks, by content hash (rule 6)."""
        if not ops:
            return {}
        wanted = {op.key for op in ops}
        flt = Filter(should=tuple(Filter(must=(Match(TENANT, t), Match(DOC, d))) for t, d in wanted))
        stored = await self.store.scroll(flt, limit=100_000)
        new_hashes = {(op.key, c.content_hash) for op in ops for c in chunks[op.key]}
        by_id: dict[str, tuple[DocKey, str]] = {}
        for hit in stored:
            key = doc_key_of(hit.payload)
            digest = hit.payload.get(CONTENT_HASH)
            if key is None or not isinstance(digest, str) or hit.payload.get(MODEL) != self.embedder.name:
                continue
            if (key, digest) in new_hashes:
                by_id[hit.id] = (key, digest)
        if not by_id:
            return {}
        found = await self.store.get_vectors(list(by_id))
        return {by_id[pid]: np.asarray(vec, dtype=np.float32) for pid, vec in found.items()}

    async def _embed(
        self, wanted: list[tuple[DocKey, Chunk]]
    ) -> tuple[dict[tuple[DocKey, int], np.ndarray], dict[DocKey, EmbeddingError]]:
        """Embed the wanted chunks; a document whose text the model cannot embed is isolated, not retried."""
        if not wanted:
            return {}, {}
        texts = [c.text for _, c in wanted]
        lengths = [c.tokens for _, c in wanted]
        try:
            vecs = await self.embedder.encode(texts, lengths)  # the embedder observes the model's time
        except Exception:  # noqa: BLE001 - find the document(s) at fault, embed the rest
            log.exception("embedding a batch of %d chunks failed; isolating the documents at fault", len(texts))
            return await self._embed_isolating(wanted)
        m.EMBED_TOKENS.inc(sum(lengths))
        return {(key, c.index): vecs[j] for j, (key, c) in enumerate(wanted)}, {}

    async def _embed_isolating(
        self, wanted: list[tuple[DocKey, Chunk]]
    ) -> tuple[dict[tuple[DocKey, int], np.ndarray], dict[DocKey, EmbeddingError]]:
        by_doc: dict[DocKey, list[Chunk]] = {}
        for key, chunk in wanted:
            by_doc.setdefault(key, []).append(chunk)
        out: dict[tuple[DocKey, int], np.ndarray] = {}
        failed: dict[DocKey, EmbeddingError] = {}
        for key, doc_chunks in by_doc.items():
            try:
                vecs = await self.embedder.encode([c.text for c in doc_chunks])
            except Exception as exc:  # noqa: BLE001
                message = f"the model could not embed this document: {type(exc).__name__}: {exc}"[:500]
                failed[key] = EmbeddingError(DeadLetterReason.EMBEDDING_FAILED, message)
                continue
            out.update({(key, c.index): vecs[j] for j, c in enumerate(doc_chunks)})
        return out, failed

    # --- write: the plan's writes, idempotent, in the order of rule 5 ------------------------------------------

    async def _write(self, plan: BatchPlan) -> None:
        """One attempt at the plan's writes; a retry runs it again from the start, which is safe (rule 1).

        The writes go to the store as one ``write_batch`` call in rule 5's order (new chunks, then older
        versions' leftovers, then deleted documents, then the registry): one transaction where the store has
        them (pgvector), the same sequence of confirmed writes on the Qdrant adapters."""
        model = self.embedder.name
        points = [p for u in plan.upserts for p in u.points(model)]
        leftovers = await self._docs_with_older_chunks(plan.upserts, {p.id for p in points})
        started = time.perf_counter()
        await self.store.write_batch(
            points=points,
            leftovers=[(u.op.key[0], u.op.key[1], u.op.version) for u in plan.upserts if u.op.key in leftovers],
            deletes=[op.key for op in plan.deletes],
            states=plan.doc_states(),
            upsert_batch_points=self.upsert_batch_points,
        )
        if points:
            m.UPSERT_SECONDS.observe(time.perf_counter() - started)

    async def _docs_with_older_chunks(self, upserts: list[PlannedUpsert], new_ids: set[str]) -> set[DocKey]:
        """The documents that will still have chunks of an older version once the new ones are written (rule 5):
        stored chunks below the new version that no new chunk overwrites (the same id). Read before the write, so
        that the whole batch can go to the store as one call.

        One read for the batch instead of a delete per document: a delete is a confirmed, flushed write, and
        most updates overwrite every old chunk id anyway. A truncated answer falls back to deleting for all.
        """
        if not upserts:
            return set()
        limit = 10_000
        flt = Filter(
            should=tuple(
                Filter(must=(Match(TENANT, u.op.key[0]), Match(DOC, u.op.key[1]), Range(VERSION, lt=u.op.version)))
                for u in upserts
            )
        )
        hits = await self.store.scroll(flt, limit=limit)
        if len(hits) >= limit:
            return {u.op.key for u in upserts}
        return {key for hit in hits if hit.id not in new_ids and (key := doc_key_of(hit.payload)) is not None}

    def _written(self, plan: BatchPlan, report: BatchReport) -> None:
        """Count what the confirmed writes made searchable (or ignored)."""
        points = sum(len(u.chunks) for u in plan.upserts)
        if plan.has_writes:
            self.unindexed_points += points
            self.last_write = time.monotonic()
        now = time.time()
        applied: list[Op] = [*(u.op for u in plan.upserts), *plan.deletes]
        for op in applied:
            if op.record.timestamp_ms:
                m.FRESHNESS_SECONDS.observe(max(0.0, now - op.record.timestamp_ms / 1000))
        m.EVENTS.labels(outcome="indexed").inc(len(plan.upserts))
        m.EVENTS.labels(outcome="deleted").inc(len(plan.deletes))
        m.EVENTS.labels(outcome="ignored_stale").inc(plan.ignored)
        m.CHUNKS_EMBEDDED.inc(plan.chunks_embedded)
        m.CHUNKS_REUSED.inc(plan.chunks_reused)
        report.indexed += len(plan.upserts)
        report.deleted += len(plan.deletes)
        report.ignored += plan.ignored
        report.chunks_embedded += plan.chunks_embedded
        report.chunks_reused += plan.chunks_reused

    # --- acknowledge: dead letters, once each, after the writes ------------------------------------------------

    async def _acknowledge(self, plan: BatchPlan, report: BatchReport) -> None:
        """Dead-letter each rejected record once, walking the batch in order for the breaker's count."""
        rejected = {r.position: r for r in plan.rejected}
        for position in range(plan.records):
            r = rejected.get(position)
            if r is None:
                self.consecutive_failures = 0  # a record that was applied (or ignored as stale)
                continue
            # a batch with something good in it is bad data, not a bad deploy: the breaker looks away from its
            # undecodable records; a model that cannot embed is a deploy's fault as often as a record's
            await self._dead_letter(r, report, check_breaker=not plan.decoded or r.why.stage is DeadLetterStage.EMBED)

    async def _dead_letter(self, rejected: RejectedRecord, report: BatchReport, *, check_breaker: bool) -> None:
        record, why = rejected.record, rejected.why
        limit = self.settings.ingest.breaker_consecutive_failures
        if check_breaker and limit and self.consecutive_failures >= limit:
            m.BREAKER_OPEN.set(1)
            raise BreakerOpenError(
                f"{self.consecutive_failures} records in a row failed (the last: {why.reason.value}: "
                f"{why.message}); consumption stopped instead of dead-lettering the whole topic. "
                "Fix the producer or the deploy, then restart the worker "
                "(or raise VECTORSTREAM_INGEST__BREAKER_CONSECUTIVE_FAILURES)."
            )
        await self._retrying(lambda: self.dead_letters.send(record, why), report)
        self.consecutive_failures += 1
        m.DEAD_LETTERS.labels(reason=why.reason.value).inc()
        m.EVENTS.labels(outcome="dead_lettered").inc()
        report.dead_lettered += 1
        report.reasons[why.reason.value] = report.reasons.get(why.reason.value, 0) + 1
        log.info(
            "dead-lettered %s[%d]@%d: %s (%s)",
            record.topic,
            record.partition,
            record.offset,
            why.reason.value,
            why.message,
        )

    # --- the one retry policy ------------------------------------------------------------------------------

    async def _retrying(self, op: Callable[[], Awaitable[T]], report: BatchReport) -> T:
        """Run ``op`` until it succeeds, retrying transient failures with capped exponential backoff (rule 3).

        Never nested: each step of a batch (a read of the plan, the plan's writes, one dead letter) is retried
        on its own, so a failure in one step never repeats a step that already succeeded.
        """
        cfg = self.settings.ingest
        delay = cfg.retry_initial_seconds
        try:
            while True:
                try:
                    return await op()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - policy: anything not known permanent is retried
                    if isinstance(exc, VectorstreamError) and not exc.retriable:
                        raise
                    if self.stopping:
                        raise ShutdownRequested(
                            "stopping while waiting for a dependency; the batch is given back uncommitted"
                        ) from exc
                    reason = exc.reason if isinstance(exc, VectorstreamError) else "unexpected"
                    m.RETRIES.labels(reason=reason).inc()
                    m.PAUSED.set(1)
                    self.paused = True
                    report.retries += 1
                    log.warning(
                        "ingest paused (%s: %s); retrying in %.1fs",
                        reason,
                        exc,
                        delay,
                        exc_info=not isinstance(exc, VectorstreamError),
                    )
                    await self._sleep(delay * (0.8 + 0.4 * random.random()))
                    if self.stopping:
                        raise ShutdownRequested(
                            "stopping while waiting for a dependency; the batch is given back uncommitted"
                        ) from exc
                    delay = min(delay * 2, cfg.retry_max_seconds)
        finally:
            m.PAUSED.set(0)
            self.paused = False


def _coordinates(record: Record) -> tuple[str, int, int]:
    return (record.topic, record.partition, record.offset)
