"""Ingest: apply a batch of consumed document events to the vector store, exactly once in effect.

Delivery contract — at-least-once from Kafka, idempotent into Qdrant, so the visible result is
exactly-once. The agent that feeds :meth:`IngestService.handle` relies on these rules:

1. Point ids are deterministic: ``uuid5(tenant, document, chunk index)``. A replayed event overwrites
   the same points instead of adding new ones.
2. ``handle`` returns only when every record of the batch has been applied with the store's
   confirmation (``wait=True``) or produced to the dead-letter topic with the broker's confirmation.
   The caller acks (commits) the batch's offsets after ``handle`` returns, never before and never in a
   ``finally``: an exception or a cancellation leaves the whole batch uncommitted, to be replayed.
3. Transient failures (the store or the broker unreachable, timeouts, anything unexpected) are retried
   with capped exponential backoff while consumption waits (the ``vectorstream_ingest_paused`` gauge
   is 1). They never dead-letter good data and never let an offset be committed past it.
   Permanent failures of one record (undecodable, schema violation, oversize, empty text, a text the
   model cannot embed) dead-letter that record only; the rest of the batch is indexed.
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
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from pipeline import metrics as m
from pipeline.chunking import Chunk
from pipeline.decode import Decoded, Record, Rejected, Tombstone, decode_record
from pipeline.embedding import Embedder
from pipeline.errors import BreakerOpenError, ShutdownRequested, VectorstreamError
from pipeline.settings import Settings
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


@dataclass
class _Op:
    """The net effect of a batch on one document: write this upsert, or delete it at ``version``."""

    key: DocKey
    record: Record
    event: DocumentUpsert | DocumentDelete | Tombstone
    #: the version the registry records afterwards
    version: int
    is_delete: bool


def _key_of(event: DocumentUpsert | DocumentDelete | Tombstone) -> DocKey:
    return (event.tenant_id, event.doc_id)


def resolve(
    events: Sequence[tuple[Record, DocumentUpsert | DocumentDelete | Tombstone]],
    stored: Mapping[DocKey, DocState],
) -> list[_Op]:
    """Apply the version rules event by event, starting from the registry's state, and return the net
    change per document (``events`` in consumption order; one document's events are in offset order).

    - an upsert applies when its version is above the current one;
    - a delete applies when its version is above the current one, or equal to a live upsert's;
    - a tombstone deletes whatever is there and keeps the current version;
    - anything else is stale (a late older version, or a replay) and changes nothing.
    Documents whose state did not change get no op.
    """
    state: dict[DocKey, tuple[int | None, bool]] = {k: (s.version, s.deleted) for k, s in stored.items()}
    ops: dict[DocKey, _Op] = {}
    for record, event in events:
        key = _key_of(event)
        version, deleted = state.get(key, (None, False))
        if isinstance(event, Tombstone):
            if deleted:
                continue
            new = (version or 0, True)
        elif isinstance(event, DocumentDelete):
            if version is not None and (event.version < version or (event.version == version and deleted)):
                continue
            new = (event.version, True)
        else:
            if version is not None and event.version <= version:
                continue
            new = (event.version, False)
        state[key] = new
        ops[key] = _Op(key, record, event, new[0], new[1])
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


class IngestService:
    """Decodes, chunks, embeds and writes batches of document events; see the module docstring."""

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
        #: dead letters since the last record that was applied (the breaker's evidence)
        self.consecutive_failures = 0
        #: set when the process is asked to stop: a batch waiting in a retry loop is given back
        self.stopping = False
        #: true while a batch waits in a retry loop for a dependency
        self.paused = False

    # --- the entry point ---------------------------------------------------------------------------------

    async def handle(self, records: Sequence[Record]) -> BatchReport:
        """Apply or dead-letter every record; returns only when all are confirmed (see rule 2)."""
        self._in_flight += 1
        try:
            return await self._handle(records)
        finally:
            self._in_flight -= 1
            self._last_busy = time.monotonic()

    async def _handle(self, records: Sequence[Record]) -> BatchReport:
        report = BatchReport(records=len(records))
        m.BATCH_EVENTS.observe(len(records))
        cfg = self.settings.ingest
        good: list[tuple[Record, DocumentUpsert | DocumentDelete | Tombstone]] = []
        rejected: list[tuple[Record, Rejected]] = []
        for record in records:
            decoded: Decoded = decode_record(record, max_bytes=cfg.max_message_bytes, max_depth=cfg.max_json_depth)
            if isinstance(decoded, Rejected):
                rejected.append((record, decoded))
            else:
                good.append((record, decoded))
        for record, why in rejected:
            # a batch with something good in it is bad data, not a bad deploy: the breaker looks away
            await self._dead_letter(record, why, report, check_breaker=not good)
        if good:
            await self._retrying(lambda: self._apply(good, report), report)
        return report

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

    # --- retries ------------------------------------------------------------------------------------------

    async def _retrying(self, op: Callable[[], Awaitable[T]], report: BatchReport) -> T:
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

    async def _dead_letter(
        self, record: Record, rejected: Rejected, report: BatchReport, *, check_breaker: bool = True
    ) -> None:
        limit = self.settings.ingest.breaker_consecutive_failures
        if check_breaker and limit and self.consecutive_failures >= limit:
            m.BREAKER_OPEN.set(1)
            raise BreakerOpenError(
                f"{self.consecutive_failures} records in a row failed (the last: {rejected.reason.value}: "
                f"{rejected.message}); consumption stopped instead of dead-lettering the whole topic. "
                "Fix the producer or the deploy, then restart the worker "
                "(or raise VECTORSTREAM_INGEST__BREAKER_CONSECUTIVE_FAILURES)."
            )
        await self._retrying(lambda: self.dead_letters.send(record, rejected), report)
        self.consecutive_failures += 1
        m.DEAD_LETTERS.labels(reason=rejected.reason.value).inc()
        m.EVENTS.labels(outcome="dead_lettered").inc()
        report.dead_lettered += 1
        report.reasons[rejected.reason.value] = report.reasons.get(rejected.reason.value, 0) + 1
        log.info(
            "dead-lettered %s[%d]@%d: %s (%s)",
            record.topic,
            record.partition,
            record.offset,
            rejected.reason.value,
            rejected.message,
        )

    # --- applying a batch -----------------------------------------------------------------------------------

    async def _apply(
        self, events: Sequence[tuple[Record, DocumentUpsert | DocumentDelete | Tombstone]], report: BatchReport
    ) -> None:
        # a retry starts again from the same events: everything below is idempotent
        keys = list(dict.fromkeys(_key_of(ev) for _, ev in events))
        states = await self.store.get_doc_states(keys)
        ops = resolve(events, states)
        ignored = len(events) - len(ops)  # stale, replayed, or superseded within the batch
        upserts = [op for op in ops if not op.is_delete]
        deletes = [op for op in ops if op.is_delete]

        new_states: list[DocState] = []
        points: list[ChunkPoint] = []
        older: list[tuple[str, str, int]] = []
        embedded = reused = 0
        if upserts:
            upserts, points, embedded, reused, rejected = await self._plan_upserts(upserts, states)
            for op, why in rejected:
                await self._dead_letter(op.record, why, report)
            leftovers = await self._docs_with_older_chunks(upserts, {p.id for p in points})
            for op in upserts:
                ev = op.event
                assert isinstance(ev, DocumentUpsert)
                if op.key in leftovers:
                    older.append((ev.tenant_id, ev.doc_id, ev.version))
                hashes = tuple(c.content_hash for c in self._chunks[op.key])
                new_states.append(DocState(ev.tenant_id, ev.doc_id, ev.version, False, len(hashes), hashes))
        for op in deletes:
            tenant_id, doc_id = op.key
            new_states.append(DocState(tenant_id, doc_id, op.version, True, 0, ()))
        if new_states:
            # one call for the batch's writes (rule 5's order; one transaction where the store has them)
            started = time.perf_counter()
            await self.store.write_batch(
                points=points,
                leftovers=older,
                deletes=[op.key for op in deletes],
                states=new_states,
                upsert_batch_points=self.upsert_batch_points,
            )
            m.UPSERT_SECONDS.observe(time.perf_counter() - started)
            self.unindexed_points += len(points)
            self.last_write = time.monotonic()

        now = time.time()
        for op in [*upserts, *deletes]:
            if op.record.timestamp_ms:
                m.FRESHNESS_SECONDS.observe(max(0.0, now - op.record.timestamp_ms / 1000))
        m.EVENTS.labels(outcome="indexed").inc(len(upserts))
        m.EVENTS.labels(outcome="deleted").inc(len(deletes))
        m.EVENTS.labels(outcome="ignored_stale").inc(ignored)
        m.CHUNKS_EMBEDDED.inc(embedded)
        m.CHUNKS_REUSED.inc(reused)
        if upserts or deletes or ignored:
            self.consecutive_failures = 0
        report.indexed += len(upserts)
        report.deleted += len(deletes)
        report.ignored += ignored
        report.chunks_embedded += embedded
        report.chunks_reused += reused

    async def _plan_upserts(
        self, ops: list[_Op], states: dict[DocKey, DocState]
    ) -> tuple[list[_Op], list[ChunkPoint], int, int, list[tuple[_Op, Rejected]]]:
        """Chunk, reuse or embed the chunks of every op; returns the ops to write and their points."""
        self._chunks: dict[DocKey, list[Chunk]] = {}
        for op in ops:
            ev = op.event
            assert isinstance(ev, DocumentUpsert)
            self._chunks[op.key] = self.chunker.split(self.chunker.document_text(ev.title, ev.text))

        reusable = await self._reusable_vectors([op for op in ops if (s := states.get(op.key)) and not s.deleted])
        to_embed: list[tuple[DocKey, int]] = []
        vectors: dict[tuple[DocKey, int], np.ndarray] = {}
        for op in ops:
            for chunk in self._chunks[op.key]:
                vec = reusable.get((op.key, chunk.content_hash))
                if vec is not None:
                    vectors[(op.key, chunk.index)] = vec
                else:
                    to_embed.append((op.key, chunk.index))
        reused = len(vectors)

        rejected: list[tuple[_Op, Rejected]] = []
        if to_embed:
            computed, failed_keys = await self._embed(to_embed)
            vectors.update(computed)
            if failed_keys:
                kept = []
                for op in ops:
                    if op.key in failed_keys:
                        rejected.append(
                            (
                                op,
                                Rejected(DeadLetterReason.EMBEDDING_FAILED, DeadLetterStage.EMBED, failed_keys[op.key]),
                            )
                        )
                    else:
                        kept.append(op)
                ops = kept

        points: list[ChunkPoint] = []
        model = self.embedder.name
        for op in ops:
            ev = op.event
            assert isinstance(ev, DocumentUpsert)
            for chunk in self._chunks[op.key]:
                points.append(
                    ChunkPoint(
                        chunk_point_id(ev.tenant_id, ev.doc_id, chunk.index),
                        vectors[(op.key, chunk.index)].tolist(),
                        chunk_payload(ev, chunk, model),
                    )
                )
        return ops, points, len(vectors) - reused, reused, rejected

    async def _docs_with_older_chunks(self, ops: list[_Op], new_ids: set[str]) -> set[DocKey]:
        """The documents that will still have chunks of an older version once the new ones are written (rule 5):
        stored chunks below the new version that no new chunk overwrites (the same id).

        One read for the batch instead of a delete per document: a delete is a confirmed, flushed write, and
        most updates overwrite every old chunk id anyway. A truncated answer falls back to deleting for all.
        """
        if not ops:
            return set()
        limit = 10_000
        flt = Filter(
            should=tuple(
                Filter(must=(Match(TENANT, op.key[0]), Match(DOC, op.key[1]), Range(VERSION, lt=op.version)))
                for op in ops
            )
        )
        hits = await self.store.scroll(flt, limit=limit)
        if len(hits) >= limit:
            return {op.key for op in ops}
        return {(hit.payload.get(TENANT), hit.payload.get(DOC)) for hit in hits if hit.id not in new_ids}

    async def _reusable_vectors(self, ops: list[_Op]) -> dict[tuple[DocKey, str], np.ndarray]:
        """Stored vectors of the documents' current chunks, by content hash (rule 6)."""
        if not ops:
            return {}
        wanted = {op.key for op in ops}
        flt = Filter(should=tuple(Filter(must=(Match(TENANT, t), Match(DOC, d))) for t, d in wanted))
        stored = await self.store.scroll(flt, limit=100_000)
        by_id: dict[str, tuple[DocKey, str]] = {}
        for hit in stored:
            key = (hit.payload.get(TENANT), hit.payload.get(DOC))
            digest = hit.payload.get(CONTENT_HASH)
            if key in wanted and digest and hit.payload.get(MODEL) == self.embedder.name:
                by_id[hit.id] = (key, digest)
        new_hashes = {(op.key, c.content_hash) for op in ops for c in self._chunks[op.key]}
        by_id = {pid: kh for pid, kh in by_id.items() if kh in new_hashes}
        if not by_id:
            return {}
        found = await self.store.get_vectors(list(by_id))
        return {by_id[pid]: np.asarray(vec, dtype=np.float32) for pid, vec in found.items()}

    async def _embed(
        self, wanted: list[tuple[DocKey, int]]
    ) -> tuple[dict[tuple[DocKey, int], np.ndarray], dict[DocKey, str]]:
        """Embed the wanted chunks; a document whose text the model cannot embed is isolated, not retried."""
        texts = [self._chunks[k][i].text for k, i in wanted]
        lengths = [self._chunks[k][i].tokens for k, i in wanted]
        started = time.perf_counter()
        try:
            vecs = await self.embedder.encode(texts, lengths)
        except Exception:  # noqa: BLE001 - find the document(s) at fault, embed the rest
            log.exception("embedding a batch of %d chunks failed; isolating the documents at fault", len(texts))
            return await self._embed_isolating(wanted)
        m.EMBED_BATCH_SECONDS.observe(time.perf_counter() - started)
        m.EMBED_TOKENS.inc(sum(lengths))
        return {w: vecs[j] for j, w in enumerate(wanted)}, {}

    async def _embed_isolating(
        self, wanted: list[tuple[DocKey, int]]
    ) -> tuple[dict[tuple[DocKey, int], np.ndarray], dict[DocKey, str]]:
        by_doc: dict[DocKey, list[int]] = {}
        for k, i in wanted:
            by_doc.setdefault(k, []).append(i)
        out: dict[tuple[DocKey, int], np.ndarray] = {}
        failed: dict[DocKey, str] = {}
        for key, idxs in by_doc.items():
            try:
                vecs = await self.embedder.encode([self._chunks[key][i].text for i in idxs])
            except Exception as exc:  # noqa: BLE001
                failed[key] = f"the model could not embed this document: {type(exc).__name__}: {exc}"[:500]
                continue
            out.update({(key, i): vecs[j] for j, i in enumerate(idxs)})
        return out, failed
