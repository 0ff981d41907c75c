"""The ingest agent: batches of raw records in, offsets acked only after the store (or the dead-letter topic)
confirmed them; its dead-letter producer, index timer and lag gauge. faust's ``take()`` acks in a ``finally``.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable
from typing import Any

import faust
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from pipeline import metrics as m
from pipeline.decode import Record, Rejected
from pipeline.errors import BreakerOpenError, BrokerUnavailableError, ShutdownRequested
from pipeline.ingest import IngestService
from pipeline.kafka import admin_client
from pipeline.settings import KafkaSettings, Settings
from schemas.dead_letter import DEAD_LETTER_HEADERS as H

log = logging.getLogger(__name__)

#: a dead letter that the dead-letter topic cannot hold whole keeps this many bytes of its value
TRUNCATED_VALUE_BYTES = 64 * 1024
#: how long one lag update may take before it is given up until the next tick
LAG_UPDATE_TIMEOUT_SECONDS = 4.0


def to_record(event: Any) -> Record:
    msg = event.message
    headers = msg.headers or ()
    if isinstance(headers, dict):
        headers = tuple(headers.items())
    ts = msg.timestamp
    return Record(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=event.key,
        value=event.value,
        timestamp_ms=int(ts * 1000) if ts else None,
        headers=tuple((str(k), bytes(v) if v is not None else b"") for k, v in headers),
    )


class FaustDeadLetters:
    """Produces dead letters with faust's producer and waits for the broker's acknowledgement."""

    def __init__(self, app: faust.App, topic: str) -> None:
        self.app = app
        self.topic = topic

    async def send(self, record: Record, rejected: Rejected) -> None:
        headers = [
            (H["source_topic"], record.topic.encode()),
            (H["source_partition"], str(record.partition).encode()),
            (H["source_offset"], str(record.offset).encode()),
            (H["stage"], rejected.stage.value.encode()),
            (H["reason"], rejected.reason.value.encode()),
            (H["error"], rejected.message.encode("utf-8", "replace")[:2000]),
        ]
        if record.timestamp_ms is not None:
            headers.append((H["source_timestamp_ms"], str(record.timestamp_ms).encode()))
        value = record.value
        try:
            try:
                await self.app.producer.send_and_wait(self.topic, record.key, value, None, None, headers)
            except MessageSizeTooLargeError:
                # keep the head of the value and its size rather than block the partition forever
                size = len(value or b"")
                headers.append(("vs-value-truncated-from-bytes", str(size).encode()))
                await self.app.producer.send_and_wait(
                    self.topic, record.key, (value or b"")[:TRUNCATED_VALUE_BYTES], None, None, headers
                )
        except KafkaError as exc:
            raise BrokerUnavailableError(f"dead letter not confirmed by the broker: {exc!r}") from exc


def install_ingest_agent(
    app: faust.App, settings: Settings, service: IngestService, on_halt: Callable[[str], None] | None = None
) -> Any:
    documents = app.topic(
        settings.kafka.documents_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    cfg = settings.ingest

    async def finish(task: asyncio.Future[Any], events: list[Any], stream: Any) -> None:
        """Wait for one batch's ``handle``; ack its events only after it returned (batches finish in order)."""
        try:
            report = await task
        except ShutdownRequested:
            # stopping while the batch waited for the store: nothing of it is acked, a restart replays it
            log.warning("stopping: %d records given back uncommitted", len(events))
            await asyncio.Event().wait()  # until faust cancels the agent
        except BreakerOpenError as exc:
            # stop consuming: nothing of this batch is acked, lag grows, /readyz and alerts say why
            log.critical("ingest breaker open: %s", exc)
            if on_halt is not None:
                on_halt(f"ingest breaker open: {exc}")
            # the halted batch is given back, not finished: a shutdown or a rebalance must not wait for it to
            # be acked (faust's stream_wait_empty would wait forever, so SIGTERM and rebalances would hang)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # faust warns that the setting was read before
                app.conf.stream_wait_empty = False
            await asyncio.Event().wait()  # until the worker is stopped
        for event in events:
            await stream.ack(event)
        log.debug("batch of %d: %s", len(events), report)

    async def ingest(stream: Any) -> None:
        # noack_take yields events and leaves acking to us: we ack only after handle() returned, i.e.
        # after the store confirmed every write or the dead-letter topic every rejection.
        # Up to ingest.batches_in_flight batches are handled at once: the next one is decoded, chunked and
        # queued for the model while this one embeds and writes (handle keeps writes and acks in batch order),
        # so the model does not sit idle during the writes, the registry reads and the chunking. A second task
        # finishes (acks) the batches in order as they complete, so a quiet topic still gets its last acks.
        slots = asyncio.Semaphore(cfg.batches_in_flight)
        queue: asyncio.Queue[tuple[asyncio.Future[Any], list[Any]]] = asyncio.Queue()
        consumer = asyncio.current_task()
        failure: list[BaseException] = []

        async def acker() -> None:
            try:
                while True:
                    task, taken = await queue.get()
                    try:
                        await finish(task, taken, stream)
                    finally:
                        slots.release()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                # a batch failed unexpectedly: crash the agent, uncommitted, as a sequential loop would
                failure.append(exc)
                if consumer is not None:
                    consumer.cancel()
                raise

        acking = asyncio.ensure_future(acker())
        current: asyncio.Future[Any] | None = None
        try:
            async for events in stream.noack_take(cfg.max_batch_events, within=cfg.max_batch_wait_seconds):
                await slots.acquire()
                records = [to_record(e) for e in events]
                current = asyncio.ensure_future(service.handle(records))
                queue.put_nowait((current, list(events)))
                current = None
        except asyncio.CancelledError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            acking.cancel()
            if current is not None:
                current.cancel()
            while not queue.empty():
                queue.get_nowait()[0].cancel()

    agent = app.agent(documents, name="vectorstream.ingest", concurrency=1)(ingest)

    @app.timer(interval=1.0)
    async def build_index() -> None:
        # always build the ANN index: Qdrant Edge indexes only when asked
        try:
            await service.maybe_build_index(
                idle_seconds=settings.store.index_idle_seconds, max_unindexed=settings.store.index_max_unindexed_points
            )
        except Exception:  # noqa: BLE001 - the next tick tries again; ingest is unaffected
            log.exception("building the HNSW index failed; will retry")

    lag = ConsumerLagGauge(app, settings.kafka.documents_topic, app.conf.id, settings.kafka)

    @app.timer(interval=5.0)
    async def report_lag() -> None:
        await lag.update()

    @app.on_before_shutdown.connect
    async def close_lag_gauge(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await lag.close()

    return agent


def give_back_on_stop(app: faust.App, service: IngestService) -> None:
    """Called on SIGTERM/SIGINT, before faust stops: a batch stuck in a retry loop is given back.

    faust waits on shutdown until every taken event is acked (stream_wait_empty); a batch waiting for an
    unavailable store never would be, so the worker would ignore SIGTERM until SIGKILL. A batch that is
    making progress is still finished and committed as usual.
    """
    service.stopping = True
    if service.paused:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # faust warns that the setting was read before
            app.conf.stream_wait_empty = False


class ConsumerLagGauge:
    """``vectorstream_consumer_lag_messages`` per assigned documents partition: the log-end offset minus the
    group's committed offset, i.e. what a restart would replay.

    Public API only: the committed offsets are the broker's (an admin client's OffsetFetch, as
    ``kafka-consumer-groups.sh`` reads them, so they are right after a restart or a rebalance), the log-end
    offsets come from faust's ``highwaters()`` (a fresh ListOffsets, so the lag keeps growing while consumption
    is paused), and a partition the group never committed counts from its log-start offset (``earliest()``
    reset). Partitions this worker no longer owns lose their label, or their last value would stay on the
    dashboard. A failed update keeps the last values and is retried on the next tick.
    """

    def __init__(self, app: faust.App, topic: str, group_id: str, kafka: KafkaSettings) -> None:
        self.app = app
        self.topic = topic
        self.group_id = group_id
        self.kafka = kafka
        self._admin: AIOKafkaAdminClient | None = None
        self._labelled: set[int] = set()
        self._failing = False

    async def update(self) -> None:
        consumer = self.app.consumer
        assigned = sorted((tp for tp in consumer.assignment() if tp.topic == self.topic), key=lambda tp: tp.partition)
        owned = {tp.partition for tp in assigned}
        for partition in self._labelled - owned:
            m.CONSUMER_LAG.remove(str(partition))
        self._labelled &= owned
        if not assigned:
            return
        try:
            async with asyncio.timeout(LAG_UPDATE_TIMEOUT_SECONDS):
                ends = await consumer.highwaters(*assigned)
                committed = await self._committed(assigned)
                never = [tp for tp in assigned if tp not in committed]
                starts = await consumer.earliest_offsets(*never) if never else {}
        except Exception as exc:  # noqa: BLE001 - a gauge never takes the worker down; the next tick retries
            log.log(logging.DEBUG if self._failing else logging.WARNING, "consumer lag not updated: %r", exc)
            self._failing = True
            await self._close_admin()  # a broken connection is rebuilt on the next tick
            return
        self._failing = False
        for tp in assigned:
            end = ends.get(tp)
            start = committed.get(tp, starts.get(tp))
            if end is None or start is None:
                continue
            m.CONSUMER_LAG.labels(partition=str(tp.partition)).set(max(0, end - start))
            self._labelled.add(tp.partition)

    async def _committed(self, partitions: list[Any]) -> dict[Any, int]:
        """The group's committed offset (the next offset to read) of each of ``partitions`` that has one."""
        if self._admin is None:
            admin = admin_client(  # TLS and SASL as configured, like every Kafka client of the worker
                self.kafka,
                client_id=f"{self.group_id}-lag",
                request_timeout_ms=int(LAG_UPDATE_TIMEOUT_SECONDS * 1000),
            )
            try:
                await admin.start()
            except BaseException:
                await admin.close()
                raise
            self._admin = admin
        offsets = await self._admin.list_consumer_group_offsets(
            self.group_id, partitions=[TopicPartition(tp.topic, tp.partition) for tp in partitions]
        )
        by_key = {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}
        found = {tp: by_key.get((tp.topic, tp.partition), -1) for tp in partitions}
        return {tp: offset for tp, offset in found.items() if offset >= 0}  # -1: never committed

    async def close(self) -> None:
        await self._close_admin()

    async def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await admin.close()
            except Exception as exc:  # noqa: BLE001 - closing a connection that is already gone
                log.debug("closing the lag admin client failed: %r", exc)
