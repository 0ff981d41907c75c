"""Retrieval quality on scifact: the chosen backend vs fp32 (exact search), BM25, and end to end through Kafka.

End to end: every document goes through the documents topic into Qdrant Edge (dense and BM25 sparse vectors, one
ingest), then every query through the query topic once per mode: dense, sparse, hybrid RRF and hybrid DBSF.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    CACHE,
    Doc,
    load_corpus,
    load_qrels,
    load_queries,
    machine_info,
    offline,
    say,
    table,
    write_results,
)
from benchmarks.ir_metrics import doc_scores, evaluate

PUBLISHED = {"ndcg@10": 0.64508, "recall@10": 0.78333}
#: BM25 (Anserini, flat index, k1=0.9 b=0.4) on scifact, BEIR's published figure (nDCG@10 only)
PUBLISHED_BM25 = {"ndcg@10": 0.679}
#: the modes asked end to end, each through the query topic: (label, mode, fusion)
E2E_MODES = (
    ("dense", "dense", None),
    ("sparse", "sparse", None),
    ("hybrid-rrf", "hybrid", "rrf"),
    ("hybrid-dbsf", "hybrid", "dbsf"),
)
#: chunk hits asked per query; documents are ranked by their best chunk
TOP_CHUNKS = 100


def chunk_corpus(emb: Any, docs: list[Doc]) -> tuple[list[str], list[str], list[int]]:
    chunker = emb.chunker()
    doc_ids: list[str] = []
    texts: list[str] = []
    lengths: list[int] = []
    for d in docs:
        for c in chunker.split(chunker.document_text(d.title, d.text)):
            doc_ids.append(d.id)
            texts.append(c.text)
            lengths.append(c.tokens)
    return doc_ids, texts, lengths


def embed_cached(emb: Any, backend: str, texts: list[str], lengths: list[int]) -> tuple[np.ndarray, float | None]:
    """Vectors of ``texts`` (cached in benchmarks/.cache by backend and content); seconds when computed now."""
    key = hashlib.sha256(("\x00".join(texts) + backend + emb.name).encode()).hexdigest()[:16]
    path = CACHE / f"vectors-{backend}-{key}.npy"
    if path.is_file():
        return np.load(path), None
    started = time.perf_counter()
    vecs = emb.encode_sync(texts, lengths)
    seconds = time.perf_counter() - started
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    return vecs, seconds


def exact_runs(doc_ids: list[str], vecs: np.ndarray, qids: list[str], qvecs: np.ndarray) -> dict[str, dict]:
    scores = qvecs @ vecs.T
    runs: dict[str, dict[str, float]] = {}
    for qi, q in enumerate(qids):
        top = np.argsort(-scores[qi])[:TOP_CHUNKS]
        runs[q] = doc_scores([(doc_ids[j], float(scores[qi, j])) for j in top])
    return runs


def in_process(
    backend: str, reference: str, docs: list[Doc], queries: dict[str, str], qrels: dict[str, dict[str, int]]
) -> dict[str, Any]:
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings

    base = Settings(_env_file=None)
    out: dict[str, Any] = {}
    vectors: dict[str, np.ndarray] = {}
    qids = list(queries)
    for name in (reference, backend):
        if name in vectors:
            continue
        s = base.model_copy(update={"model": base.model.model_copy(update={"backend": name, "force_backend": True})})
        emb = Embedder(s)
        doc_ids, texts, lengths = chunk_corpus(emb, docs)
        say(f"embedding {len(texts)} chunks with {emb.backend_label} (cached after the first run)")
        vecs, seconds = embed_cached(emb, name, texts, lengths)
        qvecs = emb.encode_sync([queries[q] for q in qids])
        vectors[name] = vecs
        metrics = evaluate(exact_runs(doc_ids, vecs, qids, qvecs), qrels)
        out[name] = {
            **metrics,
            "label": emb.backend_label,
            "chunks": len(texts),
            "chunks_per_second": len(texts) / seconds if seconds else None,
        }
        emb.close()
    cos = (vectors[backend] * vectors[reference]).sum(axis=1)
    out["mean_cosine"] = float(cos.mean())
    out["min_cosine"] = float(cos.min())
    return out


def bm25_in_process(
    doc_ids: list[str], texts: list[str], queries: dict[str, str], qrels: dict[str, dict[str, int]]
) -> dict[str, Any]:
    """BM25 over the chunks with the worker's own sparse vectors (pipeline.sparse, default settings) and
    the engine's IDF formula computed here over all chunks: what sparse search should give end to end."""
    from pipeline.settings import Settings
    from pipeline.sparse import SparseEncoder, TokenizerConfig

    enc = SparseEncoder(TokenizerConfig.from_settings(Settings(_env_file=None).sparse))
    postings: dict[int, list[tuple[int, float]]] = defaultdict(list)
    lengths = []
    for j, text in enumerate(texts):
        lengths.append(len(enc.terms(text)))
        v = enc.encode_document(text)
        for i, w in zip(v.indices, v.values, strict=True):
            postings[i].append((j, w))
    n_chunks = len(texts)
    runs: dict[str, dict[str, float]] = {}
    for qid, text in queries.items():
        qv = enc.encode_query(text)
        scores: dict[int, float] = defaultdict(float)
        for i, qw in zip(qv.indices, qv.values, strict=True):
            p = postings.get(i, [])
            idf = math.log(1 + (n_chunks - len(p) + 0.5) / (len(p) + 0.5))  # Qdrant's Modifier.IDF
            for j, dw in p:
                scores[j] += idf * qw * dw
        top = sorted(scores.items(), key=lambda x: -x[1])[:TOP_CHUNKS]
        runs[qid] = doc_scores([(doc_ids[j], s) for j, s in top])
    return {**evaluate(runs, qrels), "mean_chunk_terms": float(np.mean(lengths)), "avg_len": enc.config.avg_len}


async def _ask_all(
    bootstrap: str, token: str, queries: dict[str, str], *, mode: str, fusion: str | None
) -> tuple[dict[str, dict], list[float], set[str]]:
    from pipeline.client import QueryClient

    runs: dict[str, dict[str, float]] = {}
    took: list[float] = []
    served: set[str] = set()
    async with QueryClient(bootstrap, tenant="bench", token=token) as client:
        for qid, text in queries.items():
            result = await client.ask(
                text,
                top_k=TOP_CHUNKS,
                mode=mode,
                fusion=fusion,
                with_text=False,
                with_metadata=False,
                timeout=30,
            )
            runs[qid] = doc_scores([(h.doc_id, h.score) for h in result.hits])
            took.append(result.took_ms)
            served.add(f"{result.mode}{'-' + result.fusion if result.fusion else ''}")
    return runs, took, served


def end_to_end(docs: list[Doc], queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    from benchmarks.ingest_throughput import _publish, chunks_embedded, start_worker
    from pipeline.auth import mint_token
    from pipeline.settings import Settings
    from tests.support.apache_kafka import ApacheKafka

    scratch = Path(tempfile.mkdtemp(prefix="vectorstream-bench-quality-"))
    broker = ApacheKafka(quiet=True)
    try:
        say("starting Apache Kafka and a worker")
        broker.start()
        worker = start_worker(broker.bootstrap_servers, scratch / "edge", scratch / "worker.log")
        try:
            say(f"publishing all {len(docs)} scifact documents through Kafka")
            started = time.perf_counter()
            asyncio.run(_publish(broker.bootstrap_servers, worker.topic, docs, tenant="bench"))
            worker.wait_for(lambda: worker.events() >= len(docs), timeout=3600, what="every document indexed")
            ingest_seconds = time.perf_counter() - started
            chunks = chunks_embedded(worker)
            # the worker builds the HNSW index once writes go quiet: let it, so queries see the index
            worker.wait_for(
                lambda: (
                    (worker.metrics() or {}).get("vectorstream_index_builds_total", 0) >= 1
                    and time.perf_counter() - started > ingest_seconds + 3
                ),
                timeout=600,
                what="the HNSW index built",
            )
            say(f"ingested {chunks:.0f} chunks in {ingest_seconds:.0f}s; asking {len(queries)} queries per mode")
            token = mint_token(Settings(_env_file=None, query={"dev_mode": True}).query, tenant="bench", user="bench")
            modes: dict[str, Any] = {}
            for label, mode, fusion in E2E_MODES:
                runs, took, served = asyncio.run(
                    _ask_all(broker.bootstrap_servers, token, queries, mode=mode, fusion=fusion)
                )
                modes[label] = {
                    **evaluate(runs, qrels),
                    "served": sorted(served),
                    "server_took_ms_p50": float(np.percentile(took, 50)),
                    "server_took_ms_p99": float(np.percentile(took, 99)),
                }
                say(f"{label}: nDCG@10 {modes[label]['ndcg@10']:.4f}, served as {sorted(served)}")
        finally:
            worker.terminate()
    finally:
        broker.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        **modes["dense"],
        "modes": modes,
        "ingest_seconds": ingest_seconds,
        "chunks": chunks,
        "chunks_per_second": chunks / ingest_seconds,
    }


def run(write: bool = True, e2e: bool = True, reference: str = "openvino") -> dict[str, Any]:
    offline()
    from pipeline.backends import auto_backend
    from pipeline.settings import Settings

    backend = Settings(_env_file=None).model.backend
    if backend == "auto":
        backend = auto_backend()
    machine = machine_info()
    load_before = _loadavg()
    docs = load_corpus()
    queries = load_queries()
    qrels = load_qrels()
    queries = {q: t for q, t in queries.items() if q in qrels}
    inproc = in_process(backend, reference, docs, queries, qrels)
    chunker = _chunker()
    chunk_docs, chunk_texts = [], []
    for d in docs:
        for c in chunker.split(chunker.document_text(d.title, d.text)):
            chunk_docs.append(d.id)
            chunk_texts.append(c.text)
    bm25 = bm25_in_process(chunk_docs, chunk_texts, queries, qrels)
    full = end_to_end(docs, queries, qrels) if e2e else None

    load_after = _loadavg()
    ref, ours = inproc[reference], inproc[backend]
    rows = [
        [
            f"exact search, {ref['label']} (fp32 reference)",
            round(ref["ndcg@10"], 4),
            round(ref["recall@10"], 4),
            "in process, all chunks, numpy",
        ],
        [
            f"exact search, {ours['label']} (the default backend)",
            round(ours["ndcg@10"], 4),
            round(ours["recall@10"], 4),
            "in process, all chunks, numpy",
        ],
    ]
    rows.append(
        [
            "BM25, exact, in process (the worker's sparse vectors, IDF over all chunks)",
            round(bm25["ndcg@10"], 4),
            round(bm25["recall@10"], 4),
            f"avg_len {bm25['avg_len']:.0f}; measured mean {bm25['mean_chunk_terms']:.1f} terms a chunk",
        ]
    )
    if full:
        for label, res in full["modes"].items():
            rows.append(
                [
                    f"end to end, {label}: Kafka -> worker -> Qdrant Edge -> query topic ({ours['label']})",
                    round(res["ndcg@10"], 4),
                    round(res["recall@10"], 4),
                    f"served as {', '.join(res['served'])}; server p50 {res['server_took_ms_p50']:.1f} ms; "
                    f"{full['chunks']:.0f} chunks ingested at {full['chunks_per_second']:.1f}/s",
                ]
            )
    rows.append(
        [
            "published (MTEB, all-MiniLM-L6-v2, exact, first 256 tokens of each document)",
            PUBLISHED["ndcg@10"],
            PUBLISHED["recall@10"],
            "README of the datasets folder",
        ]
    )
    rows.append(
        [
            "published BM25 (Anserini, BEIR)",
            PUBLISHED_BM25["ndcg@10"],
            "-",
            "Anserini flat-index BEIR regression, as issue 14 cites; recall@10 not cited",
        ]
    )
    body = table(["system", "nDCG@10", "Recall@10", "notes"], rows)
    d_ndcg = ours["ndcg@10"] - ref["ndcg@10"]
    targets = [
        [
            "mean cosine, default backend vs fp32 (all scifact chunks)",
            round(inproc["mean_cosine"], 4),
            ">= 0.99",
            "yes" if inproc["mean_cosine"] >= 0.99 else "no",
        ],
        [
            "nDCG@10, default backend minus fp32",
            f"{d_ndcg:+.4f}",
            "within 0.01",
            "yes" if abs(d_ndcg) <= 0.01 else "no",
        ],
    ]
    if full:
        d_pub = full["ndcg@10"] - PUBLISHED["ndcg@10"]
        targets.append(["nDCG@10 end to end minus published", f"{d_pub:+.4f}", "reported", "-"])
        sparse = full["modes"]["sparse"]["ndcg@10"]
        for name, value in (
            ("rrf", full["modes"]["hybrid-rrf"]["ndcg@10"]),
            ("dbsf", full["modes"]["hybrid-dbsf"]["ndcg@10"]),
        ):
            targets.append(
                [f"nDCG@10 end to end, hybrid {name}", round(value, 4), ">= 0.70", "yes" if value >= 0.70 else "no"]
            )
        targets.append(
            [
                "nDCG@10 end to end, sparse minus Anserini BM25",
                f"{sparse - PUBLISHED_BM25['ndcg@10']:+.4f}",
                "within 0.02",
                "yes" if abs(sparse - PUBLISHED_BM25["ndcg@10"]) <= 0.02 else "no",
            ]
        )
    targets_table = table(["target", "measured", "target", "met"], targets)
    print(body)
    print()
    print(targets_table)
    data = {
        "backend": backend,
        "reference": reference,
        "in_process": inproc,
        "bm25_in_process": bm25,
        "end_to_end": full,
        "published": PUBLISHED,
        "published_bm25": PUBLISHED_BM25,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    if write:
        method = (
            f"scifact test split: {len(docs)} documents (title and text), {len(queries)} judged queries. Documents "
            "are chunked as the worker chunks them (256-token windows, 32 overlapping); a document scores as its "
            f"best chunk among the top {TOP_CHUNKS} chunk hits; nDCG@10 and recall@10 as trec_eval computes them "
            "(benchmarks/ir_metrics.py, unit-tested). The fp32 reference is OpenVINO fp32, whose vectors match "
            "PyTorch's (see embedding_backends.md). End to end: documents published to the documents topic of an "
            "Apache Kafka broker, ingested by a real worker into Qdrant Edge, then each query sent through the "
            "queries topic with a signed token and answered by the same worker (HNSW, default ef). The published "
            "figure embeds each document once, truncated at 256 tokens, so chunking explains part of the difference. "
            "One ingest writes dense and BM25 sparse vectors (default sparse settings: Snowball english, Lucene's "
            "English stop words, k1 0.9, b 0.4, avg_len 100); the same 300 queries are then asked once per mode "
            "(mode dense, sparse, hybrid with fusion rrf, hybrid with fusion dbsf), each a single Query API call "
            f"in the store (hybrid: {TOP_CHUNKS} candidates, at least the sparse.prefetch_limit, per branch, both "
            "under the tenant and access filter). The in-process BM25 row scores the same sparse vectors with the "
            "engine's IDF formula over all chunks in Python: it checks that the store's sparse search adds nothing "
            "and loses nothing. Anserini's BM25 indexes whole documents with the Porter stemmer; ours indexes chunks."
        )
        path = write_results(
            "retrieval_quality",
            title="Retrieval quality on scifact",
            sections=[
                ("Results", body),
                ("Targets", targets_table),
                ("Method", method),
                ("Load", f"load average (1, 5, 15 min) before: {load_before}; after: {load_after} (2 cores, shared)"),
            ],
            data=data,
            machine=machine,
        )
        say(f"wrote {path}")
    return data


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _chunker() -> Any:
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings

    return Embedder(Settings(_env_file=None)).chunker()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-e2e", action="store_true", help="skip the run through Kafka")
    args = parser.parse_args(argv)
    run(e2e=not args.no_e2e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
