"""``vectorstream recall``: recall@k and latency of filtered HNSW search at several ef values, against exact search.

Queries are real question texts (embedded) or stored vectors sampled from the collection; each runs with its
tenant's filter (and optionally a caller's access rule), as the query agent would run it.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.auth import Principal
from pipeline.query_filter import search_filter
from pipeline.store.base import TENANT, Filter, Match, VectorStore

DEFAULT_EFS = (16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Case:
    """One query: a vector and the filter it runs with."""

    vector: Sequence[float]
    flt: Filter


@dataclass(frozen=True)
class Row:
    ef: int | None  # None: exact search
    recall: float
    #: as the query service serves it: a search returning fewer than k hits is re-run exactly
    served_recall: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    fallbacks: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def measure(
    store: VectorStore, cases: Sequence[Case], *, k: int = 10, efs: Sequence[int] = DEFAULT_EFS, progress: bool = True
) -> list[Row]:
    """Run every case exactly once for the truth, then with HNSW at each ef; one row per ef plus one for exact."""
    from tqdm import tqdm

    bar = tqdm(total=len(cases) * (len(efs) + 1), unit="query", desc="recall", file=sys.stderr, disable=not progress)
    truth: list[set[str]] = []
    exact_ms: list[float] = []
    for case in cases:
        start = time.perf_counter()
        hits = await store.search(case.vector, flt=case.flt, limit=k, exact=True)
        exact_ms.append((time.perf_counter() - start) * 1000)
        truth.append({h.id for h in hits})
        bar.update()
    rows = [Row(None, 1.0, 1.0, percentile(exact_ms, 50), percentile(exact_ms, 95), percentile(exact_ms, 99), 0)]
    for ef in efs:
        recalls, served, lat, fallbacks = [], [], [], 0
        for case, expected in zip(cases, truth, strict=True):
            start = time.perf_counter()
            hits = await store.search(case.vector, flt=case.flt, limit=k, hnsw_ef=ef)
            lat.append((time.perf_counter() - start) * 1000)
            bar.update()
            if not expected:
                continue
            r = len(expected & {h.id for h in hits}) / len(expected)
            recalls.append(r)
            if len(hits) < k:
                fallbacks += 1
                r = 1.0
            served.append(r)
        rows.append(
            Row(
                ef,
                _mean(recalls),
                _mean(served),
                percentile(lat, 50),
                percentile(lat, 95),
                percentile(lat, 99),
                fallbacks,
            )
        )
    bar.close()
    return rows


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def format_table(rows: Sequence[Row], *, k: int, n: int, markdown: bool = False) -> str:
    head = ("ef", f"recall@{k} HNSW", f"recall@{k} served", "p50 ms", "p95 ms", "p99 ms", "exact re-runs")
    body = [
        (
            "exact" if r.ef is None else str(r.ef),
            f"{r.recall:.4f}",
            f"{r.served_recall:.4f}",
            f"{r.p50_ms:.2f}",
            f"{r.p95_ms:.2f}",
            f"{r.p99_ms:.2f}",
            "-" if r.ef is None else f"{r.fallbacks}/{n}",
        )
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- building cases -----------------------------------------------------------------------------------------


def read_query_texts(path: Path) -> list[str]:
    """Question texts: JSON lines with a "text" (or "query") field, or plain lines."""
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            obj = json.loads(line)
            line = str(obj.get("text") or obj.get("query") or "").strip()
        if line:
            texts.append(line)
    return texts


def tenant_filter(tenant: str, principal: Principal | None) -> Filter:
    if principal is None:
        return Filter(must=(Match(TENANT, tenant),))
    return search_filter(principal)


async def sample_cases(
    store: VectorStore,
    *,
    n: int,
    tenants: Sequence[str] = (),
    pool: int = 20_000,
    principal: Principal | None = None,
    seed: int = 0,
) -> list[Case]:
    """``n`` stored vectors as queries, each filtered to its own tenant (or to ``tenants``)."""
    rng = random.Random(seed)
    flt = Filter(should=tuple(Match(TENANT, t) for t in tenants)) if tenants else None
    points = await store.scroll(flt, limit=pool)
    if not points:
        raise SystemExit("no stored chunks to sample from")
    chosen = rng.sample(points, min(n, len(points)))
    vectors = await store.get_vectors([p.id for p in chosen])
    return [
        Case(vectors[p.id], tenant_filter(str(p.payload[TENANT]), _as(principal, p.payload[TENANT])))
        for p in chosen
        if p.id in vectors
    ]


def _as(principal: Principal | None, tenant: str) -> Principal | None:
    return None if principal is None else Principal(tenant, principal.user, principal.groups)


async def text_cases(
    store: VectorStore,
    embedder: object,
    texts: Sequence[str],
    *,
    n: int,
    tenants: Sequence[str],
    principal: Principal | None = None,
    seed: int = 0,
) -> list[Case]:
    """Real question texts, embedded; each runs against one of ``tenants`` in turn."""
    if not tenants:
        raise SystemExit("--tenant is required with --queries: say which tenants' chunks to search")
    rng = random.Random(seed)
    picked = rng.sample(list(texts), min(n, len(texts)))
    vectors = await embedder.encode(picked)  # type: ignore[attr-defined]
    return [
        Case(v, tenant_filter(tenants[i % len(tenants)], _as(principal, tenants[i % len(tenants)])))
        for i, v in enumerate(vectors)
    ]


async def run_recall(
    *,
    queries: str | None,
    n: int,
    k: int,
    efs: Sequence[int],
    tenants: Sequence[str],
    user: str | None,
    groups: Sequence[str],
    seed: int = 0,
) -> int:
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings
    from pipeline.store import open_store

    settings = Settings()
    embedder = Embedder(settings)
    store = open_store(settings.store)
    try:
        info = await store.open(model=embedder.name, dim=embedder.dim)
    except Exception as exc:
        embedder.close()
        print(
            f"cannot open the store ({exc}). Qdrant Edge is in-process and locks its folder: stop the worker "
            "first, or point VECTORSTREAM_STORE__PATH at a copy.",
            file=sys.stderr,
        )
        return 2
    principal = Principal("-", user, tuple(groups)) if user else None
    try:
        await store.build_index()
        if queries:
            texts = read_query_texts(Path(queries))
            cases = await text_cases(store, embedder, texts, n=n, tenants=tenants, principal=principal, seed=seed)
            source = f"{len(cases)} query texts from {queries}"
        else:
            cases = await sample_cases(store, n=n, tenants=tenants, principal=principal, seed=seed)
            source = f"{len(cases)} stored vectors sampled as queries"
        rows = await measure(store, cases, k=k, efs=efs)
    finally:
        await store.close()
        embedder.close()
    scope = "tenant filter" + (f" + access rule of user {user!r} groups {list(groups)}" if principal else "")
    print(f"\n{info.chunk_count} chunks; {source}; {scope}; k={k}; latency is the store's search call in-process")
    print(format_table(rows, k=k, n=len(cases)))
    return 0
