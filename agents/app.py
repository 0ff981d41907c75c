"""The faust app: one factory that applies the worker's Kafka settings. The agents live in their own
modules (``agents/ingest.py``, ``agents/query.py``) and are installed on the app the factory returns.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import faust

from pipeline.kafka import ssl_context
from pipeline.settings import KafkaSettings, Settings

log = logging.getLogger(__name__)


def broker_urls(settings: Settings) -> list[str]:
    return [f"kafka://{host.strip()}" for host in settings.kafka.bootstrap_servers.split(",") if host.strip()]


def broker_credentials(k: KafkaSettings) -> Any:
    """faust's form of the connection settings ``pipeline.kafka.client_options`` gives aiokafka clients: the
    same TLS context (``pipeline.kafka.ssl_context``) and SASL login; faust passes them to every consumer
    and producer it makes (``credentials_to_aiokafka_auth``). None means PLAINTEXT."""
    context = ssl_context(k)
    if k.security_protocol.startswith("SASL_"):
        assert k.sasl_password is not None  # KafkaSettings checks it
        return faust.SASLCredentials(
            username=k.sasl_username,
            password=k.sasl_password.get_secret_value(),
            mechanism=k.sasl_mechanism,
            ssl_context=context,  # SASL_SSL with it, SASL_PLAINTEXT without
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


#: app -> kafka.consumer_fetch_max_wait_ms, for the consumer faust makes for it (:func:`_tune_worker_consumer`)
_FETCH_MAX_WAIT_MS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _tune_worker_consumer() -> None:
    """Give faust's worker consumer ``kafka.consumer_fetch_max_wait_ms`` instead of the 1,500 ms faust fixes.

    aiokafka sends a broker one fetch at a time and leaves out partitions whose records the agent has not
    taken yet. Under load the queries topic often has such records when a fetch leaves, so that fetch asks for
    the idle documents topic only and the broker holds it the whole wait: the queries topic's next records then
    wait unseen behind it. Seen in the query benchmark: at 64 queries in flight the ``consume`` stage (request
    produced until the agent sees it) reached p99 2.4 s while the worker's own time stayed under 25 ms. faust
    has no setting for it, so its factory is wrapped (not replaced) and the value set on the consumer it makes,
    before the consumer starts its fetcher."""
    from faust.transport.drivers import aiokafka as driver

    thread_class = driver.AIOKafkaConsumerThread
    if getattr(thread_class._create_worker_consumer, "_vectorstream", False):  # noqa: SLF001
        return
    create = thread_class._create_worker_consumer  # noqa: SLF001

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        wait = _FETCH_MAX_WAIT_MS.get(self.app)
        if wait is not None:
            consumer._fetch_max_wait_ms = wait  # noqa: SLF001 - read by AIOKafkaConsumer.start()
        return consumer

    create_worker_consumer._vectorstream = True  # type: ignore[attr-defined]
    thread_class._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]  # noqa: SLF001


def make_app(settings: Settings) -> faust.App:
    k = settings.kafka
    credentials = broker_credentials(k)
    faust_dir = settings.data_dir / "faust"
    faust_dir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level itself
    _tune_worker_consumer()
    app = faust.App(
        k.group_id,
        # faust keeps per-app state in a folder; keep it under our data dir, not the working directory
        datadir=str(faust_dir / k.group_id),
        broker=broker_urls(settings),
        broker_credentials=credentials,
        autodiscover=False,
        web_enabled=False,
        store="memory://",
        topic_disable_leader=True,
        topic_allow_declare=False,  # topics are created (or checked) by the worker before faust starts
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication_factor,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=k.commit_interval_seconds,
        broker_session_timeout=k.session_timeout_seconds,
        broker_heartbeat_interval=k.heartbeat_interval_seconds,
        broker_commit_every=1000,
        producer_max_request_size=max(settings.ingest.max_message_bytes * 2, 4 * 1024 * 1024),
        consumer_max_fetch_size=max(settings.ingest.max_message_bytes * 2, 4 * 1024 * 1024),
        stream_buffer_maxsize=max(settings.ingest.max_batch_events * 4, 1024),
        producer_acks=-1,
        # replies go out as soon as they are ready: no batching delay on the request path (faust's default
        # is 0 too; it is set here so that a change of default cannot add latency to every reply)
        producer_linger=0.0,
        # faust's default (1,200 s) is also aiokafka's wait for a topic's metadata: a reply to a missing topic
        # could stall the producer for 20 minutes. A few seconds bound every produce and metadata wait.
        producer_request_timeout=k.producer_request_timeout_seconds,
    )
    _FETCH_MAX_WAIT_MS[app] = k.consumer_fetch_max_wait_ms
    return app
