"""The vector-store contract: the same scenarios against every adapter, expecting the same answers.

Adapters differ in engine (Qdrant Edge, qdrant-client local mode, PostgreSQL + pgvector on a real server the
harness started, a Qdrant server over REST and gRPC); callers must not be able to tell them apart. The server
backends run when VECTORSTREAM_TEST_QDRANT_URL names a Qdrant server (its REST URL; gRPC on port 6334 of the same
host) and are skipped otherwise; each test gets collections of its own there, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from qdrant_client import AsyncQdrantClient

from pipeline.errors import ConfigurationError, ModelMismatchError, StoreUnavailableError
from pipeline.store import open_store
from pipeline.store.base import (
    ACL_GROUPS,
    ACL_PUBLIC,
    ACL_USERS,
    CHUNK_INDEX,
    DOC,
    META_PREFIX,
    TENANT,
    TEXT,
    VERSION,
    ChunkPoint,
    Condition,
    DocState,
    Filter,
    HnswParams,
    Match,
    MatchAny,
    Range,
    VectorLayout,
    VectorStore,
    chunk_point_id,
)
from pipeline.store.edge import EdgeStore
from pipeline.store.pgvector import COLLECTIONS_TABLE, PgVectorStore
from pipeline.store.qdrant import QdrantStore

#: a Qdrant server to run every scenario on as well (its REST URL), e.g. http://127.0.0.1:6333
QDRANT_URL = os.environ.get("VECTORSTREAM_TEST_QDRANT_URL", "").strip()
SERVER_BACKENDS = ("qdrant-server-rest", "qdrant-server-grpc")
#: edge-int8: the million-chunk layout (int8 quantized copies searched, originals and graph on disk, rescored)
BACKENDS = ("edge", "edge-int8", "qdrant-local", "pgvector", *SERVER_BACKENDS)
MODEL = "contract-model"
DIM = 16
HNSW = HnswParams(m=16, ef_construct=100, full_scan_threshold_kb=1)
#: the server refuses a full-scan threshold below 10 KB (pipeline.settings.QDRANT_SERVER_LIMITS)
SERVER_HNSW = HnswParams(m=16, ef_construct=100, full_scan_threshold_kb=10)
SCALE_LAYOUT = VectorLayout(quantization="int8", oversampling=2.0, vectors_on_disk=True, hnsw_on_disk=True)

StoreFactory = Callable[..., VectorStore]


def build_store(backend: str, root: Path, collection: str = "chunks", *, pg_url: str | None = None) -> VectorStore:
    if backend == "edge":
        return EdgeStore(root / "edge", collection, hnsw=HNSW, hnsw_ef=128)
    if backend == "edge-int8":
        return EdgeStore(root / "edge-int8", collection, hnsw=HNSW, hnsw_ef=128, layout=SCALE_LAYOUT)
    if backend == "qdrant-local":
        return QdrantStore(collection, path=root / "qdrant-local", hnsw=HNSW, hnsw_ef=128)
    if backend in SERVER_BACKENDS:
        return QdrantStore(
            server_collection(root, collection),
            url=QDRANT_URL,
            prefer_grpc=backend.endswith("grpc"),
            timeout_seconds=10,
            hnsw=SERVER_HNSW,
            hnsw_ef=128,
        )
    if backend == "pgvector":
        assert pg_url is not None, "the pgvector backend needs the pg_url fixture"
        return PgVectorStore(pg_url, collection, hnsw=HNSW, hnsw_ef=128)
    raise ValueError(backend)


def server_collection(root: Path, collection: str) -> str:
    """The test's own name for ``collection`` on the shared server: the same for every store of one test
    (a reopen finds what the first store wrote), different for every test (tmp_path is per test)."""
    return f"contract_{hashlib.sha1(str(root).encode()).hexdigest()[:12]}_{collection}"


# --- fixtures: each scenario runs once per adapter, persisted in the test's tmp folder ----------------------


@pytest.fixture(
    params=[
        pytest.param(
            b,
            marks=pytest.mark.skipif(
                b in SERVER_BACKENDS and not QDRANT_URL,
                reason="needs a Qdrant server: set VECTORSTREAM_TEST_QDRANT_URL",
            ),
        )
        for b in BACKENDS
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """A factory of (unopened) stores of the current backend under tmp_path (pgvector: in a database of its
    own on the session's server); all are closed at teardown."""
    made: list[VectorStore] = []
    pg_url = request.getfixturevalue("pg_url") if backend == "pgvector" else None

    def make(collection: str = "chunks", subdir: str = "") -> VectorStore:
        store = build_store(backend, tmp_path / subdir, collection, pg_url=pg_url)
        made.append(store)
        return store

    yield make
    for store in reversed(made):
        await store.close()
    if backend in SERVER_BACKENDS:
        client = AsyncQdrantClient(url=QDRANT_URL, check_compatibility=False)
        try:
            for name in {n for s in made for n in (s._collection, s._registry)}:  # type: ignore[attr-defined]
                await client.delete_collection(name)
        finally:
            await client.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> VectorStore:
    opened = make_store()
    await opened.open(model=MODEL, dim=DIM)
    return opened


# --- helpers ------------------------------------------------------------------------------------------------


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunk(
    tenant: str,
    doc: str,
    index: int,
    vector: Any,
    *,
    version: int = 1,
    public: bool = False,
    users: tuple[str, ...] = (),
    groups: tuple[str, ...] = (),
    meta: dict[str, Any] | None = None,
) -> ChunkPoint:
    payload: dict[str, Any] = {
        TENANT: tenant,
        DOC: doc,
        VERSION: version,
        CHUNK_INDEX: index,
        TEXT: f"{doc} chunk {index}",
        ACL_PUBLIC: public,
        ACL_USERS: list(users),
        ACL_GROUPS: list(groups),
    }
    if meta is not None:
        payload[META_PREFIX] = meta
    return ChunkPoint(id=chunk_point_id(tenant, doc, index), vector=[float(v) for v in vector], payload=payload)


def field_values(payload: dict[str, Any], key: str) -> list[Any]:
    """The values a dotted key reaches in a nested payload (a list contributes its elements)."""
    current: Any = payload
    for part in key.split("."):
        if not isinstance(current, dict) or part not in current:
            return []
        current = current[part]
    return list(current) if isinstance(current, list) else [current]


def same(a: Any, b: Any) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def reference_match(payload: dict[str, Any], cond: Condition) -> bool:
    """What a condition means, written independently of both adapters."""
    if isinstance(cond, Filter):
        return (
            all(reference_match(payload, c) for c in cond.must)
            and (not cond.should or any(reference_match(payload, c) for c in cond.should))
            and not any(reference_match(payload, c) for c in cond.must_not)
        )
    values = field_values(payload, cond.key)
    if isinstance(cond, Match):
        return any(same(v, cond.value) for v in values)
    if isinstance(cond, MatchAny):
        return any(same(v, want) for v in values for want in cond.values)
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return any(
        (cond.gt is None or v > cond.gt)
        and (cond.gte is None or v >= cond.gte)
        and (cond.lt is None or v < cond.lt)
        and (cond.lte is None or v <= cond.lte)
        for v in numbers
    )


def brute_force(points: list[ChunkPoint], query: np.ndarray, limit: int) -> list[tuple[str, float]]:
    ids = [p.id for p in points]
    matrix = np.array([p.vector for p in points], dtype=np.float64)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    scores = matrix @ (query / np.linalg.norm(query))
    order = np.argsort(-scores)[:limit]
    return [(ids[i], float(scores[i])) for i in order]


# --- open, reopen, model checks -----------------------------------------------------------------------------


async def test_open_reports_model_and_count(store: VectorStore) -> None:
    info = await store.open(model=MODEL, dim=DIM)  # a second open of an open store is harmless
    assert (info.model, info.dim, info.chunk_count) == (MODEL, DIM, 0)


async def test_reopen_keeps_chunks_and_doc_states(make_store: StoreFactory) -> None:
    rng = np.random.default_rng(1)
    vectors = unit_vectors(rng, 5)
    points = [chunk("t1", "d1", i, v) for i, v in enumerate(vectors)]
    state = DocState("t1", "d1", version=1, chunk_count=5, chunk_hashes=tuple("abcde"))

    first = make_store()
    await first.open(model=MODEL, dim=DIM)
    await first.upsert_chunks(points)
    await first.put_doc_states([state])
    await first.close()

    second = make_store()
    info = await second.open(model=MODEL, dim=DIM)
    assert info.chunk_count == 5
    assert await second.get_doc_states([("t1", "d1")]) == {("t1", "d1"): state}
    hits = await second.search(vectors[2], flt=None, limit=1, exact=True)
    assert hits[0].id == points[2].id


async def test_other_model_is_refused(make_store: StoreFactory) -> None:
    first = make_store()
    await first.open(model=MODEL, dim=DIM)
    await first.close()

    with pytest.raises(ModelMismatchError) as raised:
        await make_store().open(model="another-model", dim=DIM)
    message = str(raised.value)
    assert "chunks" in message and MODEL in message and "another-model" in message
    assert "VECTORSTREAM_STORE__COLLECTION" in message and "re-ingest" in message

    # the refusal changed nothing: the right model still opens
    assert (await make_store().open(model=MODEL, dim=DIM)).model == MODEL


async def test_other_dim_is_refused(make_store: StoreFactory) -> None:
    first = make_store()
    await first.open(model=MODEL, dim=DIM)
    await first.close()
    with pytest.raises(ModelMismatchError, match="re-ingest"):
        await make_store().open(model=MODEL, dim=DIM * 2)


async def test_dim_is_checked_even_without_the_registry(
    make_store: StoreFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    first = make_store()
    await first.open(model=MODEL, dim=DIM)
    await first.close()
    if isinstance(first, EdgeStore):
        shutil.rmtree(first.registry_path)
    elif isinstance(first, PgVectorStore):
        async with await psycopg.AsyncConnection.connect(request.getfixturevalue("pg_url"), autocommit=True) as conn:
            await conn.execute(f"DELETE FROM {COLLECTIONS_TABLE} WHERE name = 'chunks'")
    else:
        assert isinstance(first, QdrantStore)
        client = (
            AsyncQdrantClient(url=QDRANT_URL, check_compatibility=False)
            if not first.is_local
            else AsyncQdrantClient(path=str(tmp_path / "qdrant-local"))
        )
        await client.delete_collection(first._registry)
        await client.close()
    with pytest.raises(ModelMismatchError):
        await make_store().open(model=MODEL, dim=DIM * 2)


async def test_collections_are_independent(make_store: StoreFactory) -> None:
    # (local mode allows one client per folder, so each collection gets its own)
    a, b = make_store("alpha", "a"), make_store("beta", "b")
    await a.open(model=MODEL, dim=DIM)
    await b.open(model="another-model", dim=8)
    await a.upsert_chunks([chunk("t", "d", 0, np.ones(DIM))])
    assert (await a.count(), await b.count()) == (1, 0)


# --- chunks -------------------------------------------------------------------------------------------------


async def test_upsert_and_count(store: VectorStore) -> None:
    rng = np.random.default_rng(2)
    points = [chunk("t1", f"d{i % 3}", i, v) for i, v in enumerate(unit_vectors(rng, 10))]
    await store.upsert_chunks(points)
    await store.upsert_chunks([])
    assert await store.count() == 10
    assert await store.count(Filter(must=(Match(DOC, "d0"),))) == 4


async def test_upsert_same_id_overwrites(store: VectorStore) -> None:
    rng = np.random.default_rng(3)
    v1, v2 = unit_vectors(rng, 2)
    await store.upsert_chunks([chunk("t1", "d1", 0, v1, version=1)])
    await store.upsert_chunks([chunk("t1", "d1", 0, v2, version=2)])
    assert await store.count() == 1
    (hit,) = await store.scroll()
    assert hit.payload[VERSION] == 2
    stored = (await store.get_vectors([hit.id]))[hit.id]
    np.testing.assert_allclose(stored, v2, atol=1e-5)


async def test_delete_all_chunks_of_a_document(store: VectorStore) -> None:
    vec = np.ones(DIM)
    await store.upsert_chunks(
        [chunk("t1", "d1", i, vec) for i in range(3)]
        + [chunk("t1", "d2", 0, vec), chunk("t2", "d1", 0, vec)]  # another doc, and the same doc id elsewhere
    )
    await store.delete_chunks("t1", "d1")
    remaining = {(h.payload[TENANT], h.payload[DOC]) for h in await store.scroll()}
    assert remaining == {("t1", "d2"), ("t2", "d1")}
    await store.delete_chunks("t1", "missing")  # deleting nothing is fine
    assert await store.count() == 2


async def test_delete_chunks_below_version(store: VectorStore) -> None:
    vec = np.ones(DIM)
    await store.upsert_chunks(
        [chunk("t1", "d1", i, vec, version=1) for i in range(4)]
        + [chunk("t1", "d1", i, vec, version=2) for i in range(2)]  # v2 rewrote chunks 0-1; 2-3 are stale
        + [chunk("t2", "d1", 0, vec, version=1)]
    )
    await store.delete_chunks("t1", "d1", below_version=2)
    left = sorted((h.payload[TENANT], h.payload[CHUNK_INDEX], h.payload[VERSION]) for h in await store.scroll())
    assert left == [("t1", 0, 2), ("t1", 1, 2), ("t2", 0, 1)]


async def test_get_vectors_returns_normalized_vectors(store: VectorStore) -> None:
    rng = np.random.default_rng(4)
    raw = rng.normal(size=(6, DIM)) * 3.0  # not normalized on the way in
    points = [chunk("t1", "d1", i, v) for i, v in enumerate(raw)]
    await store.upsert_chunks(points)
    got = await store.get_vectors([p.id for p in points[:4]] + [chunk_point_id("t1", "nope", 0)])
    assert set(got) == {p.id for p in points[:4]}
    for p, v in zip(points[:4], raw[:4], strict=True):
        np.testing.assert_allclose(got[p.id], v / np.linalg.norm(v), atol=1e-5)
    assert await store.get_vectors([]) == {}


async def test_scroll_returns_payloads(store: VectorStore) -> None:
    point = chunk(
        "t1", "d1", 0, np.ones(DIM), public=True, users=("u1",), groups=("g1", "g2"), meta={"year": 2020, "lang": "en"}
    )
    await store.upsert_chunks([point])
    (hit,) = await store.scroll()
    assert hit.id == point.id and hit.score == 0.0 and hit.vector is None
    assert hit.payload == point.payload


async def test_scroll_pages_and_limits(store: VectorStore) -> None:
    rng = np.random.default_rng(5)
    points = [chunk("t1", "d1", i, v) for i, v in enumerate(unit_vectors(rng, 25))]
    await store.upsert_chunks(points)
    assert len(await store.scroll(limit=7)) == 7
    assert {h.id for h in await store.scroll()} == {p.id for p in points}


async def test_write_batch_writes_chunks_removes_leftovers_and_records_states(store: VectorStore) -> None:
    rng = np.random.default_rng(12)
    await store.upsert_chunks([chunk("t1", "d1", i, v, version=1) for i, v in enumerate(unit_vectors(rng, 4))])
    await store.upsert_chunks([chunk("t1", "gone", 0, np.ones(DIM))])
    new = [chunk("t1", "d1", i, v, version=2) for i, v in enumerate(unit_vectors(rng, 2))]
    states = [DocState("t1", "d1", 2, chunk_count=2, chunk_hashes=("a", "b")), DocState("t1", "gone", 3, deleted=True)]
    await store.write_batch(points=new, leftovers=[("t1", "d1", 2)], deletes=[("t1", "gone")], states=states)
    left = sorted((h.payload[DOC], h.payload[CHUNK_INDEX], h.payload[VERSION]) for h in await store.scroll())
    assert left == [("d1", 0, 2), ("d1", 1, 2)]
    assert await store.get_doc_states([("t1", "d1"), ("t1", "gone")]) == {(s.tenant_id, s.doc_id): s for s in states}
    await store.write_batch()  # nothing to write is fine


# --- registry -----------------------------------------------------------------------------------------------


async def test_doc_states_roundtrip(store: VectorStore) -> None:
    # where the event sits in the log is kept with the state: a replayed tombstone is recognised by it
    live = DocState("t1", "d1", version=3, chunk_count=2, chunk_hashes=("h0", "h1"), source=("docs", 2, 41, 1700))
    tombstone = DocState("t1", "d2", version=5, deleted=True, source=("docs", 0, 7, -1))
    other_tenant = DocState("t2", "d1", version=1, chunk_count=1, chunk_hashes=("x",))
    await store.put_doc_states([live, tombstone, other_tenant])
    await store.put_doc_states([])

    got = await store.get_doc_states([("t1", "d1"), ("t1", "d2"), ("t2", "d1"), ("t1", "missing")])
    assert got == {("t1", "d1"): live, ("t1", "d2"): tombstone, ("t2", "d1"): other_tenant}
    assert got[("t1", "d2")].deleted is True
    assert await store.get_doc_states([]) == {}

    newer = DocState("t1", "d1", version=4, chunk_count=1, chunk_hashes=("h9",))
    await store.put_doc_states([newer])
    assert await store.get_doc_states([("t1", "d1"), ("t1", "d1")]) == {("t1", "d1"): newer}
    assert await store.count() == 0  # the registry is not part of the chunk collection


# --- search -------------------------------------------------------------------------------------------------


async def test_search_ranks_like_brute_force(store: VectorStore) -> None:
    rng = np.random.default_rng(6)
    points = [chunk(f"t{i % 2}", f"d{i // 10}", i, v) for i, v in enumerate(unit_vectors(rng, 300))]
    await store.upsert_chunks(points)
    await store.build_index()

    recalls = []
    for query in unit_vectors(rng, 8):
        expected = brute_force(points, query, 10)
        exact = await store.search(query, flt=None, limit=10, exact=True)
        assert [h.id for h in exact] == [i for i, _ in expected]
        np.testing.assert_allclose([h.score for h in exact], [s for _, s in expected], atol=1e-4)

        approx = await store.search(query, flt=None, limit=10, hnsw_ef=128)
        recalls.append(len({h.id for h in approx} & {i for i, _ in expected}) / 10)
        scores = [h.score for h in approx]
        assert scores == sorted(scores, reverse=True)
    assert np.mean(recalls) >= 0.9


async def test_search_returns_payload_and_optionally_vectors(store: VectorStore) -> None:
    rng = np.random.default_rng(7)
    points = [chunk("t1", "d1", i, v, meta={"year": 2000 + i}) for i, v in enumerate(unit_vectors(rng, 5))]
    await store.upsert_chunks(points)
    target = np.array(points[3].vector)
    (hit,) = await store.search(target, flt=None, limit=1, exact=True, with_vectors=True)
    assert hit.id == points[3].id and hit.payload == points[3].payload
    assert hit.score == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(hit.vector, target, atol=1e-5)
    (hit,) = await store.search(target, flt=None, limit=1, exact=True)
    assert hit.vector is None


async def test_build_index_on_an_empty_store(store: VectorStore) -> None:
    await store.build_index()
    assert await store.search(np.ones(DIM), flt=None, limit=5) == []


async def test_edge_build_index_builds_hnsw(tmp_path: Path) -> None:
    store = build_store("edge", tmp_path)
    assert isinstance(store, EdgeStore)
    await store.open(model=MODEL, dim=DIM)
    try:
        rng = np.random.default_rng(8)
        await store.upsert_chunks([chunk("t", "d", i, v) for i, v in enumerate(unit_vectors(rng, 300))])
        assert (await store.open(model=MODEL, dim=DIM)).extra["indexed_vectors"] == 0
        await store.build_index()
        assert (await store.open(model=MODEL, dim=DIM)).extra["indexed_vectors"] == 300
    finally:
        await store.close()


async def test_edge_segment_cap_bounds_what_an_index_build_merges(tmp_path: Path) -> None:
    """Without a cap every build merges the new points into one ever larger segment (and rebuilds its graph);
    with one, full segments are left alone and new ones start, and search still sees every point."""
    rng = np.random.default_rng(9)
    batches = [unit_vectors(rng, 300) for _ in range(4)]
    segments: dict[int | None, list[int]] = {}
    for cap in (None, 20):  # 20 KB holds 320 vectors of 16 float32 dimensions
        store = EdgeStore(tmp_path / f"cap-{cap}", "chunks", hnsw=HNSW, layout=VectorLayout(max_segment_size_kb=cap))
        await store.open(model=MODEL, dim=DIM)
        try:
            counts = []
            for b, vectors in enumerate(batches):
                await store.upsert_chunks([chunk("t", f"d{b}-{i}", 0, v) for i, v in enumerate(vectors)])
                await store.build_index()
                info = await store.open(model=MODEL, dim=DIM)
                assert info.extra["indexed_vectors"] == info.chunk_count == 300 * (b + 1)
                counts.append(info.extra["segments"])
            segments[cap] = counts
            for b, vectors in enumerate(batches):  # every batch is still found, each point as its own best hit
                hits = await store.search(vectors[7], flt=None, limit=1)
                assert hits[0].payload[DOC] == f"d{b}-7"
        finally:
            await store.close()
    assert max(segments[None]) <= 2, segments
    assert segments[20][-1] >= 4 and segments[20] == sorted(segments[20]), segments


# --- filters ------------------------------------------------------------------------------------------------


def filter_dataset() -> list[ChunkPoint]:
    rng = np.random.default_rng(9)
    vectors = unit_vectors(rng, 48)
    points = []
    for i, v in enumerate(vectors):
        meta: dict[str, Any] = {"lang": "de" if i % 4 == 0 else "en"}
        if i % 5 != 0:  # some documents carry no year at all
            meta["year"] = 2016 + i % 8
        points.append(
            chunk(
                tenant=f"t{i % 3}",
                doc=f"d{i % 7}",
                index=i,
                vector=v,
                version=1 + i % 3,
                public=i % 6 == 0,
                users=tuple(f"u{j}" for j in range(i % 4)),
                groups=("eng",) if i % 2 else ("eng", "ops") if i % 3 == 0 else ("sales",),
                meta=meta,
            )
        )
    return points


FILTERS: dict[str, Filter] = {
    "match-keyword": Filter(must=(Match(TENANT, "t1"),)),
    "match-in-list": Filter(must=(Match(ACL_GROUPS, "ops"),)),
    "match-bool-true": Filter(must=(Match(ACL_PUBLIC, True),)),
    "match-bool-false": Filter(must=(Match(ACL_PUBLIC, False),)),
    "match-int": Filter(must=(Match(VERSION, 2),)),
    "match-nested-meta": Filter(must=(Match("meta.lang", "de"),)),
    "match-any-keyword-list": Filter(must=(MatchAny(ACL_USERS, ("u2", "u9")),)),
    "match-any-int": Filter(must=(MatchAny(VERSION, (1, 3)),)),
    "range-version": Filter(must=(Range(VERSION, gte=2),)),
    "range-meta-year": Filter(must=(Range("meta.year", gt=2018, lte=2021),)),
    "range-open-below": Filter(must=(Range("meta.year", lt=2019),)),
    "should": Filter(should=(Match(ACL_PUBLIC, True), Match(ACL_GROUPS, "ops"), Match(ACL_USERS, "u2"))),
    "must-not": Filter(must=(Match(TENANT, "t0"),), must_not=(Match(ACL_GROUPS, "sales"),)),
    "must-not-only": Filter(must_not=(Range(VERSION, lt=3),)),
    "nested": Filter(
        must=(Match(TENANT, "t2"),),
        should=(
            Match(ACL_PUBLIC, True),
            Filter(must=(Match(ACL_USERS, "u1"), Range("meta.year", gte=2020)), must_not=(Match(DOC, "d3"),)),
        ),
    ),
    "acl-like": Filter(
        must=(Match(TENANT, "t1"), Filter(should=(Match(ACL_PUBLIC, True), MatchAny(ACL_USERS, ("u2", "u7"))))),
        must_not=(Match(DOC, "d0"),),
    ),
}


@pytest.mark.parametrize("name", FILTERS)
async def test_filters(store: VectorStore, name: str) -> None:
    points = filter_dataset()
    await store.upsert_chunks(points)
    flt = FILTERS[name]
    expected = {p.id for p in points if reference_match(p.payload, flt)}
    assert 0 < len(expected) < len(points), "the case should select some points, not none or all"

    assert await store.count(flt) == len(expected)
    assert {h.id for h in await store.scroll(flt)} == expected
    hits = await store.search(np.ones(DIM), flt=flt, limit=len(points), exact=True)
    assert {h.id for h in hits} == expected
    assert {h.id for h in await store.search(np.ones(DIM), flt=flt, limit=len(points))} == expected


async def test_filter_values_spelled_out(store: VectorStore) -> None:
    """A few answers written by hand, so the reference evaluator is not the only judge."""
    vec = np.ones(DIM)
    await store.upsert_chunks(
        [
            chunk("t1", "a", 0, vec, groups=("eng",), meta={"year": 2019}),
            chunk("t1", "b", 0, vec, public=True, meta={"year": 2021}),
            chunk("t1", "c", 0, vec, version=7, groups=("ops", "eng")),
        ]
    )

    async def docs(flt: Filter) -> set[str]:
        return {h.payload[DOC] for h in await store.scroll(flt)}

    assert await docs(Filter(must=(Range("meta.year", gte=2020),))) == {"b"}
    assert await docs(Filter(must=(Match(ACL_GROUPS, "eng"),))) == {"a", "c"}
    assert await docs(Filter(must=(Match(ACL_PUBLIC, True),))) == {"b"}
    assert await docs(Filter(must_not=(Match(ACL_PUBLIC, True),))) == {"a", "c"}
    assert await docs(Filter(must=(Range(VERSION, gt=1),))) == {"c"}
    assert await docs(Filter(must=(Match(VERSION, 1),))) == {"a", "b"}
    assert await docs(Filter()) == {"a", "b", "c"}
    # a dotted key names a path into the nested "meta" object, never a literal top-level "meta.year" key
    flat = ChunkPoint(chunk_point_id("t1", "flat", 0), list(vec), {TENANT: "t1", DOC: "flat", "meta.year": 2019})
    await store.upsert_chunks([flat])
    assert await docs(Filter(must=(Match("meta.year", 2019),))) == {"a"}


async def test_tenant_isolation(store: VectorStore) -> None:
    rng = np.random.default_rng(10)
    vectors = unit_vectors(rng, 20)
    # the same vectors for both tenants: only the filter can keep them apart
    await store.upsert_chunks([chunk(t, "d", i, v, public=True) for t in ("a", "b") for i, v in enumerate(vectors)])
    for tenant in ("a", "b"):
        flt = Filter(must=(Match(TENANT, tenant),))
        for query in vectors[:5]:
            for exact in (True, False):
                hits = await store.search(query, flt=flt, limit=100, exact=exact)
                assert len(hits) == 20 and {h.payload[TENANT] for h in hits} == {tenant}
        assert await store.count(flt) == 20
    assert await store.search(vectors[0], flt=Filter(must=(Match(TENANT, "c"),)), limit=10) == []


# --- availability -------------------------------------------------------------------------------------------


async def test_closed_store_is_unavailable(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(StoreUnavailableError):
        await store.count()
    await store.open(model=MODEL, dim=DIM)
    await store.close()
    await store.close()  # closing twice is harmless
    with pytest.raises(StoreUnavailableError):
        await store.count()
    with pytest.raises(StoreUnavailableError):
        await store.upsert_chunks([chunk("t", "d", 0, np.ones(DIM))])
    with pytest.raises(StoreUnavailableError):
        await store.put_doc_states([DocState("t", "d", 1)])


async def test_folder_held_by_another_store_is_unavailable(make_store: StoreFactory, backend: str) -> None:
    if backend in SERVER_BACKENDS:
        pytest.skip("a server is shared by design: no folder to hold")
    if backend == "pgvector":
        pytest.skip("a PostgreSQL server is shared by design: see test_pgvector_store.py, several stores at once")
    holder = make_store()
    await holder.open(model=MODEL, dim=DIM)
    with pytest.raises(StoreUnavailableError):
        await make_store().open(model=MODEL, dim=DIM)
    await holder.close()
    assert (await make_store().open(model=MODEL, dim=DIM)).model == MODEL


REPO_ROOT = Path(__file__).resolve().parents[2]
_KILLED_WRITER = """
import asyncio, sys
from pipeline.store.base import ChunkPoint, DocState, chunk_point_id
from pipeline.store.edge import EdgeStore

async def main():
    store = EdgeStore(sys.argv[1], "chunks")
    await store.open(model=sys.argv[2], dim=int(sys.argv[3]))
    batch = 0
    while True:
        doc = f"d{batch}"
        vectors = [[1.0 + (batch + i) % 5] + [0.5] * (int(sys.argv[3]) - 1) for i in range(20)]
        payload = {"tenant_id": "t", "doc_id": doc}
        await store.upsert_chunks([ChunkPoint(chunk_point_id("t", doc, i), v, payload) for i, v in enumerate(vectors)])
        await store.put_doc_states([DocState("t", doc, 1, chunk_count=20)])
        print(batch, flush=True)  # acknowledged: both writes returned
        batch += 1

asyncio.run(main())
"""


async def test_edge_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-stream loses nothing it had been told was written."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILLED_WRITER,
        str(tmp_path / "edge"),
        MODEL,
        str(DIM),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None
    acked = 0
    try:
        async with asyncio.timeout(60):
            while acked < 25:
                line = await proc.stdout.readline()
                assert line, "the writer died on its own"
                acked = int(line) + 1
    finally:
        proc.kill()  # SIGKILL: no close(), no flush, no atexit
        await proc.wait()

    store = build_store("edge", tmp_path)
    info = await store.open(model=MODEL, dim=DIM)
    try:
        assert info.chunk_count >= acked * 20
        states = await store.get_doc_states([("t", f"d{b}") for b in range(acked)])
        assert len(states) == acked
    finally:
        await store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("prefer_grpc", [False, True], ids=["rest", "grpc"])
async def test_unreachable_server_is_unavailable(prefer_grpc: bool) -> None:
    port = free_port()
    # both ports free: gRPC goes to grpc_port, not the url's port (a server on the default 6334 would answer)
    store = QdrantStore(
        "chunks", url=f"http://127.0.0.1:{port}", prefer_grpc=prefer_grpc, grpc_port=free_port(), timeout_seconds=2
    )
    with pytest.raises(StoreUnavailableError):
        await store.open(model=MODEL, dim=DIM)
    await store.close()


async def test_unreachable_postgres_is_unavailable() -> None:
    store = PgVectorStore(f"postgresql://vectorstream@127.0.0.1:{free_port()}/vectorstream", timeout_seconds=2)
    with pytest.raises(StoreUnavailableError):
        await store.open(model=MODEL, dim=DIM)
    with pytest.raises(StoreUnavailableError):
        await store.count()
    await store.close()


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    from pipeline.settings import StoreSettings

    assert isinstance(open_store(StoreSettings(path=tmp_path)), EdgeStore)
    local = StoreSettings(backend="qdrant", local_path=tmp_path)
    assert isinstance(open_store(local), QdrantStore)
    assert isinstance(open_store(StoreSettings(backend="qdrant", url="http://qdrant:6333")), QdrantStore)
    with pytest.raises(ConfigurationError, match="VECTORSTREAM_STORE__URL"):
        open_store(StoreSettings(backend="qdrant"))  # neither a server nor a folder: refuse, never go in-memory
    pg = StoreSettings(backend="pgvector", postgres_url="postgresql://app:secret@db:5432/vs")  # type: ignore[arg-type]
    assert isinstance(open_store(pg), PgVectorStore)
    assert "secret" not in repr(pg)
    with pytest.raises(ConfigurationError, match="VECTORSTREAM_STORE__POSTGRES_URL"):
        open_store(StoreSettings(backend="pgvector"))
    with pytest.raises(ConfigurationError, match="VECTORSTREAM_STORE__COLLECTION"):
        open_store(StoreSettings(backend="pgvector", postgres_url=pg.postgres_url, collection="x'; DROP TABLE y"))


# --- congruence ---------------------------------------------------------------------------------------------


async def test_adapters_agree_on_a_random_history(tmp_path: Path, pg_url: str) -> None:
    """One random sequence of writes applied to every adapter; every read must then give the same answer."""
    rng = np.random.default_rng(11)
    stores = [build_store(b, tmp_path, pg_url=pg_url) for b in ("edge", "qdrant-local", "edge-int8", "pgvector")]
    for s in stores:
        await s.open(model=MODEL, dim=DIM)
    try:
        versions: dict[tuple[str, str], int] = {}
        for _ in range(40):
            op = rng.choice(["upsert", "upsert", "upsert", "delete", "delete_old"])
            tenant, doc = f"t{rng.integers(3)}", f"d{rng.integers(8)}"
            if op == "upsert":
                version = versions.get((tenant, doc), 0) + 1
                versions[(tenant, doc)] = version
                n = int(rng.integers(1, 12))
                points = [
                    chunk(
                        tenant,
                        doc,
                        i,
                        v,
                        version=version,
                        public=bool(rng.random() < 0.3),
                        groups=tuple(str(g) for g in rng.choice(["eng", "ops", "sales"], size=rng.integers(0, 3))),
                        meta={"year": int(rng.integers(2015, 2025))},
                    )
                    for i, v in enumerate(unit_vectors(rng, n))
                ]
                state = DocState(tenant, doc, version, chunk_count=n, chunk_hashes=tuple(str(i) for i in range(n)))
                for s in stores:
                    await s.upsert_chunks(points)
                    await s.put_doc_states([state])
            elif op == "delete":
                tomb = DocState(tenant, doc, versions.get((tenant, doc), 0) + 1, deleted=True)
                versions[(tenant, doc)] = tomb.version
                for s in stores:
                    await s.delete_chunks(tenant, doc)
                    await s.put_doc_states([tomb])
            else:
                for s in stores:
                    await s.delete_chunks(tenant, doc, below_version=versions.get((tenant, doc), 0))
        for s in stores:
            await s.build_index()

        edge, local, quantized, pg = stores
        assert await edge.count() == await local.count() == await quantized.count() == await pg.count() > 0
        keys = [(f"t{t}", f"d{d}") for t in range(3) for d in range(8)]
        states = await edge.get_doc_states(keys)
        assert states == await local.get_doc_states(keys) == await quantized.get_doc_states(keys)
        assert states == await pg.get_doc_states(keys)
        edge_scroll = {h.id: h.payload for h in await edge.scroll()}
        assert edge_scroll == {h.id: h.payload for h in await local.scroll()}
        assert edge_scroll == {h.id: h.payload for h in await quantized.scroll()}
        assert edge_scroll == {h.id: h.payload for h in await pg.scroll()}

        filters: list[Filter | None] = [
            None,
            Filter(must=(Match(TENANT, "t1"),)),
            Filter(must=(Match(TENANT, "t0"),), should=(Match(ACL_PUBLIC, True), Match(ACL_GROUPS, "ops"))),
            Filter(must=(Range("meta.year", gte=2018, lt=2022),), must_not=(Match(ACL_GROUPS, "sales"),)),
        ]
        for query in unit_vectors(rng, 6):
            for flt in filters:
                a = await edge.search(query, flt=flt, limit=15, exact=True)
                b = await local.search(query, flt=flt, limit=15, exact=True)
                assert [h.id for h in a] == [h.id for h in b]
                np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-4)
                assert [h.payload for h in a] == [h.payload for h in b]
                assert await edge.count(flt) == await local.count(flt)
                # exact search on the quantized layout reads the original vectors: the same answer, same scores
                c = await quantized.search(query, flt=flt, limit=15, exact=True)
                assert [h.id for h in c] == [h.id for h in a]
                np.testing.assert_allclose([h.score for h in c], [h.score for h in a], atol=1e-4)
                d = await pg.search(query, flt=flt, limit=15, exact=True)
                assert [h.id for h in d] == [h.id for h in a]
                np.testing.assert_allclose([h.score for h in d], [h.score for h in a], atol=1e-4)
                assert [h.payload for h in d] == [h.payload for h in a]
                assert await pg.count(flt) == await edge.count(flt)
                # and the HNSW path with pgvector's iterative scan finds the same top hits
                approx = await pg.search(query, flt=flt, limit=15, hnsw_ef=128)
                assert len({h.id for h in approx} & {h.id for h in a}) >= 0.9 * len(a)
    finally:
        for s in stores:
            await s.close()
