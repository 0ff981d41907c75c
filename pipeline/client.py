"""The client side of vectorstream: publish document events (and tombstones), and ask questions over Kafka.

Every client here connects through ``pipeline.kafka`` (``producer`` / ``consumer``): pass bootstrap servers
for a plaintext cluster, or ``Settings().kafka`` (TLS, SASL) for any other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.decode import Record
from pipeline.kafka import KafkaTarget, consumer, create_topics, kafka_settings, producer, start_client
from schemas.events import DocumentDelete, DocumentUpsert, document_key
from schemas.queries import (
    CORRELATION_HEADER,
    ErrorCode,
    FusionMethod,
    QueryFailure,
    QueryRequest,
    QueryResult,
    SearchMode,
    query_reply_adapter,
    reply_topic_for,
)

#: how long the broker may hold a reply reader's fetch when there is nothing to read. It adds no latency: a
#: waiting fetch is answered as soon as a reply arrives (fetch.min.bytes 1). It sets how often an idle reader
#: asks: a reader per tenant at 20 ms each, as before, made a client listening on 50 tenants send 2,500 fetches
#: a second, which took half a core of the client and 40 % of one of the broker at one query in flight.
REPLY_FETCH_MAX_WAIT_MS = 500


class DocumentPublisher:
    """Publishes document events keyed ``tenant_id/doc_id``, so one document's events stay in order."""

    def __init__(
        self,
        bootstrap_servers: KafkaTarget,
        topic: str,
        *,
        max_request_size: int = 8 * 1024 * 1024,
        **producer_options: object,
    ) -> None:
        self.topic = topic
        self._target = bootstrap_servers
        self._producer = producer(
            bootstrap_servers,
            acks="all",
            linger_ms=5,
            max_request_size=max_request_size,
            **producer_options,
        )

    async def __aenter__(self) -> DocumentPublisher:
        await start_client(self._producer, self._target)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def publish(self, event: DocumentUpsert | DocumentDelete) -> None:
        await self.send(event)

    async def send(self, event: DocumentUpsert | DocumentDelete) -> asyncio.Future[Any]:
        """Queue ``event`` and return the future of its delivery (it resolves once the broker confirmed it)."""
        return await self._producer.send(self.topic, event.model_dump_json().encode(), key=event.key.encode())

    async def publish_many(self, events: Iterable[DocumentUpsert | DocumentDelete]) -> int:
        n = 0
        for event in events:
            await self.publish(event)
            n += 1
        await self._producer.flush()
        return n

    async def tombstone(self, tenant_id: str, doc_id: str) -> None:
        await self._producer.send(self.topic, None, key=document_key(tenant_id, doc_id).encode())

    async def send_raw(
        self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        """Publish bytes as they are (tests and tools that need to send bad input on purpose)."""
        await self._producer.send(self.topic, value, key=key, headers=headers)

    async def flush(self) -> None:
        await self._producer.flush()


# --- queries ------------------------------------------------------------------------------------------------


class QueryFailed(Exception):
    """The server answered a query with an error reply."""

    def __init__(self, reply: QueryFailure) -> None:
        super().__init__(f"{reply.error.code.value}: {reply.error.message}")
        self.reply = reply
        self.code: ErrorCode = reply.error.code
        self.retriable = reply.error.retriable


class QueryClient:
    """Publishes query requests and awaits their replies by correlation id, each with a timeout.

    Replies to tenant T's requests come on T's own reply topic, ``<replies_topic>.T``
    (:func:`schemas.queries.reply_topic_for`): the worker writes nowhere else, so a Kafka ACL per tenant keeps
    each tenant's hits to itself. The client reads the reply topic of each tenant it asks for from its end (no
    consumer group), so many clients of one tenant can share it; replies of other clients are ignored, and so
    is a second reply to the same request (a server crash between producing a reply and acking the request
    replays it). A reply topic that does not exist is created when ``create_reply_topics`` is set (the default;
    the client's Kafka principal then needs CREATE on it), else awaited: the worker never creates one.

    ``async with QueryClient(bootstrap, tenant="acme", token=t) as c: result = await c.ask("question")``
    """

    def __init__(
        self,
        bootstrap_servers: KafkaTarget,
        *,
        queries_topic: str = "vectorstream.queries",
        replies_topic: str = "vectorstream.replies",
        tenant: str | None = None,
        token: str | None = None,
        startup_timeout: float = 60.0,
        create_reply_topics: bool = True,
        reply_partitions: int = 1,
        **client_options: Any,
    ) -> None:
        self.queries_topic = queries_topic
        #: the prefix of the per-tenant reply topics (settings ``kafka.replies_topic``)
        self.replies_prefix = replies_topic
        self.tenant = tenant
        self.token = token
        self.startup_timeout = startup_timeout
        self.create_reply_topics = create_reply_topics
        self.reply_partitions = reply_partitions
        self._target = bootstrap_servers
        self._options = client_options
        self._producer = producer(bootstrap_servers, linger_ms=0, **client_options)
        self._waiting: dict[str, asyncio.Future[QueryResult | QueryFailure]] = {}
        #: reply topic -> its consumer and reading task
        self._readers: dict[str, tuple[AIOKafkaConsumer, asyncio.Task[None]]] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        #: replies read per request id of this client (a value above 1 is a duplicate reply)
        self.replies_seen: collections.Counter[str] = collections.Counter()

    @property
    def replies_topic(self) -> str:
        """The reply topic of the client's tenant."""
        if self.tenant is None:
            raise ValueError("this client has no tenant: its reply topic is per tenant")
        return reply_topic_for(self.replies_prefix, self.tenant)

    async def __aenter__(self) -> QueryClient:
        await start_client(self._producer, self._target)
        try:
            if self.tenant is not None:
                await self.listen(self.tenant)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        for reader, task in self._readers.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await reader.stop()
        self._readers.clear()
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()
        await self._producer.stop()

    async def listen(self, tenant: str) -> str:
        """Start reading ``tenant``'s reply topic (from its end), creating it if allowed; returns its name."""
        topic = reply_topic_for(self.replies_prefix, tenant)
        lock = self._opening.setdefault(topic, asyncio.Lock())
        async with lock:
            if topic in self._readers:
                return topic
            reader = consumer(
                self._target,  # bootstrap servers, TLS and SASL as configured
                group_id=None,
                enable_auto_commit=False,
                fetch_max_wait_ms=REPLY_FETCH_MAX_WAIT_MS,
                **self._options,
            )
            await start_client(reader, self._target)
            try:
                partitions = await self._reply_partitions(reader, topic)
                reader.assign(partitions)
                await reader.seek_to_end(*partitions)
                for tp in partitions:  # resolve the end offsets now, before any request is sent
                    await reader.position(tp)
            except BaseException:
                await reader.stop()
                raise
            task = asyncio.get_running_loop().create_task(self._read(reader), name=f"query-client-{topic}")
            self._readers[topic] = (reader, task)
        return topic

    async def _reply_partitions(self, consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
        deadline = time.monotonic() + self.startup_timeout
        created = False
        while True:
            parts: set[int] | None = None
            if topic in await consumer.topics():
                with contextlib.suppress(KafkaError):
                    parts = await self._producer.partitions_for(topic)
            elif self.create_reply_topics and not created:
                await create_topics(self._target, {topic: self.reply_partitions})
                created = True
                continue
            if parts:
                return [TopicPartition(topic, p) for p in sorted(parts)]
            if time.monotonic() > deadline:
                raise TimeoutError(f"reply topic {topic!r} does not exist (create it, or let the client create it)")
            await asyncio.sleep(0.5)

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    self._dispatch(record)

    def _dispatch(self, record: Any) -> None:
        headers = dict(record.headers or ())
        raw_id = headers.get(CORRELATION_HEADER) or record.key or b""
        request_id = raw_id.decode("utf-8", "replace")
        if request_id not in self.replies_seen and request_id not in self._waiting:
            return  # another client's reply
        self.replies_seen[request_id] += 1
        fut = self._waiting.pop(request_id, None)
        if fut is None or fut.done():
            return
        try:
            fut.set_result(query_reply_adapter.validate_json(record.value))
        except Exception as exc:  # noqa: BLE001 - an unreadable reply fails that request only
            fut.set_exception(exc)

    # --- the API ------------------------------------------------------------------------------------------

    def new_request(
        self,
        query: str,
        *,
        tenant: str | None = None,
        token: str | None = None,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
        hnsw_ef: int | None = None,
        exact: bool = False,
        mode: SearchMode | None = None,
        fusion: FusionMethod | None = None,
        with_text: bool = True,
        with_metadata: bool = True,
        timeout: float = 10.0,
        request_id: str | None = None,
    ) -> QueryRequest:
        """A request; ``mode`` dense / sparse / hybrid (None: the collection's default, hybrid where it has
        sparse vectors) and ``fusion`` rrf / dbsf for hybrid (None: rrf)."""
        search = {"hnsw_ef": hnsw_ef, "exact": exact} if (hnsw_ef is not None or exact) else None
        return QueryRequest.model_validate(
            {
                "request_id": request_id or uuid.uuid4().hex,
                "tenant_id": tenant or self.tenant,
                "token": token if token is not None else self.token,
                "query": query,
                "top_k": top_k,
                "filter": dict(filter) if filter is not None else None,
                "search": search,
                "mode": mode,
                "fusion": fusion,
                "with_text": with_text,
                "with_metadata": with_metadata,
                "reply_topic": reply_topic_for(self.replies_prefix, tenant or self.tenant or ""),
                "deadline_ms": int((time.time() + timeout) * 1000),
            }
        )

    async def request(
        self,
        req: QueryRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - how long to wait for the reply, not for one call
    ) -> QueryResult | QueryFailure:
        """Send ``req`` and return its reply (a result or an error reply); TimeoutError when none arrives
        in ``timeout`` seconds (default: until the request's deadline, plus a second for the reply's trip)."""
        if timeout is None:
            timeout = max(req.deadline_ms / 1000 - time.time(), 0) + 1.0
        value = req.model_dump_json(exclude_none=True).encode()
        return await self.send_raw(
            req.request_id.encode(), value, request_id=req.request_id, timeout=timeout, tenant=req.tenant_id
        )

    async def ask(
        self,
        query: str,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109 - it also sets the request's deadline
        **options: Any,
    ) -> QueryResult:
        """Ask a question; the result, or QueryFailed for an error reply, or TimeoutError."""
        reply = await self.request(self.new_request(query, timeout=timeout, **options))
        if isinstance(reply, QueryFailure):
            raise QueryFailed(reply)
        return reply

    async def send_raw(
        self,
        key: bytes | None,
        value: bytes | None,
        *,
        request_id: str,
        timeout: float = 10.0,  # noqa: ASYNC109 - how long to wait for the reply
        headers: list[tuple[str, bytes]] | None = None,
        tenant: str | None = None,
    ) -> QueryResult | QueryFailure:
        """Publish bytes as they are and await the reply correlated by ``request_id`` on the reply topic of
        ``tenant`` (default: the client's) (tests and tools)."""
        if tenant or self.tenant:
            await self.listen(tenant or self.tenant or "")
        fut = self.expect(request_id)
        try:
            await self._producer.send_and_wait(self.queries_topic, value, key=key, headers=headers)
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if self._waiting.get(request_id) is fut:
                del self._waiting[request_id]

    def expect(self, request_id: str) -> asyncio.Future[QueryResult | QueryFailure]:
        """A future for the reply to ``request_id`` (register before sending)."""
        fut = self._waiting.get(request_id)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._waiting[request_id] = fut
        return fut

    async def publish_only(self, key: bytes | None, value: bytes | None) -> None:
        """Publish a request without waiting for a reply (e.g. one that should get none)."""
        await self._producer.send_and_wait(self.queries_topic, value, key=key)


# --- reading a topic back (the consistency checker) ---------------------------------------------------------


async def read_records(
    bootstrap_servers: KafkaTarget,
    topic: str,
    *,
    timeout: float = 120.0,  # noqa: ASYNC109 - a deadline for reading the whole topic
    **client_options: Any,
) -> list[Record]:
    """Every record of ``topic`` from its beginning up to its end offsets at the time of the call.

    No consumer group: nothing is committed and no running worker is disturbed. The records come partition
    by partition, each partition in offset order (what :func:`pipeline.consistency.expected_state` needs).
    Raises LookupError when the topic does not exist and TimeoutError when reading takes over ``timeout``.
    """
    reader = consumer(
        bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        **client_options,
    )
    await start_client(reader, bootstrap_servers)
    try:
        async with asyncio.timeout(timeout):
            if topic not in await reader.topics():
                where = kafka_settings(bootstrap_servers).bootstrap_servers
                raise LookupError(f"topic {topic!r} does not exist on {where}")
            # without a group, a subscription is assigned every partition once the topic's metadata arrived
            # (partitions_for_topic would only know topics that were in the metadata when the consumer started)
            reader.subscribe([topic])
            while not (partitions := sorted(reader.assignment())):  # noqa: ASYNC110 - aiokafka has no event
                await asyncio.sleep(0.05)
            await reader.seek_to_beginning(*partitions)
            ends = await reader.end_offsets(partitions)
            by_partition: dict[int, list[Record]] = {tp.partition: [] for tp in partitions}
            pending = {tp for tp in partitions if await reader.position(tp) < ends[tp]}
            while pending:
                batch = await reader.getmany(*pending, timeout_ms=500)
                for tp, messages in batch.items():
                    for msg in messages:
                        if msg.offset < ends[tp]:
                            by_partition[tp.partition].append(
                                Record(
                                    topic=msg.topic,
                                    partition=msg.partition,
                                    offset=msg.offset,
                                    key=msg.key,
                                    value=msg.value,
                                    timestamp_ms=msg.timestamp,
                                    headers=tuple((k, bytes(v or b"")) for k, v in (msg.headers or ())),
                                )
                            )
                pending = {tp for tp in pending if await reader.position(tp) < ends[tp]}
    finally:
        await reader.stop()
    return [record for p in sorted(by_partition) for record in by_partition[p]]
