"""The producer side of vectorstream: publish document events (and tombstones) with the right key.

This and the broker harness are the only places in ``pipeline`` that talk to Kafka directly.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaProducer

from schemas.events import DocumentDelete, DocumentUpsert, document_key


class DocumentPublisher:
    """Publishes document events keyed ``tenant_id/doc_id``, so one document's events stay in order."""

    def __init__(self, bootstrap_servers: str, topic: str, *, max_request_size: int = 8 * 1024 * 1024,
                 **producer_options: object) -> None:
        self.topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5,
            max_request_size=max_request_size, **producer_options,
        )

    async def __aenter__(self) -> DocumentPublisher:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def publish(self, event: DocumentUpsert | DocumentDelete) -> None:
        await self._producer.send(self.topic, event.model_dump_json().encode(), key=event.key.encode())

    async def publish_many(self, events: Iterable[DocumentUpsert | DocumentDelete]) -> int:
        n = 0
        for event in events:
            await self.publish(event)
            n += 1
        await self._producer.flush()
        return n

    async def tombstone(self, tenant_id: str, doc_id: str) -> None:
        await self._producer.send(self.topic, None, key=document_key(tenant_id, doc_id).encode())

    async def send_raw(self, key: bytes | None, value: bytes | None,
                       headers: list[tuple[str, bytes]] | None = None) -> None:
        """Publish bytes as they are (tests and tools that need to send bad input on purpose)."""
        await self._producer.send(self.topic, value, key=key, headers=headers)

    async def flush(self) -> None:
        await self._producer.flush()
