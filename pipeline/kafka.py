"""Kafka administration the worker and the test harness share: creating the project's topics, in one place.

Every Kafka client the product builds gets its connection settings from this module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

if TYPE_CHECKING:
    from pipeline.settings import Settings

#: the dead-letter topic holds whole rejected records, including oversize ones
DLQ_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


async def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    replication: int = 1,
    *,
    configs: Mapping[str, str] | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - a deadline for creation plus leader election
) -> None:
    """Create ``topics`` (name -> partitions) unless they exist, then wait until every partition has a leader.

    Idempotent: a topic that already exists is left as it is (its partition count is not checked).
    ``configs`` (e.g. ``{"cleanup.policy": "compact"}``) applies to every topic created by this call.
    """
    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(name, num_partitions=n, replication_factor=replication, topic_configs=dict(configs or {}))
                for name, n in topics.items()
            ],
            timeout_ms=int(timeout * 1000),
        )
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            if code == 0:
                continue
            error = for_code(code)
            if error is TopicAlreadyExistsError:
                continue
            message = entry[2] if len(entry) > 2 else ""
            raise error(f"creating topic {name!r} failed: {message or error.__name__}")
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(list(topics))
            pending = [
                t["topic"]
                for t in described
                if t["error_code"] != 0 or any(p["leader"] < 0 for p in t["partitions"]) or not t["partitions"]
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders after {timeout:.0f}s: {pending}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def ensure_topics(settings: Settings) -> None:
    """Create the documents, dead-letter, queries and replies topics of ``settings`` if they do not exist."""
    k = settings.kafka
    plain = {k.documents_topic: k.partitions, k.queries_topic: k.partitions, k.replies_topic: k.partitions}
    await create_topics(k.bootstrap_servers, plain, k.replication_factor)
    await create_topics(
        k.bootstrap_servers,
        {k.dead_letter_topic: k.partitions},
        k.replication_factor,
        configs={"max.message.bytes": str(DLQ_MAX_MESSAGE_BYTES)},
    )
