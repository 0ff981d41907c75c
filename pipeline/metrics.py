"""Prometheus metrics of every vectorstream process (names follow Prometheus conventions).

Labels take bounded values only: outcomes, reasons, stages, partitions; never tenant or document ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, disable_created_metrics

# the *_created series double the scrape size and no dashboard uses them
disable_created_metrics()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)

EVENTS = Counter(
    "vectorstream_events_total",
    "Document events consumed, by outcome",
    ["outcome"],  # indexed | deleted | ignored_stale | dead_lettered
)
DEAD_LETTERS = Counter("vectorstream_dead_letters_total", "Records sent to the dead-letter topic", ["reason"])
CHUNKS_EMBEDDED = Counter("vectorstream_chunks_embedded_total", "Chunks embedded by the model")
CHUNKS_REUSED = Counter("vectorstream_chunks_reused_total", "Unchanged chunks whose stored vector was reused")
EMBED_BATCH_SECONDS = Histogram(
    "vectorstream_embedding_batch_duration_seconds", "Time to embed one ingest batch", buckets=_LATENCY_BUCKETS
)
EMBED_TOKENS = Counter("vectorstream_embedding_tokens_total", "Tokens embedded (rate() gives tokens per second)")
UPSERT_SECONDS = Histogram(
    "vectorstream_upsert_duration_seconds",
    "Time for the store to confirm one batch of writes",
    buckets=_LATENCY_BUCKETS,
)
FRESHNESS_SECONDS = Histogram(
    "vectorstream_freshness_seconds",
    "From an event's Kafka timestamp to the moment it is searchable",
    buckets=_FRESHNESS_BUCKETS,
)
RETRIES = Counter("vectorstream_ingest_retries_total", "Transient failures retried, by reason", ["reason"])
PAUSED = Gauge("vectorstream_ingest_paused", "1 while consumption is paused waiting for a dependency")
BREAKER_OPEN = Gauge(
    "vectorstream_ingest_breaker_open", "1 when consumption stopped because every recent record failed"
)
BATCH_EVENTS = Histogram(
    "vectorstream_ingest_batch_events", "Events per ingest batch", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500)
)
BUILD_INFO = Info("vectorstream_build", "Version, model and store backend of this process")

# --- consumption ----------------------------------------------------------------------------------------------
CONSUMER_LAG = Gauge(
    "vectorstream_consumer_lag_messages",
    "Messages behind the end of each assigned documents partition",
    ["partition"],
)
INDEX_BUILDS = Counter("vectorstream_index_builds_total", "HNSW index builds (optimize) run by the worker")
INDEX_BUILD_SECONDS = Histogram(
    "vectorstream_index_build_duration_seconds",
    "Time to build or extend the HNSW index",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
)

# --- queries ------------------------------------------------------------------------------------------------
QUERY_SECONDS = Histogram(
    "vectorstream_query_duration_seconds",
    "From a request's arrival to its reply being produced, by outcome",
    ["outcome"],  # ok | error
    buckets=_LATENCY_BUCKETS,
)
QUERY_ERRORS = Counter("vectorstream_query_errors_total", "Query error replies, by code", ["code"])
QUERY_REPLIES_FAILED = Counter(
    "vectorstream_query_replies_failed_total",
    "Query replies not delivered and dropped, by reason (no_reply_topic, unknown_topic, timeout, broker_error, "
    "backlog)",
    ["reason"],
)
QUERIES_EXPIRED = Counter("vectorstream_queries_expired_total", "Requests dropped because their deadline had passed")
QUERY_IN_FLIGHT = Gauge("vectorstream_queries_in_flight", "Queries being served right now")
QUERY_EMBED_BATCH = Histogram(
    "vectorstream_query_embedding_batch_size",
    "Query texts embedded together in one batch (sized by what waited while the model was busy)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
#: fine-grained where a query's stages live (0.1 ms to 50 ms), coarser above for the slow tail
_STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02,
    0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5,
)  # fmt: skip
#: the stages of one query, in order (the ``stage`` label of vectorstream_query_stage_seconds)
QUERY_STAGES = ("consume", "decode", "auth", "queue_wait", "embed", "search", "encode", "produce")
QUERY_STAGE_SECONDS = Histogram(
    "vectorstream_query_stage_seconds",
    "Time one query spent in each stage of the worker: consume (the record's timestamp to the agent), decode, "
    "auth, queue_wait (admitted to its embedding starting), embed, search, encode (the reply), produce",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
QUERY_EMBED_CACHE = Counter(
    "vectorstream_query_embedding_cache_total",
    "Query texts looked up in the vector cache, by result (hit, miss, shared: joined an identical text's embedding)",
    ["result"],
)
RECALL = Gauge("vectorstream_recall_at_k", "Online recall@k of HNSW against exact search (sampled queries)")
RECALL_SAMPLES = Counter("vectorstream_recall_samples_total", "Live queries re-run exactly to measure recall")


# --- every known label value exported from the start ----------------------------------------------------
def _export_known_label_values() -> None:
    """Create each bounded label value at zero, so that dashboards show 0 rather than "no data" and rate()
    sees the first increment (a series born at 1 has no earlier sample to rate against)."""
    from pipeline.errors import TransientError
    from schemas.dead_letter import DeadLetterReason
    from schemas.queries import ErrorCode

    for outcome in ("indexed", "deleted", "ignored_stale", "dead_lettered"):
        EVENTS.labels(outcome=outcome)
    for reason in DeadLetterReason:
        DEAD_LETTERS.labels(reason=reason.value)
    transient: list[type[TransientError]] = [TransientError, *TransientError.__subclasses__()]
    for retry_reason in sorted({cls.reason for cls in transient} | {"unexpected"}):
        RETRIES.labels(reason=retry_reason)
    for outcome in ("ok", "error"):
        QUERY_SECONDS.labels(outcome=outcome)
    for code in ErrorCode:
        QUERY_ERRORS.labels(code=code.value)
    for stage in QUERY_STAGES:
        QUERY_STAGE_SECONDS.labels(stage=stage)
    for result in ("hit", "miss", "shared"):
        QUERY_EMBED_CACHE.labels(result=result)
    for why in ("no_reply_topic", "unknown_topic", "timeout", "broker_error", "backlog"):
        QUERY_REPLIES_FAILED.labels(reason=why)


_export_known_label_values()
