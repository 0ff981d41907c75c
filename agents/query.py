"""The faust query agent: raw query requests in, one reply each out; a request is acked after its reply.

Checks run inline (a rejection is produced before the next request is read); admitted requests run as tasks.

A reply the broker refuses (e.g. a reply topic that does not exist) is logged and its request acked anyway:
replaying it later could not help, since its deadline will have passed, and an unacked request would hold
back the commits of every request after it. A crash before a reply was confirmed does replay the request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from aiokafka.errors import KafkaError

from pipeline.errors import BrokerUnavailableError
from pipeline.query import Admitted, QueryService, Reply

log = logging.getLogger(__name__)


class FaustReplies:
    """Produces replies with faust's producer and waits for the broker's acknowledgement."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    async def send(self, reply: Reply) -> None:
        try:
            await self.app.producer.send_and_wait(reply.topic, reply.key, reply.value, None, None, reply.headers)
        except KafkaError as exc:
            raise BrokerUnavailableError(f"reply to {reply.topic!r} not confirmed by the broker: {exc!r}") from exc


def install_query_agent(app: faust.App, service: QueryService, topic_name: str) -> Any:
    queries = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    async def query(stream: Any) -> None:
        # the stream does not ack by itself: each request is acked once its reply was confirmed (or it was
        # dropped for a passed deadline). faust commits an offset only when everything before it is acked.
        manual = stream.noack()
        running: set[asyncio.Task[None]] = set()

        async def serve(event: Any, job: Admitted) -> None:
            try:
                await service.run(job)
            except Exception:  # noqa: BLE001 - see the module docstring
                log.exception("query %s: reply not produced", job.request.request_id)
            await manual.ack(event)

        try:
            async for event in manual.events():
                outcome = service.admit(event.key, event.value)
                if isinstance(outcome, Admitted):
                    task = asyncio.get_running_loop().create_task(serve(event, outcome))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    continue
                if isinstance(outcome, Reply):
                    try:
                        await service.send(outcome)
                    except Exception:  # noqa: BLE001 - see the module docstring
                        log.exception("query %s: error reply not produced", outcome.request_id)
                await manual.ack(event)
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    return app.agent(queries, name="vectorstream.query", concurrency=1)(query)
