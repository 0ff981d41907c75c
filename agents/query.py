"""The faust query agent: raw query requests in, one reply each out; a request is acked after its reply.

The agent loop only runs the checks (:meth:`QueryService.admit`, no I/O): an admitted request is searched and
answered in a task, and an error reply is produced in a task too (at most ``query.max_pending_replies`` of
them; beyond that they are counted and dropped). So no produce, however slow, holds up the next request.

Every produce is bounded (``query.reply_timeout_seconds``, and the producer's own request and metadata wait,
``kafka.producer_request_timeout_seconds``). Replies go only to topics in the cluster's topic list, which
:class:`FaustReplies` refreshes every ``query.reply_topics_refresh_seconds``: a produce to a topic that does
not exist would make a broker that auto-creates topics (Tansu always, Apache Kafka unless
``auto.create.topics.enable=false``) create it. A reply that is not delivered is counted and dropped, and its
request acked anyway: replaying it later could not help, since its deadline will have passed, and an unacked
request would hold back the commits of every request after it. A crash before a reply was confirmed does
replay the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import faust
from aiokafka.errors import KafkaError

from pipeline import metrics as m
from pipeline.errors import BrokerUnavailableError
from pipeline.query import Admitted, QueryService, Reply, UnknownReplyTopic

log = logging.getLogger(__name__)


class FaustReplies:
    """Produces replies with faust's producer and waits for the broker's acknowledgement.

    It produces only to topics it saw in the cluster's full topic list (a metadata request for all topics,
    which never creates one). A topic it does not know triggers a refresh of the list, at most once per
    ``min_refresh`` seconds, so a flood of requests naming missing topics costs one metadata request a second.
    """

    def __init__(self, app: faust.App, *, refresh_seconds: float = 5.0, min_refresh: float = 1.0) -> None:
        self.app = app
        self.refresh_seconds = refresh_seconds
        self.min_refresh = min_refresh
        self._topics: frozenset[str] = frozenset()
        self._listed_at = float("-inf")
        self._listing: asyncio.Task[None] | None = None

    async def _list_topics(self) -> None:
        try:
            # faust exposes no metadata API: ask its aiokafka producer's client (same connection and credentials)
            producer: Any = self.app.producer
            client = producer._ensure_producer().client  # noqa: SLF001
            cluster = await client.fetch_all_metadata()
        except (KafkaError, AttributeError, OSError) as exc:
            log.warning("listing the cluster's topics failed: %r", exc)
            return
        self._topics = frozenset(cluster.topics())

    async def known(self, topic: str) -> bool:
        """Whether ``topic`` is in the cluster's topic list (refreshed when stale or when ``topic`` is missing).

        A missing topic gets one listing that started after the request came: a client that has just created
        its reply topic (the worker may have listed the topics a moment before) is not refused for being quick.
        Listings stay at most one per ``min_refresh`` seconds; requests that wait for one share it."""
        for attempt in range(2):
            now = time.monotonic()
            age = now - self._listed_at
            if age >= self.refresh_seconds or (topic not in self._topics and age >= self.min_refresh):
                if self._listing is None or self._listing.done():
                    self._listed_at = now
                    self._listing = asyncio.get_running_loop().create_task(self._list_topics(), name="reply-topics")
            if topic in self._topics:
                return True  # a due refresh runs in the background
            if self._listing is not None and not self._listing.done():
                await asyncio.shield(self._listing)
                if topic in self._topics:
                    return True
            if attempt == 0:  # the last listing may predate the topic: one more, no sooner than min_refresh
                await asyncio.sleep(max(0.0, self._listed_at + self.min_refresh - time.monotonic()))
        return topic in self._topics

    async def send(self, reply: Reply) -> None:
        if not await self.known(reply.topic):
            raise UnknownReplyTopic(reply.topic)
        try:
            await self.app.producer.send_and_wait(reply.topic, reply.key, reply.value, None, None, reply.headers)
        except KafkaError as exc:
            raise BrokerUnavailableError(f"reply to {reply.topic!r} not confirmed by the broker: {exc!r}") from exc

    async def close(self) -> None:
        if self._listing is not None:
            self._listing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listing


def _observe_consume(event: Any) -> None:
    """The ``consume`` stage: from the record's timestamp (the client's clock when it produced it, or the
    broker's with LogAppendTime) to the agent seeing it; skipped when the record has none or clocks disagree."""
    stamp = getattr(getattr(event, "message", None), "timestamp", None)
    if isinstance(stamp, int | float) and stamp > 0:
        lag = time.time() - stamp
        if 0 <= lag < 3600:
            m.QUERY_STAGE_SECONDS.labels(stage="consume").observe(lag)


def install_query_agent(app: faust.App, service: QueryService, topic_name: str) -> Any:
    queries = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    async def query(stream: Any) -> None:
        # the stream does not ack by itself: each request is acked once its reply was confirmed or dropped (or
        # the request was dropped). faust commits an offset only when everything before it is acked.
        manual = stream.noack()
        running: set[asyncio.Task[None]] = set()

        def spawn(coro: Any) -> None:
            task = asyncio.get_running_loop().create_task(coro)
            running.add(task)
            task.add_done_callback(running.discard)

        async def serve(event: Any, job: Admitted) -> None:
            try:
                await service.run(job)
            except Exception:  # noqa: BLE001 - see the module docstring
                log.exception("query %s: reply not produced", job.request.request_id)
            await manual.ack(event)

        async def answer(event: Any, sending: asyncio.Task[bool]) -> None:
            with contextlib.suppress(Exception):
                await sending
            await manual.ack(event)

        try:
            async for event in manual.events():
                _observe_consume(event)
                outcome = service.admit(event.key, event.value)
                if isinstance(outcome, Admitted):
                    spawn(serve(event, outcome))
                    continue
                if isinstance(outcome, Reply):
                    sending = service.send_later(outcome)
                    if sending is not None:
                        spawn(answer(event, sending))
                        continue
                await manual.ack(event)
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    return app.agent(queries, name="vectorstream.query", concurrency=1)(query)
