"""The store part of ingest and filtered query latency at 10k, 100k (and with --scale-1m, 1M) chunks.

Vectors are precomputed: real scifact chunk vectors plus small noise (said in the results), payloads are real chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    load_corpus,
    load_queries,
    machine_info,
    offline,
    peak_rss_bytes,
    say,
    table,
    write_results,
)

SCALES = (10_000, 100_000)
#: documents a real worker ingests at each size (end-to-end rate; about 1.9 chunks each)
E2E_DOCS = 300
BATCH = 512
#: the worker builds the HNSW index after this many unindexed points (settings.store.index_max_unindexed_points)
INDEX_EVERY = 20_000
QUERIES = 500
#: of them, how many are also run exactly for recall@10
RECALL_QUERIES = 100
TENANTS = 10
NOISE = 0.02


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


#: the store settings under test: "default" (float32 in RAM) or "scale" (int8 quantized copies searched and
#: rescored, originals and graph on disk), the layout the README recommends for a million chunks
LAYOUTS: dict[str, dict[str, Any]] = {
    "default": {},
    "scale": {"quantization": "int8", "vectors_on_disk": True, "hnsw_on_disk": True},
}


async def _grow(
    scales: tuple[int, ...],
    base: np.ndarray,
    texts: list[str],
    qvecs: np.ndarray,
    folder: Path,
    e2e: Any = None,
    layout: str = "scale",
) -> list[dict[str, Any]]:
    """Grow one store through the sizes; at each, measure the store part, queries and (``e2e``) a worker run."""
    import os

    from pipeline.settings import Settings
    from pipeline.store import open_store
    from pipeline.store.base import (
        ACL_GROUPS,
        ACL_PUBLIC,
        ACL_USERS,
        CHUNK_INDEX,
        CONTENT_HASH,
        DOC,
        MODEL,
        TENANT,
        TEXT,
        TITLE,
        VERSION,
        ChunkPoint,
        Filter,
        Match,
        chunk_point_id,
    )

    settings = Settings(_env_file=None)
    settings = settings.model_copy(
        update={"store": settings.store.model_copy(update={"path": folder, **LAYOUTS[layout]})}
    )
    store = open_store(settings.store)
    await store.open(model=settings.model.name, dim=base.shape[1])
    rng = np.random.default_rng(7)
    rows: list[dict[str, Any]] = []
    written = unindexed = 0
    rss_open = peak_rss_bytes(os.getpid())[0]
    try:
        for target in scales:
            segment_start, started, build_seconds, longest_build = written, time.perf_counter(), 0.0, 0.0
            while written < target:
                n = min(BATCH, target - written)
                idx = np.arange(written, written + n)
                vecs = base[idx % len(base)] + rng.normal(0, NOISE, (n, base.shape[1])).astype(np.float32)
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
                points = []
                for j, i in enumerate(idx):
                    tenant = f"t{i % TENANTS}"
                    doc = f"d{i // 2}"
                    points.append(
                        ChunkPoint(
                            chunk_point_id(tenant, doc, int(i % 2)),
                            vecs[j].tolist(),
                            {
                                TENANT: tenant,
                                DOC: doc,
                                VERSION: 1,
                                CHUNK_INDEX: int(i % 2),
                                TITLE: "",
                                TEXT: texts[i % len(texts)],
                                ACL_PUBLIC: True,
                                ACL_USERS: [],
                                ACL_GROUPS: [],
                                CONTENT_HASH: f"{i:032x}",
                                MODEL: settings.model.name,
                            },
                        )
                    )
                await store.upsert_chunks(points)
                written += n
                unindexed += n
                if unindexed >= INDEX_EVERY or written == target:
                    build_started = time.perf_counter()
                    await store.build_index()
                    took = time.perf_counter() - build_started
                    build_seconds += took
                    longest_build = max(longest_build, took)
                    unindexed = 0
                if written // 50_000 != (written - n) // 50_000:  # crossed a multiple of 50k
                    say(f"  {written:,} chunks written ({time.perf_counter() - started:.0f} s for this size)")
            segment_seconds = time.perf_counter() - started
            rate = (target - segment_start) / segment_seconds
            lat: list[float] = []
            recall: list[float] = []
            for q in range(QUERIES):
                flt = Filter(must=(Match(TENANT, f"t{q % TENANTS}"), Match(ACL_PUBLIC, True)))
                started = time.perf_counter()
                hits = await store.search(qvecs[q % len(qvecs)].tolist(), flt=flt, limit=10)
                lat.append((time.perf_counter() - started) * 1000)
                assert hits, "a filtered query found nothing"
                if q < RECALL_QUERIES:  # what the layout and HNSW trade: recall against exact search, same filter
                    truth = await store.search(qvecs[q % len(qvecs)].tolist(), flt=flt, limit=10, exact=True)
                    recall.append(len({h.id for h in hits} & {h.id for h in truth}) / max(1, len(truth)))
            rss, hwm = peak_rss_bytes(os.getpid())
            segments = (await store.open(model=settings.model.name, dim=base.shape[1])).extra.get("segments")
            row = {
                "chunks": target,
                "store_points_per_second": rate,
                "query_p50_ms": float(np.percentile(lat, 50)),
                "query_p99_ms": float(np.percentile(lat, 99)),
                "rss_bytes": rss,
                "peak_rss_bytes": hwm,
                "rss_growth_bytes": rss - rss_open,
                "disk_bytes": _dir_bytes(folder),
                "index_build_seconds": build_seconds,
                "longest_build_seconds": longest_build,
                "segment_seconds": segment_seconds,
                "layout": layout,
                "segments": segments,
                "recall_at_10": float(np.mean(recall)),
            }
            say(
                f"{target:,} chunks: {rate:,.0f} points/s ({segment_start:,} to {target:,}), "
                f"query p99 {row['query_p99_ms']:.2f} ms"
            )
            if e2e is not None:
                # a real worker ingests real documents into this very store (it needs the store's folder)
                await store.close()
                row.update(await asyncio.to_thread(e2e, folder, f"scale{target}"))
                store = open_store(settings.store)
                await store.open(model=settings.model.name, dim=base.shape[1])
                written = await store.count()
            rows.append(row)
    finally:
        await store.close()
    return rows


def _e2e_runner(bootstrap: str, scratch: Path, layout: str) -> Any:
    from benchmarks.ingest_throughput import measure_end_to_end

    docs = load_corpus(E2E_DOCS)
    # the worker opens the store with the same layout (Edge rewrites a shard's config to the one it is given)
    env = {
        f"VECTORSTREAM_STORE__{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
        for k, v in LAYOUTS[layout].items()
    }

    def measure(store_path: Path, tenant: str) -> dict[str, Any]:
        say(f"  end to end: {len(docs)} documents through Kafka into this store")
        measured, detail = measure_end_to_end(bootstrap, docs, scratch, 0, env, tenant=tenant, store_path=store_path)
        chunks = detail["chunks_embedded"]
        rate = chunks / measured.seconds
        return {
            "e2e_chunks": chunks,
            "e2e_seconds": measured.seconds,
            "e2e_chunks_per_second": rate,
            "worker_peak_rss_bytes": detail["worker_peak_rss_bytes"],
        }

    return measure


def run(
    scales: tuple[int, ...] = SCALES, write: bool = True, e2e: bool = True, layout: str = "scale"
) -> dict[str, Any]:
    offline()
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings
    from tests.support.apache_kafka import ApacheKafka

    machine = machine_info()
    settings = Settings(_env_file=None)
    emb = Embedder(settings)
    chunker = emb.chunker()
    texts = [c.text for d in load_corpus(400) for c in chunker.split(chunker.document_text(d.title, d.text))]
    say(f"embedding {len(texts)} real chunks and the queries as the base of the synthetic vectors")
    base = emb.encode_sync(texts)
    qvecs = emb.encode_sync(list(load_queries().values()))
    emb.close()
    folder = Path(tempfile.mkdtemp(prefix="vectorstream-bench-scale-"))
    broker = ApacheKafka(quiet=True) if e2e else None
    try:
        if broker is not None:
            broker.start()
        runner = _e2e_runner(broker.bootstrap_servers, folder, layout) if broker is not None else None
        rows = asyncio.run(_grow(scales, base, texts, qvecs, folder / "edge", runner, layout))
    finally:
        if broker is not None:
            broker.close()
        shutil.rmtree(folder, ignore_errors=True)
    ref = rows[0]
    table_rows = []
    for r in rows:
        rate_key = "e2e_chunks_per_second" if "e2e_chunks_per_second" in r else "store_points_per_second"
        rate_ratio = r[rate_key] / ref[rate_key]
        p99_ratio = r["query_p99_ms"] / ref["query_p99_ms"]
        e2e_cells = ["-", "-", "-"]
        if "e2e_chunks_per_second" in r:
            e2e_cells = [
                round(r["e2e_chunks_per_second"], 1),
                f"{rate_ratio:.2f}x",
                f"{r['worker_peak_rss_bytes'] / 2**20:,.0f}",
            ]
        store_ratio = r["store_points_per_second"] / ref["store_points_per_second"]
        table_rows.append(
            [
                f"{r['chunks']:,}",
                *e2e_cells,
                round(r["store_points_per_second"]),
                f"{store_ratio:.2f}x",
                f"{r['index_build_seconds'] / max(r['segment_seconds'], 1e-9):.0%}",
                round(r.get("longest_build_seconds", 0.0), 1),
                r.get("segments", "-"),
                round(r["query_p50_ms"], 2),
                round(r["query_p99_ms"], 2),
                f"{p99_ratio:.2f}x",
                round(r.get("recall_at_10", float("nan")), 3),
                f"{r['rss_growth_bytes'] / 2**20:,.0f}",
                f"{r['disk_bytes'] / 2**20:,.0f}",
                "yes" if rate_ratio >= 0.75 and p99_ratio <= 1.25 else "no",
            ]
        )
    body = table(
        [
            "chunks",
            "end-to-end ingest chunks/s",
            "vs 10k",
            "worker peak RSS MiB",
            "store part points/s",
            "vs 10k",
            "of it HNSW builds",
            "longest build s",
            "segments",
            "query p50 ms",
            "query p99 ms",
            "p99 vs 10k",
            "recall@10 vs exact",
            "store RSS MiB",
            "store on disk MiB",
            "ingest and p99 within 25% of 10k",
        ],
        table_rows,
    )
    print(body)
    data = {"scales": list(scales), "rows": rows, "base_vectors": len(base), "noise_sigma": NOISE}
    if write:
        method = (
            f"Store layout: {layout} ({LAYOUTS[layout] or 'the default store settings'}); segments capped at "
            f"{settings.store.max_segment_size_kb:,} KB of vectors (STORE__MAX_SEGMENT_SIZE_KB), so an index build "
            "merges into a segment of at most that size. "
            "Store part in process, through the project's VectorStore port on Qdrant Edge: "
            f"batches of {BATCH} chunk points with full payloads (real scifact chunk text), the HNSW index "
            f"built every {INDEX_EVERY:,} points as the worker does. Vectors are precomputed: {len(base)} real chunk "
            f"vectors of the default backend plus Gaussian noise (sigma {NOISE} per dimension), re-normalized. "
            "The ingest rate at a size is the mean over the points written since the previous size (from 0 for the "
            "first), index builds included. Store RSS: the process's resident memory growth since the store opened "
            f"(the model loaded before it is not counted). Queries: {QUERIES} scifact query vectors, top 10, "
            f"filtered by one of {TENANTS} tenants and the public flag, default hnsw_ef; recall@10 of the first "
            f"{RECALL_QUERIES} against exact search with the same filter (original vectors). Longest build: the "
            "longest single index build, during which Qdrant Edge holds the Python GIL, so a worker's event loop "
            "waits that long. "
            "Embedding cost per chunk does not depend on the store's size "
            f"(see ingest_throughput.md). End to end: at each size a real worker process ingests the first {E2E_DOCS} "
            "scifact documents (a new tenant each time) through Apache Kafka into that very store, timed as in "
            "ingest_throughput; the verdict uses this end-to-end rate and the query p99."
        )
        path = write_results(
            "scale",
            title="Scale: store ingest and query latency by collection size",
            sections=[("Results", body), ("Method", method)],
            data=data,
            machine=machine,
        )
        say(f"wrote {path}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale-1m", action="store_true", help="also grow to 1,000,000 chunks (long)")
    parser.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="scale",
        help="store settings: float32 in RAM, or int8 + on disk (default %(default)s)",
    )
    args = parser.parse_args(argv)
    run((*SCALES, 1_000_000) if args.scale_1m else SCALES, layout=args.layout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
