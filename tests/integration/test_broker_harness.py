"""The broker harness against real brokers: records, headers and tombstones round-trip, offsets commit.

Also what the rest of the suite relies on: Apache Kafka restarts keep data, and Tansu's known gaps hold.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, UnknownError

from pipeline.embedded_broker import Tansu, wait_ready
from pipeline.kafka import create_topics
from tests.support.apache_kafka import ApacheKafka

#: consumer settings that make group joins fast on both brokers (Tansu's first join waits half a session)
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}

# --- helpers -------------------------------------------------------------------------------------------


async def _produce(bootstrap: str, topic: str, records: list[tuple], **producer_config) -> None:
    """``records`` are (partition, key, value, headers); ``acks="all"``, sent and awaited in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **producer_config)
    await producer.start()
    try:
        for partition, key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, headers=headers, partition=partition)
    finally:
        await producer.stop()


async def _drain(consumer: AIOKafkaConsumer, count: int, seconds: float = 15.0) -> list:
    got: list = []
    deadline = time.monotonic() + seconds
    while len(got) < count and time.monotonic() < deadline:
        for batch in (await consumer.getmany(timeout_ms=200)).values():
            got.extend(batch)
    return got


async def _join(bootstrap: str, topic: str, group: str) -> tuple[AIOKafkaConsumer, float]:
    """A started group consumer with its partitions assigned, and the seconds the join took."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **FAST_GROUP,
    )
    t0 = time.monotonic()
    await consumer.start()
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)
        assert time.monotonic() - t0 < 30, "no partitions assigned after 30 s"
    return consumer, time.monotonic() - t0


async def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    return admin


# --- both brokers --------------------------------------------------------------------------------------


async def test_roundtrip_keys_headers_and_tombstone(broker: str, unique_name) -> None:
    topic = unique_name("topic")
    await create_topics(broker, {topic: 1})
    await create_topics(broker, {topic: 1})  # idempotent
    sent = [
        (0, b"doc-1", b'{"v": 1}', [("tenant", b"acme"), ("trace", b"t-1")]),
        (0, b"doc-2", b"", [("empty-header", b"")]),
        (0, b"doc-1", None, [("tenant", b"acme")]),  # a tombstone for doc-1, with a header
    ]
    await _produce(broker, topic, sent)

    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.seek_to_beginning()
        got = await _drain(consumer, len(sent))
    finally:
        await consumer.stop()

    assert [(m.offset, m.key, m.value, list(m.headers)) for m in got] == [
        (i, key, value, headers) for i, (_, key, value, headers) in enumerate(sent)
    ]


async def test_oversize_record_is_accepted_by_the_broker(broker: str, unique_name) -> None:
    """The app's limit is 1,000,000 bytes; the broker must take more, so the app can dead-letter it."""
    topic = unique_name("topic")
    await create_topics(broker, {topic: 1})
    big = b"x" * 1_500_000
    await _produce(broker, topic, [(0, b"big", big, [])], max_request_size=2_000_000)

    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.seek_to_beginning()
        got = await _drain(consumer, 1)
    finally:
        await consumer.stop()
    assert [(m.key, len(m.value)) for m in got] == [(b"big", len(big))]


async def test_group_commit_and_committed_offsets_read_back(broker: str, broker_name: str, unique_name) -> None:
    topic, group = unique_name("topic"), unique_name("group")
    await create_topics(broker, {topic: 2})
    await _produce(broker, topic, [(i % 2, f"k{i}".encode(), b"v", []) for i in range(5)])

    consumer, join_seconds = await _join(broker, topic, group)
    try:
        got = await _drain(consumer, 5)
        assert len(got) == 5
        await consumer.commit()
        committed = {tp: await consumer.committed(tp) for tp in consumer.assignment()}
    finally:
        await consumer.stop()
    expected = {TopicPartition(topic, 0): 3, TopicPartition(topic, 1): 2}
    assert committed == expected
    # Tansu's first join waits half the session timeout (1 s here); Apache Kafka joins at once
    assert join_seconds < (5.0 if broker_name == "tansu" else 3.0)

    admin = await _admin(broker)
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=list(expected))
        groups = {name for name, _ in await admin.list_consumer_groups()}
    finally:
        await admin.close()
    assert {tp: meta.offset for tp, meta in offsets.items()} == expected
    assert group in groups


async def test_group_offsets_for_all_partitions(
    broker: str, broker_name: str, unique_name, request: pytest.FixtureRequest
) -> None:
    """``list_consumer_group_offsets`` without ``partitions``: fine on Apache Kafka, broken on Tansu."""
    if broker_name == "tansu":
        request.applymarker(
            pytest.mark.xfail(
                raises=KafkaConnectionError,
                strict=True,
                reason="Tansu answers OffsetFetch with null topics with a truncated response",
            )
        )
    topic, group = unique_name("topic"), unique_name("group")
    await create_topics(broker, {topic: 1})
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])  # manual assignment: commits without a group join
        await consumer.commit({TopicPartition(topic, 0): 7})
    finally:
        await consumer.stop()

    admin = await _admin(broker)
    try:
        offsets = await asyncio.wait_for(admin.list_consumer_group_offsets(group), 15)
    finally:
        await admin.close()
    assert {tp: meta.offset for tp, meta in offsets.items()} == {TopicPartition(topic, 0): 7}


async def test_idempotent_producer(broker: str, broker_name: str, unique_name, request) -> None:
    if broker_name == "tansu":
        request.applymarker(
            pytest.mark.xfail(raises=UnknownError, strict=True, reason="Tansu: InitProducerId -> UnknownError")
        )
    topic = unique_name("topic")
    await create_topics(broker, {topic: 1})
    producer = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=True)
    try:
        await asyncio.wait_for(producer.start(), 15)
        metadata = await producer.send_and_wait(topic, b"once", partition=0)
    finally:
        await producer.stop()
    assert metadata.offset == 0


async def test_wait_ready_times_out_on_a_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once the socket is closed, so nothing listens there
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await wait_ready(f"127.0.0.1:{port}", timeout=0.5)
    assert time.monotonic() - started < 3


async def test_context_manager_starts_and_cleans_up() -> None:
    async with Tansu(quiet=True) as tansu:
        await wait_ready(tansu.bootstrap_servers, timeout=5)
        assert tansu.running and tansu.log_path.is_file()
        data_dir = tansu.data_dir
    assert not tansu.running
    assert not data_dir.exists()


# --- Apache Kafka only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
async def test_restart_keeps_topics_records_and_committed_offsets(
    apache_kafka: ApacheKafka, unique_name, hard: bool
) -> None:
    bootstrap = apache_kafka.bootstrap_servers
    topic, group = unique_name("topic"), unique_name("group")
    await create_topics(bootstrap, {topic: 2})
    await _produce(bootstrap, topic, [(i % 2, f"k{i}".encode(), f"v{i}".encode(), []) for i in range(6)])
    consumer, _ = await _join(bootstrap, topic, group)
    try:
        assert len(await _drain(consumer, 6)) == 6
        # commit less than was read, so resuming at the committed offset is observable
        await consumer.commit({TopicPartition(topic, 0): 1, TopicPartition(topic, 1): 2})
    finally:
        await consumer.stop()

    pid = apache_kafka.pid
    await apache_kafka.arestart(hard=hard)
    assert apache_kafka.pid != pid
    assert apache_kafka.bootstrap_servers == bootstrap

    admin = await _admin(bootstrap)
    try:
        assert topic in await admin.list_topics()
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    assert {tp: m.offset for tp, m in offsets.items()} == {
        TopicPartition(topic, 0): 1,
        TopicPartition(topic, 1): 2,
    }

    consumer, _ = await _join(bootstrap, topic, group)
    try:
        rest = await _drain(consumer, 3)  # 3 records per partition, 1 + 2 committed
    finally:
        await consumer.stop()
    assert sorted((m.partition, m.offset, m.value) for m in rest) == [
        (0, 1, b"v2"),
        (0, 2, b"v4"),
        (1, 2, b"v5"),
    ]
