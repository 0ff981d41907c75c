"""The query service: verify the caller's token, search the caller's readable chunks, and produce one reply.

Callers publish QueryRequests; each gets exactly one reply on its reply topic, except a request whose deadline
had already passed on arrival, which is counted (vectorstream_queries_expired_total) and dropped.

Serving one request, in order (the agent calls :meth:`QueryService.admit` inline, then :meth:`run` or
:meth:`send` in a task of their own: the agent loop never waits on a search or on the broker):

1. ``admit`` (synchronous, no I/O): decode; drop if the deadline passed; verify the token before anything
   else costs work (tenant, user and groups come from it only); the token's tenant must equal the request's;
   the reply topic must be the verified tenant's own, ``<kafka.replies_topic>.<tenant>``
   (:func:`schemas.queries.reply_topic_for`); check top_k, the caller's filter and hnsw_ef against their caps;
   then admission: when ``max_concurrency`` queries are running and ``max_queue`` are waiting, the request is
   answered ``overloaded`` at once. Any failure here is an error reply and no vector-store call. A request
   that fails before its token was verified is answered only on the reply topic of the tenant it names, and
   only when it named that very topic; otherwise it is dropped and counted.
2. ``run``: within the request's remaining deadline, wait for a slot, embed the text (at once when the model
   is idle, else in one batch with the other questions waiting; identical questions once; recent ones from a
   cache: :class:`MicroBatcher`), and search with ONE filter: tenant AND access rule AND the caller's filter
   (the store enforces it inside HNSW; nothing is filtered afterwards). When HNSW returns fewer than top_k
   hits, few chunks pass the filter and the graph among them may be disconnected, so the search is re-run
   exactly (cheap at that size): a small tenant or a narrow filter still finds every readable match.
   A deadline that passes meanwhile is answered ``deadline_exceeded``. The admission slot is released as soon
   as the search is done, before the reply is produced.
3. The reply is produced (keyed by the request id, header ``vs-correlation-id``) within
   ``query.reply_timeout_seconds``, and then the agent acks the request. A reply that cannot be delivered (its
   topic does not exist, the broker does not confirm it in time) is counted in
   ``vectorstream_query_replies_failed_total{reason}`` and dropped; the worker goes on. A crash before the
   reply was confirmed replays the request; the client ignores a second reply.

Each stage's time goes to ``vectorstream_query_stage_seconds{stage}``: decode, auth (``admit``), queue_wait
(admitted until its embedding starts: a slot, a busy model), embed, search, encode (the reply) and produce;
the agent adds consume (the record's timestamp until the agent saw it).

A fraction of live HNSW queries (``query.recall_sample_rate``) is re-run exactly in the background to keep
``vectorstream_recall_at_k`` current.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from pipeline import metrics as m
from pipeline.auth import AuthError, Principal, TokenVerifier
from pipeline.errors import ModeUnsupportedError, VectorstreamError
from pipeline.query_filter import FilterError, caller_filter, search_filter
from pipeline.settings import Settings
from pipeline.sparse import SparseEncoder
from pipeline.store.base import (
    CHUNK_INDEX,
    DOC,
    META_PREFIX,
    TEXT,
    TITLE,
    Filter,
    FusionMethod,
    Hit,
    HybridParams,
    SearchMode,
    VectorStore,
)
from schemas.queries import (
    CORRELATION_HEADER,
    ErrorCode,
    QueryFailure,
    QueryHit,
    QueryRequest,
    QueryResult,
    failure,
    reply_topic_for,
)

log = logging.getLogger(__name__)

#: a tenant id as the wire allows it (schemas.events.TenantId), to salvage one from a request that does not validate
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


# --- replies -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A reply record, ready to produce."""

    topic: str
    request_id: str
    body: QueryResult | QueryFailure
    #: monotonic arrival time of the request (for vectorstream_query_duration_seconds)
    arrived: float

    @property
    def key(self) -> bytes:
        return self.request_id.encode()

    @functools.cached_property
    def value(self) -> bytes:
        """The encoded reply (encoded once: the service times it as the ``encode`` stage)."""
        return self.body.model_dump_json(exclude_none=True).encode()

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return [(CORRELATION_HEADER, self.request_id.encode())]

    @property
    def ok(self) -> bool:
        return isinstance(self.body, QueryResult)


class UnknownReplyTopic(Exception):  # noqa: N818 - a reason, as the metric label says
    """The reply's topic is not in the cluster's topic list: producing to it could create it."""


class ReplySink(Protocol):
    async def send(self, reply: Reply) -> None:
        """Produce the reply and return once the broker confirmed it; UnknownReplyTopic when its topic is not
        known to exist (the sink never produces to such a topic)."""


#: why a reply was not delivered (the ``reason`` of vectorstream_query_replies_failed_total)
REPLY_FAILURES = ("no_reply_topic", "unknown_topic", "timeout", "broker_error", "backlog")


# --- batched, deduplicated, cached query embedding --------------------------------------------------------


class _Slot:
    """One distinct text waiting for (or being given) its vector; every caller asking for it shares it."""

    __slots__ = ("future", "started", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[np.ndarray] = loop.create_future()
        # an error nobody is left to see must not be logged as "never retrieved"
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        #: monotonic time its batch went to the model (None while it waits)
        self.started: float | None = None
        self.waiters = 0


#: how many more hits than asked a sparse or hybrid search fetches, so ties at the cut-off are ordered by id
_TIE_MARGIN = 10


class MicroBatcher:
    """Query texts into vectors: embedded at once when the model is idle, batched while it is busy.

    There is no collection window. A text that finds the model idle goes to it in the next loop turn (with
    whatever else arrived in the same turn); texts that arrive while a batch is being embedded wait for it and
    then go together, up to ``max_batch``: batches are sized by what is waiting, so they grow with load and
    add no delay without it. Identical texts of the same moment (waiting or being embedded) are embedded
    once and share the vector; the ``cache_size`` most recently used vectors are kept, keyed by model and
    text (0 disables the cache). A caller that gives up while its text waits leaves the batch; one that
    gives up while it is being embedded does not disturb the others sharing it.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], Awaitable[np.ndarray]],
        *,
        max_batch: int,
        cache_size: int = 0,
        model: str = "",
    ) -> None:
        self._encode = encode
        self._max = max_batch
        self._model = model
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[str, str], np.ndarray] = collections.OrderedDict()
        #: texts waiting for a batch, in arrival order
        self._waiting: dict[str, _Slot] = {}
        #: texts of the batch being embedded now
        self._running: dict[str, _Slot] = {}
        self._task: asyncio.Task[None] | None = None

    async def embed(self, text: str) -> np.ndarray:
        vector, _ = await self.embed_timed(text)
        return vector

    async def embed_timed(self, text: str) -> tuple[np.ndarray, float]:
        """The unit vector of ``text``, and the monotonic time its embedding started (the moment it left the
        queue: for a cache hit or a text that joined one being embedded, the moment it asked)."""
        key = (self._model, text)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            m.QUERY_EMBED_CACHE.labels(result="hit").inc()
            return cached, time.monotonic()
        slot = self._running.get(text)
        if slot is not None:
            m.QUERY_EMBED_CACHE.labels(result="shared").inc()
            asked = time.monotonic()
            return await asyncio.shield(slot.future), asked
        slot = self._waiting.get(text)
        if slot is None:
            slot = self._waiting[text] = _Slot(asyncio.get_running_loop())
            m.QUERY_EMBED_CACHE.labels(result="miss").inc()
        else:
            m.QUERY_EMBED_CACHE.labels(result="shared").inc()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="query-embed")
        slot.waiters += 1
        try:
            vector = await asyncio.shield(slot.future)
        finally:
            slot.waiters -= 1
        assert slot.started is not None
        return vector, slot.started

    async def _drain(self) -> None:
        """Embed what is waiting, batch after batch, until nothing is; then end (the next text starts anew)."""
        while self._waiting:
            batch: dict[str, _Slot] = {}
            for text in list(self._waiting):
                slot = self._waiting.pop(text)
                if slot.waiters > 0:  # skip texts whose callers all gave up
                    batch[text] = slot
                if len(batch) >= self._max:
                    break
            if not batch:
                continue
            started = time.monotonic()
            for slot in batch.values():
                slot.started = started
            self._running = batch
            m.QUERY_EMBED_BATCH.observe(len(batch))
            try:
                vectors = await self._encode(list(batch))
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for slot in batch.values():
                    if not slot.future.done():
                        slot.future.set_exception(exc)
                continue
            finally:
                self._running = {}
            for i, (text, slot) in enumerate(batch.items()):
                vector = vectors[i]
                vector.setflags(write=False)  # shared by every caller of the text, and by the cache
                self._remember(text, vector)
                if not slot.future.done():
                    slot.future.set_result(vector)

    def _remember(self, text: str, vector: np.ndarray) -> None:
        if self._cache_size <= 0:
            return
        self._cache[(self._model, text)] = vector
        self._cache.move_to_end((self._model, text))
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    @property
    def cached(self) -> int:
        """Vectors in the cache now."""
        return len(self._cache)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for slot in [*self._waiting.values(), *self._running.values()]:
            slot.future.cancel()
        self._waiting.clear()
        self._running = {}


# --- the service -------------------------------------------------------------------------------------------


class Embeds(Protocol):
    name: str

    async def encode_query(self, texts: Sequence[str]) -> np.ndarray:
        """Embed query texts; the Embedder keeps a lane for them apart from ingest's batches."""


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check and holds an admission slot until :meth:`QueryService.run` ends."""

    request: QueryRequest
    principal: Principal
    flt: Filter
    hnsw_ef: int
    arrived: float
    #: the verified tenant's reply topic (the request named it)
    topic: str
    #: monotonic time the checks ended (queue_wait starts here)
    admitted_at: float = 0.0
    #: the mode that serves it (the request's, or the collection's default) and a hybrid query's fusion
    mode: SearchMode = "dense"
    fusion: FusionMethod = "rrf"


class QueryService:
    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        embedder: Embeds,
        sink: ReplySink,
        *,
        verifier: TokenVerifier | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.cfg = settings.query
        self.store = store
        self.embedder = embedder
        self.sink = sink
        self.verifier = verifier or TokenVerifier(settings.query)
        self._clock = clock
        self._rng = rng
        self._slots = asyncio.Semaphore(self.cfg.max_concurrency)
        self._admitted = 0
        self._limit = self.cfg.max_concurrency + self.cfg.max_queue
        self._batcher = MicroBatcher(
            embedder.encode_query,
            max_batch=self.cfg.max_batch,
            cache_size=self.cfg.embed_cache_size,
            model=embedder.name,
        )
        self._recall: collections.deque[float] = collections.deque(maxlen=self.cfg.recall_window)
        self._sampling: asyncio.Task[None] | None = None
        self._pending_replies: set[asyncio.Task[bool]] = set()
        self._sparse: SparseEncoder | None = None

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet searched (running or waiting for a slot)."""
        return self._admitted

    def reply_topic(self, tenant: str) -> str:
        """The one topic replies to ``tenant``'s requests may go to."""
        return reply_topic_for(self.settings.kafka.replies_topic, tenant)

    # --- step 1: checks and admission (no I/O) ---------------------------------------------------------------

    def admit(self, key: bytes | None, value: bytes | None) -> Admitted | Reply | None:
        """An Admitted request to :meth:`run`, an error Reply to :meth:`send`, or None: dropped (the deadline
        passed, or a request that failed before its token was verified named no reply topic it may use)."""
        arrived = time.monotonic()
        salvaged = _salvage(key, value)
        request_id = salvaged.get("request_id", "")

        def unverified(code: ErrorCode, message: str, tenant: Any, topic: Any) -> Reply | None:
            # before a token is verified nothing is known: answer only on the topic of the tenant the request
            # names, and only if it named that very topic (the sink then checks that it exists)
            if isinstance(tenant, str) and _TENANT.fullmatch(tenant) and topic == self.reply_topic(tenant):
                return Reply(topic, request_id, failure(request_id, code, message), arrived)
            m.QUERY_REPLIES_FAILED.labels(reason="no_reply_topic").inc()
            return None

        if value is None or len(value) > self.cfg.max_request_bytes:
            size = "no value" if value is None else f"{len(value)} bytes, limit {self.cfg.max_request_bytes}"
            return unverified(
                ErrorCode.BAD_REQUEST,
                f"request is empty or too large ({size})",
                salvaged.get("tenant_id"),
                salvaged.get("reply_topic"),
            )
        try:
            req = QueryRequest.model_validate_json(value)
        except ValidationError as exc:
            _stage("decode", arrived)
            if self._expired(salvaged.get("deadline_ms")):
                m.QUERIES_EXPIRED.inc()
                return None
            top_k = [e for e in exc.errors() if e["loc"] == ("top_k",) and e["type"] == "less_than_equal"]
            if top_k:
                code, message = ErrorCode.TOP_K_TOO_LARGE, f"top_k is above the limit {self.cfg.max_top_k}"
            else:
                code, message = ErrorCode.BAD_REQUEST, f"not a valid query request: {_describe(exc)}"
            return unverified(code, message, salvaged.get("tenant_id"), salvaged.get("reply_topic"))
        request_id = req.request_id
        decoded = _stage("decode", arrived)
        if self._expired(req.deadline_ms):
            m.QUERIES_EXPIRED.inc()
            return None
        try:
            principal = self.verifier.verify(req.token)
        except AuthError as exc:
            _stage("auth", decoded)
            return unverified(exc.code, str(exc), req.tenant_id, req.reply_topic)
        # from here on the tenant is known: every reply goes to its own topic, whatever the request named
        topic = self.reply_topic(principal.tenant_id)

        def error(code: ErrorCode, message: str) -> Reply:
            _stage("auth", decoded)
            return Reply(topic, request_id, failure(request_id, code, message), arrived)

        if principal.tenant_id != req.tenant_id:
            return error(
                ErrorCode.TENANT_MISMATCH, f"the token is for another tenant than the request's {req.tenant_id!r}"
            )
        if req.reply_topic != topic:
            return error(
                ErrorCode.BAD_REQUEST,
                f"reply_topic {req.reply_topic!r} is not allowed: replies to tenant {principal.tenant_id!r} go to "
                f"{topic!r} only",
            )
        if req.top_k > self.cfg.max_top_k:
            return error(ErrorCode.TOP_K_TOO_LARGE, f"top_k {req.top_k} is above the limit {self.cfg.max_top_k}")
        try:
            flt = search_filter(principal, caller_filter(req.filter))
        except FilterError as exc:
            return error(ErrorCode.FORBIDDEN_FILTER_FIELD if exc.forbidden else ErrorCode.BAD_REQUEST, str(exc))
        ef = (req.search.hnsw_ef if req.search else None) or self.settings.store.hnsw_ef
        if ef > self.cfg.max_hnsw_ef:
            return error(ErrorCode.BAD_REQUEST, f"hnsw_ef {ef} is above the limit {self.cfg.max_hnsw_ef}")
        # the collection decides what it can serve: hybrid by default where it has sparse vectors; a mode it
        # cannot serve is refused here, before any store call, and never answered in another mode
        has_terms = self.store.sparse_record is not None
        mode: SearchMode = req.mode or ("hybrid" if has_terms else "dense")
        if mode != "dense" and not has_terms:
            return error(
                ErrorCode.MODE_UNSUPPORTED,
                f"mode {mode!r} needs sparse vectors, and this store serves dense search only (a pgvector store, "
                f"or a collection made without sparse vectors or before them); ask for mode 'dense'",
            )
        if self._admitted >= self._limit:
            return error(
                ErrorCode.OVERLOADED,
                f"{self._admitted} queries are running or waiting (limit {self._limit}); retry later",
            )
        self._admitted += 1
        m.QUERY_IN_FLIGHT.inc()
        return Admitted(
            req,
            principal,
            flt,
            ef,
            arrived,
            topic,
            admitted_at=_stage("auth", decoded),
            mode=mode,
            fusion=req.fusion or "rrf",
        )

    def _expired(self, deadline_ms: Any) -> bool:
        return (
            isinstance(deadline_ms, int) and not isinstance(deadline_ms, bool) and deadline_ms <= self._clock() * 1000
        )

    # --- step 2: search --------------------------------------------------------------------------------------

    async def run(self, job: Admitted) -> Reply:
        """Serve an admitted request within its deadline, release its admission slot, then send its reply."""
        req = job.request
        hits: list[Hit] = []
        vector: np.ndarray | None = None
        dense: np.ndarray | None = None
        try:
            remaining = req.deadline_ms / 1000 - self._clock()
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    async with self._slots:
                        if job.mode != "dense":
                            hits, dense = await self._search_terms(job)
                        else:
                            vector, started = await self._batcher.embed_timed(req.query)
                            self._queue_wait(job, started)
                            searching = _stage("embed", started)
                            exact = bool(req.search and req.search.exact)
                            values: list[float] = vector.tolist()  # the store port takes a plain sequence
                            hits = await self.store.search(
                                values, flt=job.flt, limit=req.top_k, hnsw_ef=job.hnsw_ef, exact=exact
                            )
                            if not exact and len(hits) < req.top_k:
                                # fewer hits than asked: few chunks pass the filter, and filtered HNSW can miss
                                # some of them (the graph among them is sparse); exact search over so few is cheap
                                hits = await self.store.search(values, flt=job.flt, limit=req.top_k, exact=True)
                            _stage("search", searching)
                encoding = time.monotonic()
                body: QueryResult | QueryFailure = QueryResult(
                    request_id=req.request_id,
                    hits=[_hit(h, text=req.with_text, metadata=req.with_metadata) for h in hits],
                    took_ms=_ms_since(job.arrived),
                    model=self.embedder.name,
                    mode=job.mode,
                    fusion=job.fusion if job.mode == "hybrid" else None,
                )
            except TimeoutError:
                body = failure(
                    req.request_id,
                    ErrorCode.DEADLINE_EXCEEDED,
                    "the deadline passed before the search finished",
                    _ms_since(job.arrived),
                )
            except ModeUnsupportedError as exc:
                body = failure(req.request_id, ErrorCode.MODE_UNSUPPORTED, str(exc), _ms_since(job.arrived))
            except VectorstreamError as exc:
                code = ErrorCode.UNAVAILABLE if exc.retriable else ErrorCode.INTERNAL
                log.warning("query %s failed: %s", req.request_id, exc)
                body = failure(req.request_id, code, f"search failed: {exc.reason}", _ms_since(job.arrived))
            except Exception:  # noqa: BLE001 - the caller still gets its one reply
                log.exception("query %s failed", req.request_id)
                body = failure(req.request_id, ErrorCode.INTERNAL, "internal error", _ms_since(job.arrived))
        finally:
            # the slot is free once the search is done: a slow or failing reply never holds one
            self._admitted -= 1
            m.QUERY_IN_FLIGHT.dec()
        reply = Reply(job.topic, req.request_id, body, job.arrived)
        if isinstance(body, QueryResult):
            reply.value  # noqa: B018 - encoded here, once, to time it apart from the produce
            _stage("encode", encoding)
        await self.send(reply)
        if reply.ok and not (req.search and req.search.exact):
            if vector is not None:
                self._maybe_sample_recall(vector, job, hits)
            elif dense is not None:  # hybrid: the sample runs the dense HNSW walk itself
                self._maybe_sample_recall(dense, job, None)
        return reply

    async def _search_terms(self, job: Admitted) -> tuple[list[Hit], np.ndarray | None]:
        """A sparse or hybrid search: ONE store call, whose filter (tenant AND access AND the caller's) every
        prefetch runs under, fused in the engine; the query's terms are tokenized as the collection's were.
        Returns the hits and a hybrid query's dense vector (for the recall sample)."""
        req = job.request
        record = self.store.sparse_record
        if record is None:  # admitted against a collection that has since been reopened without sparse vectors
            raise ModeUnsupportedError(f"mode {job.mode!r} needs sparse vectors, and this collection has none")
        if self._sparse is None or self._sparse.record() != record:
            self._sparse = SparseEncoder.from_record(record)
        vector: list[float] | None = None
        dense: np.ndarray | None = None
        if job.mode == "hybrid":
            embedded, started = await self._batcher.embed_timed(req.query)
            self._queue_wait(job, started)
            _stage("embed", started)
            dense = embedded
            vector = embedded.tolist()
        else:
            self._queue_wait(job, time.monotonic())
        searching = time.monotonic()
        terms = self._sparse.encode_query(req.query)
        cfg = self.settings.sparse
        hybrid = HybridParams(fusion=job.fusion, rrf_k=cfg.rrf_k, prefetch_limit=cfg.prefetch_limit)
        exact = bool(req.search and req.search.exact)

        async def search(exact: bool) -> list[Hit]:
            # a few more than asked, ordered by (score, id) and cut to top_k: fused (and BM25) scores tie often
            # (RRF gives two chunks at swapped ranks the same score) and the engine's order among ties is not
            # stable, so without this a replayed request could get another chunk at the cut-off. This orders the
            # engine's fused result; it filters and fuses nothing.
            found = await self.store.query(
                mode=job.mode,
                vector=vector,
                sparse=terms,
                flt=job.flt,
                limit=req.top_k + _TIE_MARGIN,
                hybrid=hybrid,
                hnsw_ef=job.hnsw_ef,
                exact=exact,
            )
            return sorted(found, key=lambda h: (-h.score, h.id))[: req.top_k]

        hits = await search(exact)
        if job.mode == "hybrid" and not exact and len(hits) < req.top_k:
            hits = await search(True)  # as for dense: a narrow filter can starve filtered HNSW (see run)
        _stage("search", searching)  # a sparse or hybrid query's tokenizing is part of its search
        return hits, dense

    @staticmethod
    def _queue_wait(job: Admitted, started: float) -> None:
        """Observe the queue_wait stage: from the end of the checks to the start of the embedding."""
        m.QUERY_STAGE_SECONDS.labels(stage="queue_wait").observe(max(0.0, started - (job.admitted_at or job.arrived)))

    async def send(self, reply: Reply) -> bool:
        """Produce a reply within ``query.reply_timeout_seconds`` and account for it. Never raises: a reply that
        is not delivered is counted by reason, logged and dropped. True when the broker confirmed it."""
        producing = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.reply_timeout_seconds):
                await self.sink.send(reply)
            _stage("produce", producing)
        except UnknownReplyTopic:
            # what an unauthenticated caller gets for naming a topic that does not exist: no log line per request
            reason = "unknown_topic"
            log.debug("query %s: reply topic %r does not exist, reply dropped", reply.request_id, reply.topic)
        except TimeoutError:
            reason = "timeout"
            log.warning(
                "query %s: reply to %r not confirmed within %.1f s, dropped",
                reply.request_id,
                reply.topic,
                self.cfg.reply_timeout_seconds,
            )
        except Exception as exc:  # noqa: BLE001 - a reply that cannot be delivered never stops serving
            reason = "broker_error"
            log.warning("query %s: reply to %r failed, dropped: %r", reply.request_id, reply.topic, exc)
        else:
            if isinstance(reply.body, QueryFailure):
                m.QUERY_ERRORS.labels(code=reply.body.error.code.value).inc()
            m.QUERY_SECONDS.labels(outcome="ok" if reply.ok else "error").observe(time.monotonic() - reply.arrived)
            return True
        m.QUERY_REPLIES_FAILED.labels(reason=reason).inc()
        return False

    def send_later(self, reply: Reply) -> asyncio.Task[bool] | None:
        """:meth:`send` in a task of its own, so the caller (the agent loop) does not wait on the broker; None
        when ``query.max_pending_replies`` replies are already waiting (this one is then counted and dropped)."""
        if len(self._pending_replies) >= self.cfg.max_pending_replies:
            m.QUERY_REPLIES_FAILED.labels(reason="backlog").inc()
            return None
        task = asyncio.get_running_loop().create_task(self.send(reply), name=f"query-reply-{reply.request_id}")
        self._pending_replies.add(task)
        task.add_done_callback(self._pending_replies.discard)
        return task

    @property
    def pending_replies(self) -> int:
        return len(self._pending_replies)

    async def handle(self, key: bytes | None, value: bytes | None) -> Reply | None:
        """admit + run or send: one request, start to finish (tests and tools; the agent splits the two)."""
        outcome = self.admit(key, value)
        if outcome is None:
            return None
        if isinstance(outcome, Reply):
            await self.send(outcome)
            return outcome
        return await self.run(outcome)

    # --- online recall ----------------------------------------------------------------------------------------

    def _maybe_sample_recall(self, vector: np.ndarray, job: Admitted, hits: list[Hit] | None) -> None:
        """Now and then (``query.recall_sample_rate``) compare a served HNSW search with the exact one. ``hits``
        are the dense search's hits; None for a hybrid query, whose sample runs the dense HNSW walk (its dense
        prefetch) itself, at the request's ef."""
        if self.cfg.recall_sample_rate <= 0 or self._rng() >= self.cfg.recall_sample_rate:
            return
        if self._sampling is not None and not self._sampling.done():
            return  # one exact re-run at a time: sampling must never compete with serving
        self._sampling = asyncio.get_running_loop().create_task(
            self._sample_recall(
                vector,
                job.flt,
                job.request.top_k,
                None if hits is None else {h.id for h in hits},
                hnsw_ef=job.hnsw_ef,
            ),
            name="query-recall-sample",
        )

    async def _sample_recall(
        self, vector: np.ndarray, flt: Filter, limit: int, found: set[str] | None, *, hnsw_ef: int | None = None
    ) -> None:
        try:
            if found is None:
                walked = await self.store.search(vector.tolist(), flt=flt, limit=limit, hnsw_ef=hnsw_ef)
                found = {h.id for h in walked}
            exact = await self.store.search(vector.tolist(), flt=flt, limit=limit, exact=True)
        except Exception:  # noqa: BLE001 - a missed sample is harmless
            log.debug("recall sample failed", exc_info=True)
            return
        if not exact:
            return
        self._recall.append(len(found & {h.id for h in exact}) / len(exact))
        m.RECALL_SAMPLES.inc()
        m.RECALL.set(sum(self._recall) / len(self._recall))

    async def close(self) -> None:
        await self._batcher.close()
        for task in list(self._pending_replies):
            task.cancel()
        await asyncio.gather(*self._pending_replies, return_exceptions=True)
        if self._sampling is not None:
            self._sampling.cancel()
            await asyncio.gather(self._sampling, return_exceptions=True)


def _hit(hit: Hit, *, text: bool, metadata: bool) -> QueryHit:
    p = hit.payload
    return QueryHit(
        doc_id=str(p.get(DOC, "")),
        chunk_index=int(p.get(CHUNK_INDEX, 0)),
        score=float(hit.score),
        title=str(p.get(TITLE) or ""),
        text=str(p.get(TEXT) or "") if text else None,
        metadata=dict(p.get(META_PREFIX) or {}) if metadata else None,
    )


def _stage(stage: str, since: float) -> float:
    """Observe ``stage`` as lasting from ``since`` (monotonic) to now; returns now."""
    now = time.monotonic()
    m.QUERY_STAGE_SECONDS.labels(stage=stage).observe(now - since)
    return now


def _ms_since(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 3)


def _salvage(key: bytes | None, value: bytes | None) -> dict[str, Any]:
    """request_id, reply_topic and deadline_ms from a request that may not validate, to answer it anyway."""
    out: dict[str, Any] = {}
    if key:
        try:
            out["request_id"] = key.decode()[:128]
        except UnicodeDecodeError:
            pass
    if value and len(value) <= 1024 * 1024:
        try:
            obj = json.loads(value)
        except (ValueError, RecursionError):
            return out
        if isinstance(obj, dict):
            rid, topic, deadline = obj.get("request_id"), obj.get("reply_topic"), obj.get("deadline_ms")
            tenant = obj.get("tenant_id")
            if isinstance(rid, str) and 0 < len(rid) <= 128:
                out["request_id"] = rid
            if isinstance(topic, str):
                out["reply_topic"] = topic
            if isinstance(tenant, str):
                out["tenant_id"] = tenant
            if isinstance(deadline, int) and not isinstance(deadline, bool):
                out["deadline_ms"] = deadline
    return out


def _describe(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(x) for x in e["loc"]) or "request"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)
