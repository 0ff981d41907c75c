"""``vectorstream worker``: wires settings, model, store and the faust app together and runs them.

Start-up refuses to run when the collection was built by another model or with another vector size,
and creates the topics it needs (idempotently) before faust starts consuming.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline import __version__
from pipeline import metrics as m
from pipeline.errors import ConfigurationError
from pipeline.kafka import KafkaConnectError, check_connection, ensure_topics
from pipeline.settings import Settings
from pipeline.sparse import settings_record

if TYPE_CHECKING:
    from pipeline.store.base import VectorStore

log = logging.getLogger("vectorstream.worker")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("faust", "mode", "aiokafka", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def invalid_settings(exc: ValidationError) -> list[str]:
    """One line per refused setting, named as in the settings (``store.hnsw_m``) and as its variable."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
        variable = "VECTORSTREAM_" + "__".join(str(p).upper() for p in error["loc"] if not isinstance(p, int))
        where = f"{path} ({variable})" if path else "settings"
        lines.append(f"invalid setting {where}: {error['msg']}")
    return lines


def run_worker(
    settings: Settings | None = None, *, wrap_store: Callable[[VectorStore], VectorStore] | None = None
) -> int:
    """Run the agents of ``settings.roles`` until SIGTERM/SIGINT. Returns the process exit code.

    ``wrap_store`` decorates the opened adapter (the chaos tests inject faults that way)."""
    import faust

    from agents.app import make_app
    from agents.ingest import FaustDeadLetters, give_back_on_stop, install_ingest_agent
    from pipeline.embedding import Embedder
    from pipeline.health import start_health_server
    from pipeline.ingest import IngestService
    from pipeline.store import open_store

    if settings is None:
        try:
            settings = Settings()
        except ValidationError as exc:
            configure_logging("INFO")
            for line in invalid_settings(exc):
                log.error("refusing to start: %s", line)
            return 2
    configure_logging(settings.log_level)
    verifier = None
    if "query" in settings.role_set:
        from pipeline.auth import TokenVerifier

        try:  # before anything starts: a key configuration that must not serve stops the worker here
            verifier = TokenVerifier(settings.query)
        except ConfigurationError as exc:
            log.error("refusing to start: %s", exc)
            return 2
        log.info("query tokens accepted with %s", ", ".join(verifier.algorithms))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    # before the model loads: a wrong password, an untrusted CA or a plaintext client on a TLS listener is
    # one line naming the setting within seconds, not a bootstrap retry loop
    try:
        loop.run_until_complete(check_connection(settings.kafka))
    except ConfigurationError as exc:
        log.error("refusing to start: cannot connect to Kafka: %s", exc)
        return 2
    log.info(
        "Kafka reachable at %s (%s%s)",
        settings.kafka.bootstrap_servers,
        settings.kafka.security_protocol,
        f", SASL {settings.kafka.sasl_mechanism} as {settings.kafka.sasl_username}"
        if settings.kafka.security_protocol.startswith("SASL_")
        else "",
    )

    embedder = Embedder(settings)
    store = open_store(settings.store)
    if wrap_store is not None:
        store = wrap_store(store)
    try:
        sparse = settings_record(settings.sparse)
        info = loop.run_until_complete(store.open(model=embedder.name, dim=embedder.dim, sparse=sparse))
    except ConfigurationError as exc:
        log.error("refusing to start: %s", exc)
        return 2
    log.info(
        "store %s ready: collection %r, model %s, dim %d, %d chunks, %s",
        settings.store.backend,
        settings.store.collection,
        info.model,
        info.dim,
        info.chunk_count,
        "BM25 sparse vectors (hybrid search)" if store.sparse_record is not None else "dense vectors only",
    )
    try:
        loop.run_until_complete(ensure_topics(settings))
    except KafkaConnectError as exc:
        log.error("refusing to start: cannot connect to Kafka: %s", exc)
        with contextlib.suppress(Exception):
            loop.run_until_complete(store.close())
        embedder.close()
        return 2

    m.BUILD_INFO.info({"version": __version__, "model": embedder.name, "store": settings.store.backend})
    health = start_health_server(settings.metrics.host, settings.metrics.port) if settings.metrics.port else None

    app = make_app(settings)
    roles = settings.role_set
    log.info("roles: %s (consumer group %r)", ", ".join(sorted(roles)), settings.kafka.group_id)

    def halt(reason: str) -> None:
        if health is not None:
            health.not_ready_reason = reason

    on_stop: list[Callable[[], None]] = []
    if "ingest" in roles:
        service = IngestService(settings, store, embedder, FaustDeadLetters(app, settings.kafka.dead_letter_topic))
        install_ingest_agent(app, settings, service, on_halt=halt)
        on_stop.append(lambda: give_back_on_stop(app, service))
    if "query" in roles:
        # with both roles the query agent shares this process's store: Qdrant Edge is in-process
        from agents.query import FaustReplies, install_query_agent
        from pipeline.query import QueryService

        embedder.warm_query_lane()  # queries embed on a lane of their own, never behind an ingest batch
        assert verifier is not None  # built above for the query role
        replies = FaustReplies(app, refresh_seconds=settings.query.reply_topics_refresh_seconds)
        queries = QueryService(settings, store, embedder, replies, verifier=verifier)
        if verifier.uses_dev_secret:
            log.warning(
                "query.dev_mode: query tokens are checked with the DEVELOPMENT secret printed in the source, "
                "anyone can mint them; never run like this outside a laptop"
            )
        install_query_agent(app, queries, settings.kafka.queries_topic)
    if health is not None:
        health.ready = True

    class Worker(faust.Worker):
        def _schedule_shutdown(self, signal: Any) -> None:  # SIGTERM/SIGINT, before faust starts stopping
            for hook in on_stop:
                hook()
            super()._schedule_shutdown(signal)

    # Everything loaded so far (torch, transformers, the model, faust, about half a million tracked objects)
    # lives as long as the process. Left in the collector's oldest generation, every full collection walks
    # all of it: 0.2-0.5 s measured here, a stall of the event loop that one query in the queue pays for.
    # Frozen, a full collection walks only what was made after start-up.
    gc.collect()
    gc.freeze()
    worker = Worker(app, loop=loop, loglevel=settings.log_level, quiet=True, override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        # the loop is closed by now: close the store on a fresh one (Edge flushes and releases its folder)
        with contextlib.suppress(Exception):
            asyncio.run(store.close())
        embedder.close()
        if health is not None:
            health.shutdown()
    return 0
