"""The query service: verify the caller's token, search the caller's readable chunks, and produce one reply.

Callers publish QueryRequests; each gets exactly one reply on its reply topic, except a request whose deadline
had already passed on arrival, which is counted (vectorstream_queries_expired_total) and dropped.

Serving one request, in order (the agent calls :meth:`QueryService.admit` inline, then :meth:`run` in a task):

1. ``admit`` (synchronous, no I/O): decode; drop if the deadline passed; check the reply topic; verify the
   token (tenant, user and groups come from it only); the token's tenant must equal the request's; check
   top_k, the caller's filter and hnsw_ef against their caps; then admission: when ``max_concurrency``
   queries are running and ``max_queue`` are waiting, the request is answered ``overloaded`` at once.
   Any failure here is an error reply and no vector-store call.
2. ``run``: within the request's remaining deadline, wait for a slot, embed the text in a micro-batch with the
   other queries of the moment, and search with ONE filter: tenant AND access rule AND the caller's filter
   (the store enforces it inside HNSW; nothing is filtered afterwards). When HNSW returns fewer than top_k
   hits, few chunks pass the filter and the graph among them may be disconnected, so the search is re-run
   exactly (cheap at that size): a small tenant or a narrow filter still finds every readable match.
   A deadline that passes meanwhile is answered ``deadline_exceeded``.
3. The reply is produced (keyed by the request id, header ``vs-correlation-id``) and only then does the
   agent ack the request. A crash before that replays the request; the client ignores a second reply.

A fraction of live HNSW queries (``query.recall_sample_rate``) is re-run exactly in the background to keep
``vectorstream_recall_at_k`` current.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from pipeline import metrics as m
from pipeline.auth import AuthError, Principal, TokenVerifier
from pipeline.errors import VectorstreamError
from pipeline.query_filter import FilterError, caller_filter, search_filter
from pipeline.settings import Settings
from pipeline.store.base import CHUNK_INDEX, DOC, META_PREFIX, TEXT, TITLE, Filter, Hit, VectorStore
from schemas.queries import (
    CORRELATION_HEADER,
    ErrorCode,
    QueryFailure,
    QueryHit,
    QueryRequest,
    QueryResult,
    failure,
)

log = logging.getLogger(__name__)


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

    @property
    def value(self) -> bytes:
        return self.body.model_dump_json(exclude_none=True).encode()

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return [(CORRELATION_HEADER, self.request_id.encode())]

    @property
    def ok(self) -> bool:
        return isinstance(self.body, QueryResult)


class ReplySink(Protocol):
    async def send(self, reply: Reply) -> None:
        """Produce the reply and return once the broker confirmed it."""


# --- micro-batched embedding -------------------------------------------------------------------------------


class MicroBatcher:
    """Collects query texts for up to ``window`` seconds (or ``max_batch`` texts), then embeds them in one call.

    While one batch is being embedded the next one fills up, so under load batches grow by themselves.
    """

    def __init__(self, encode: Callable[[list[str]], Awaitable[np.ndarray]], *, window: float, max_batch: int):
        self._encode = encode
        self._window = window
        self._max = max_batch
        self._pending: collections.deque[tuple[str, asyncio.Future[np.ndarray]]] = collections.deque()
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def embed(self, text: str) -> np.ndarray:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="query-embed-batcher")
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((text, fut))
        self._arrived.set()
        if len(self._pending) >= self._max:
            self._full.set()
        return await fut

    async def _loop(self) -> None:
        while True:
            await self._arrived.wait()
            if self._window > 0 and len(self._pending) < self._max:
                try:
                    async with asyncio.timeout(self._window):
                        await self._full.wait()
                except TimeoutError:
                    pass
            batch = [self._pending.popleft() for _ in range(min(self._max, len(self._pending)))]
            if not self._pending:
                self._arrived.clear()
            if len(self._pending) < self._max:
                self._full.clear()
            live = [(text, fut) for text, fut in batch if not fut.done()]  # skip callers that gave up
            if not live:
                continue
            m.QUERY_EMBED_BATCH.observe(len(live))
            try:
                vectors = await self._encode([text for text, _ in live])
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for i, (_, fut) in enumerate(live):
                if not fut.done():
                    fut.set_result(vectors[i])

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while self._pending:
            _, fut = self._pending.popleft()
            fut.cancel()


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
            embedder.encode_query, window=self.cfg.batch_window_ms / 1000, max_batch=self.cfg.max_batch
        )
        self._recall: collections.deque[float] = collections.deque(maxlen=self.cfg.recall_window)
        self._sampling: asyncio.Task[None] | None = None

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet replied to (running or waiting for a slot)."""
        return self._admitted

    # --- step 1: checks and admission (no I/O) ---------------------------------------------------------------

    def admit(self, key: bytes | None, value: bytes | None) -> Admitted | Reply | None:
        """An Admitted request to :meth:`run`, an error Reply to :meth:`send`, or None (deadline passed: drop)."""
        arrived = time.monotonic()
        default_topic = self.settings.kafka.replies_topic
        salvaged = _salvage(key, value)
        request_id = salvaged.get("request_id", "")

        def error(code: ErrorCode, message: str, topic: str = default_topic) -> Reply:
            return Reply(topic, request_id, failure(request_id, code, message), arrived)

        if value is None or len(value) > self.cfg.max_request_bytes:
            size = "no value" if value is None else f"{len(value)} bytes, limit {self.cfg.max_request_bytes}"
            return error(
                ErrorCode.BAD_REQUEST,
                f"request is empty or too large ({size})",
                self._reply_topic(salvaged.get("reply_topic")) or default_topic,
            )
        try:
            req = QueryRequest.model_validate_json(value)
        except ValidationError as exc:
            if self._expired(salvaged.get("deadline_ms")):
                m.QUERIES_EXPIRED.inc()
                return None
            topic = self._reply_topic(salvaged.get("reply_topic")) or default_topic
            top_k = [e for e in exc.errors() if e["loc"] == ("top_k",) and e["type"] == "less_than_equal"]
            if top_k:
                return error(ErrorCode.TOP_K_TOO_LARGE, f"top_k is above the limit {self.cfg.max_top_k}", topic)
            return error(ErrorCode.BAD_REQUEST, f"not a valid query request: {_describe(exc)}", topic)
        request_id = req.request_id
        if self._expired(req.deadline_ms):
            m.QUERIES_EXPIRED.inc()
            return None
        topic = self._reply_topic(req.reply_topic)
        if topic is None:
            allowed = self.settings.kafka.replies_topic
            return error(
                ErrorCode.BAD_REQUEST,
                f"reply_topic {req.reply_topic!r} is not allowed: use {allowed!r} or '{allowed}.<suffix>'",
            )
        try:
            principal = self.verifier.verify(req.token)
        except AuthError as exc:
            return error(exc.code, str(exc), topic)
        if principal.tenant_id != req.tenant_id:
            return error(
                ErrorCode.TENANT_MISMATCH,
                f"the token is for another tenant than the request's {req.tenant_id!r}",
                topic,
            )
        if req.top_k > self.cfg.max_top_k:
            return error(ErrorCode.TOP_K_TOO_LARGE, f"top_k {req.top_k} is above the limit {self.cfg.max_top_k}", topic)
        try:
            flt = search_filter(principal, caller_filter(req.filter))
        except FilterError as exc:
            code = ErrorCode.FORBIDDEN_FILTER_FIELD if exc.forbidden else ErrorCode.BAD_REQUEST
            return error(code, str(exc), topic)
        ef = (req.search.hnsw_ef if req.search else None) or self.settings.store.hnsw_ef
        if ef > self.cfg.max_hnsw_ef:
            return error(ErrorCode.BAD_REQUEST, f"hnsw_ef {ef} is above the limit {self.cfg.max_hnsw_ef}", topic)
        if self._admitted >= self._limit:
            return error(
                ErrorCode.OVERLOADED,
                f"{self._admitted} queries are running or waiting (limit {self._limit}); retry later",
                topic,
            )
        self._admitted += 1
        m.QUERY_IN_FLIGHT.inc()
        return Admitted(req, principal, flt, ef, arrived)

    def _expired(self, deadline_ms: Any) -> bool:
        return (
            isinstance(deadline_ms, int) and not isinstance(deadline_ms, bool) and deadline_ms <= self._clock() * 1000
        )

    def _reply_topic(self, topic: Any) -> str | None:
        """The topic to reply to, if the server may write there: its replies topic or ``<replies topic>.*``."""
        base = self.settings.kafka.replies_topic
        if isinstance(topic, str) and (topic == base or (topic.startswith(base + ".") and len(topic) <= 249)):
            return topic
        return None

    # --- step 2: search --------------------------------------------------------------------------------------

    async def run(self, job: Admitted) -> Reply:
        """Serve an admitted request within its deadline, send its reply, and release its admission slot."""
        req = job.request
        topic = req.reply_topic
        hits: list[Hit] = []
        vector: np.ndarray | None = None
        try:
            remaining = req.deadline_ms / 1000 - self._clock()
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    async with self._slots:
                        vector = await self._batcher.embed(req.query)
                        exact = bool(req.search and req.search.exact)
                        hits = await self.store.search(
                            vector, flt=job.flt, limit=req.top_k, hnsw_ef=job.hnsw_ef, exact=exact
                        )
                        if not exact and len(hits) < req.top_k:
                            # fewer hits than asked: few chunks pass the filter, and filtered HNSW can miss
                            # some of them (the graph among them is sparse); exact search over so few is cheap
                            hits = await self.store.search(vector, flt=job.flt, limit=req.top_k, exact=True)
                body: QueryResult | QueryFailure = QueryResult(
                    request_id=req.request_id,
                    hits=[_hit(h, text=req.with_text, metadata=req.with_metadata) for h in hits],
                    took_ms=_ms_since(job.arrived),
                    model=self.embedder.name,
                )
            except TimeoutError:
                body = failure(
                    req.request_id,
                    ErrorCode.DEADLINE_EXCEEDED,
                    "the deadline passed before the search finished",
                    _ms_since(job.arrived),
                )
            except VectorstreamError as exc:
                code = ErrorCode.UNAVAILABLE if exc.retriable else ErrorCode.INTERNAL
                log.warning("query %s failed: %s", req.request_id, exc)
                body = failure(req.request_id, code, f"search failed: {exc.reason}", _ms_since(job.arrived))
            except Exception:  # noqa: BLE001 - the caller still gets its one reply
                log.exception("query %s failed", req.request_id)
                body = failure(req.request_id, ErrorCode.INTERNAL, "internal error", _ms_since(job.arrived))
            reply = Reply(topic, req.request_id, body, job.arrived)
            await self.send(reply)
        finally:
            self._admitted -= 1
            m.QUERY_IN_FLIGHT.dec()
        if reply.ok and vector is not None and not (req.search and req.search.exact):
            self._maybe_sample_recall(vector, job, hits)
        return reply

    async def send(self, reply: Reply) -> None:
        """Produce a reply (confirmed by the broker) and account for it."""
        await self.sink.send(reply)
        if isinstance(reply.body, QueryFailure):
            m.QUERY_ERRORS.labels(code=reply.body.error.code.value).inc()
        m.QUERY_SECONDS.labels(outcome="ok" if reply.ok else "error").observe(time.monotonic() - reply.arrived)

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

    def _maybe_sample_recall(self, vector: np.ndarray, job: Admitted, hits: list[Hit]) -> None:
        if self.cfg.recall_sample_rate <= 0 or self._rng() >= self.cfg.recall_sample_rate:
            return
        if self._sampling is not None and not self._sampling.done():
            return  # one exact re-run at a time: sampling must never compete with serving
        self._sampling = asyncio.get_running_loop().create_task(
            self._sample_recall(vector, job.flt, job.request.top_k, {h.id for h in hits}), name="query-recall-sample"
        )

    async def _sample_recall(self, vector: np.ndarray, flt: Filter, limit: int, found: set[str]) -> None:
        try:
            exact = await self.store.search(vector, flt=flt, limit=limit, exact=True)
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
            if isinstance(rid, str) and 0 < len(rid) <= 128:
                out["request_id"] = rid
            if isinstance(topic, str):
                out["reply_topic"] = topic
            if isinstance(deadline, int) and not isinstance(deadline, bool):
                out["deadline_ms"] = deadline
    return out


def _describe(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(x) for x in e["loc"]) or "request"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)
