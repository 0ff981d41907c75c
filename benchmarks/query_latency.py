"""Query request -> reply latency over Apache Kafka at 100,000 chunks across 50 tenants, filter on, and the
recall command's table (HNSW at several ef values against exact search) on the same data.

``python -m benchmarks.query_latency`` writes benchmarks/results/query_latency.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import tempfile
import time
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


def build_points(rows: list[tuple[str, str, int, str]], vectors: np.ndarray, model: str) -> tuple[list[Any], dict]:
    """CHUNKS points over TENANTS tenants: each tenant takes whole scifact documents in its own random order
    until it has CHUNKS/TENANTS chunks; each copied vector gets N(0, NOISE) noise per component, renormalized.
    Each document gets a random access list and metadata (year, lang)."""
    from pipeline.chunking import Chunk
    from pipeline.ingest import chunk_payload
    from pipeline.store.base import ChunkPoint, chunk_point_id
    from schemas.events import DocumentUpsert

    rng = random.Random(SEED)
    nrng = np.random.default_rng(SEED)
    by_doc: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_doc.setdefault(row[0], []).append(i)
    doc_ids = list(by_doc)
    per_tenant = CHUNKS // TENANTS
    points = []
    acl_stats = {"public_docs": 0, "private_docs": 0}
    for t in range(TENANTS):
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
                        chunk_point_id(tenant, doc_id, chunk_index), noisy[j], chunk_payload(event, chunk, model)
                    )
                )
            taken += len(idx)
    return points, acl_stats


def random_principal(rng: random.Random) -> tuple[str, str, list[str]]:
    return f"t{rng.randrange(TENANTS):02d}", rng.choice(USERS), rng.sample(GROUPS, rng.randint(0, 2))


CALLER_FILTER = {"must": [{"key": "year", "range": {"gte": 2010}}], "must_not": [{"key": "lang", "match": "fr"}]}


# --- phases -----------------------------------------------------------------------------------------------


async def load_store(settings: Any, points: list[Any], model: str, dim: int) -> dict[str, float]:
    from pipeline.store import open_store

    store = open_store(settings.store)
    await store.open(model=model, dim=dim)
    start = time.perf_counter()
    for i in range(0, len(points), 2000):
        await store.upsert_chunks(points[i : i + 2000])
    upsert_s = time.perf_counter() - start
    start = time.perf_counter()
    await store.build_index()
    index_s = time.perf_counter() - start
    count = await store.count()
    await store.close()
    return {"upsert_seconds": upsert_s, "index_seconds": index_s, "chunks": count}


async def recall_tables(settings: Any, embedder: Any, texts: list[str], n: int) -> dict[str, Any]:
    from pipeline.auth import Principal
    from pipeline.query_filter import caller_filter, search_filter
    from pipeline.recall import Case, format_table, measure
    from pipeline.store import open_store

    rng = random.Random(SEED + 1)
    picked = rng.sample(texts, n)
    vectors = await embedder.encode(picked)
    acl_cases, caller_cases = [], []
    for v in vectors:
        tenant, user, groups = random_principal(rng)
        acl_cases.append(Case(v, search_filter(Principal(tenant, user, tuple(groups)))))
        caller_cases.append(
            Case(v, search_filter(Principal(tenant, user, tuple(groups)), caller_filter(CALLER_FILTER)))
        )
    store = open_store(settings.store)
    await store.open(model=embedder.name, dim=embedder.dim)
    try:
        efs = (16, 32, 64, 128, 256, 512)
        acl_rows = await measure(store, acl_cases, k=10, efs=efs)
        caller_rows = await measure(store, caller_cases, k=10, efs=efs)
    finally:
        await store.close()
    return {
        "acl": format_table(acl_rows, k=10, n=n, markdown=True),
        "acl_caller": format_table(caller_rows, k=10, n=n, markdown=True),
        "rows": {"acl": [r.__dict__ for r in acl_rows], "acl_caller": [r.__dict__ for r in caller_rows]},
    }


async def latency(
    bootstrap: str, settings: Any, texts: list[str], *, n: int, in_flight: int, caller_filter: bool
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
        await asyncio.gather(*(client.listen(f"t{t:02d}") for t in range(TENANTS)))
        sem = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            nonlocal hits
            tenant, user, groups = random_principal(rng)
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
    return {
        "n": n,
        "in_flight": in_flight,
        "caller_filter": caller_filter,
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
    """Wait until the worker's query agent answers (its consumer group has joined)."""
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


def run(n: int = 1000, recall_n: int = 200, keep: bool = False) -> dict[str, Any]:
    offline()
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings
    from tests.integration.workers import WorkerProcess
    from tests.support.apache_kafka import ApacheKafka

    scratch = Path(tempfile.mkdtemp(prefix="vs-query-bench-"))
    store_path = scratch / "edge"
    os.environ["VECTORSTREAM_STORE__PATH"] = str(store_path)
    settings = Settings(_env_file=None)
    load_before = _load()
    embedder = Embedder(settings)
    rows, vectors = scifact_chunks(embedder)
    texts = list(load_queries().values())
    say(f"{len(rows)} scifact chunks; building {CHUNKS} points across {TENANTS} tenants")
    points, acl_stats = build_points(rows, vectors, embedder.name)
    loaded = asyncio.run(load_store(settings, points, embedder.name, embedder.dim))
    del points
    say(f"store: {loaded}")
    say("recall tables (in-process, before the worker takes the store's lock)")
    recall = asyncio.run(recall_tables(settings, embedder, texts, recall_n))
    embedder.close()

    results: dict[str, Any] = {
        "store": loaded,
        "acl": acl_stats,
        "latency": [],
        "corpus_backend": str(getattr(embedder, "backend_label", "torch")),
    }
    with ApacheKafka(quiet=True) as broker:
        run_id = f"{int(time.time())}"
        worker = WorkerProcess(
            bootstrap=broker.bootstrap_servers,
            store_path=store_path,
            topic=f"bench-docs-{run_id}",
            dlq=f"bench-docs-{run_id}.dlq",
            group=f"bench-{run_id}",
            log_path=scratch / "worker.log",
            extra_env={
                "VECTORSTREAM_KAFKA__QUERIES_TOPIC": f"bench-q-{run_id}",
                "VECTORSTREAM_KAFKA__REPLIES_TOPIC": f"bench-r-{run_id}",
                "VECTORSTREAM_QUERY__RECALL_SAMPLE_RATE": "0",
            },
        ).start()
        bench_settings = Settings(
            _env_file=None,
            kafka={
                "bootstrap_servers": broker.bootstrap_servers,
                "queries_topic": f"bench-q-{run_id}",
                "replies_topic": f"bench-r-{run_id}",
            },
            query={"dev_mode": True},  # the worker (WorkerProcess) runs in dev mode: the same secret
        )
        try:
            worker.wait_for(lambda: worker.metrics() is not None, 180, "the worker's /metrics")
            asyncio.run(warm_up(broker.bootstrap_servers, bench_settings, texts))
            for in_flight, caller in ((1, False), (1, True), (8, False), (8, True)):
                say(f"latency: {n} queries, {in_flight} in flight, caller filter {caller}")
                row = asyncio.run(
                    latency(
                        broker.bootstrap_servers, bench_settings, texts, n=n, in_flight=in_flight, caller_filter=caller
                    )
                )
                say(str(row))
                results["latency"].append(row)
        finally:
            code = worker.terminate()
            for line in worker.log_tail(400).splitlines():
                if "loaded model" in line and " on " in line:
                    results["worker_backend"] = line.split(" on ", 1)[1].split(" (dim")[0]
            if code != 0:
                say(f"worker exited with {code}:\n{worker.log_tail()}")
    results["recall"] = recall["rows"]
    results["load_before"], results["load_after"] = load_before, _load()
    write(results, recall, n=n, recall_n=recall_n)
    if not keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def write(results: dict[str, Any], recall: dict[str, Any], *, n: int, recall_n: int) -> None:
    machine = machine_info()
    lat_rows = [
        [
            r["in_flight"],
            "tenant + access" + (" + caller" if r["caller_filter"] else ""),
            r["n"],
            round(r["p50_ms"], 1),
            round(r["p95_ms"], 1),
            round(r["p99_ms"], 1),
            round(r["server_p50_ms"], 1),
            round(r["server_p99_ms"], 1),
            round(r["queries_per_second"], 1),
            round(r["mean_hits"], 2),
            ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none",
        ]
        for r in results["latency"]
    ]
    lat = table(
        [
            "in flight",
            "filter",
            "queries",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "worker p50 ms",
            "worker p99 ms",
            "queries/s",
            "hits/query",
            "errors",
        ],
        lat_rows,
    )
    s = results["store"]
    md = [
        "# Query latency over Kafka at 100,000 chunks, and recall against exact search",
        "",
        "Written by `python -m benchmarks.query_latency`; re-run it to refresh. Only measured numbers.",
        "",
        "## What was measured",
        "",
        f"* **Data.** scifact's 5,183 abstracts, chunked by the project's chunker and embedded once with "
        f"all-MiniLM-L6-v2 on {results['corpus_backend']}; the worker embeds the queries on "
        f"{results.get('worker_backend', '?')}. {TENANTS} tenants (`t00`..`t49`) each take whole scifact documents in "
        f"their own random order until they hold {CHUNKS // TENANTS:,} chunks: {int(s['chunks']):,} chunks in "
        f"total. Every copied vector gets Gaussian noise (sigma {NOISE} per component) and is renormalized, so "
        "tenants sharing a document do not hold identical vectors. Payloads are built by the ingest code "
        "(`chunk_payload`), with the real chunk text.",
        f"* **Access.** Each document: public with probability 0.4 ({results['acl']['public_docs']} documents), "
        f"else 1-3 of 20 users and 0-2 of 5 groups ({results['acl']['private_docs']} documents). Metadata: "
        "year uniform in 2000-2024, lang en 80 % / de 10 % / fr 10 %.",
        f"* **Store.** Written directly into a Qdrant Edge store (upserts {s['upsert_seconds']:.1f} s, HNSW "
        f"build {s['index_seconds']:.1f} s, m=16, ef_construct=128), then served by a real `vectorstream worker` "
        "process (query agent next to the ingest agent) on Apache Kafka 3.9.1 started by `tests.support.apache_kafka`.",
        "* **Requests.** Real scifact query texts (300 claims), each from a random caller: a random tenant, one "
        "of the 20 users and 0-2 groups, a signed HS256 token. top_k 10, hnsw_ef 128 (the default). Every "
        "search carries the tenant and access filter; rows marked `+ caller` also carry the caller filter "
        f"`{json.dumps(CALLER_FILTER)}`. Latency is the client's: from producing the request to reading its "
        "reply (`QueryClient.request`); worker columns are the reply's `took_ms` (arrival to reply ready).",
        f"* **Recall.** The recall command's measurement (`pipeline.recall.measure`) on the same store, "
        f"before the worker started (Edge locks its folder): {recall_n} real query texts, random callers as "
        "above; each query runs exactly for the truth, then with HNSW at each ef. Latency there is the "
        "store's search call in-process. `served` is recall as the query service serves it: a search that "
        "returns fewer than k hits is re-run exactly.",
        f"* **Load.** The machine was shared with other jobs: load average {results['load_before']} before, "
        f"{results['load_after']} after (2 cores).",
        "* **Observed.** The caller filter makes each search slower in both tables. Its fields (`meta.year`, "
        "`meta.lang`) have no payload index in the Edge adapter (only the tenant, document, version and access "
        "fields have one), which is the likely cause; it was not measured separately.",
        "",
        "## Request -> reply latency over Kafka",
        "",
        lat,
        "",
        "## Recall@10 against exact search, tenant + access filter",
        "",
        recall["acl"],
        "",
        "## Recall@10 against exact search, tenant + access + caller filter",
        "",
        recall["acl_caller"],
        "",
        "## Machine",
        "",
        machine_table(machine),
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "query_latency.md").write_text("\n".join(md))
    (RESULTS / "query_latency.json").write_text(
        json.dumps({"machine": machine, **results}, indent=2, default=str) + "\n"
    )
    print("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.query_latency", description=__doc__)
    parser.add_argument("-n", type=int, default=1000, help="queries per latency row (default %(default)s)")
    parser.add_argument("--recall-n", type=int, default=200, help="queries of the recall table (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch store")
    args = parser.parse_args(argv)
    run(n=args.n, recall_n=args.recall_n, keep=args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
