"""The hybrid-search contract: sparse and hybrid (RRF, DBSF) scenarios against both Qdrant adapters (Edge and
qdrant-client local mode; a Qdrant server over REST and gRPC when VECTORSTREAM_TEST_QDRANT_URL is set), with the
same answers on each; dense-only collections and pgvector refuse sparse and hybrid with ModeUnsupportedError.

The BM25 vectors are the worker's own (pipeline.sparse); IDF is computed by the engine, checked here against
the formula written out independently.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient

from pipeline.errors import ModeUnsupportedError, TokenizerMismatchError
from pipeline.sparse import SparseEncoder, TokenizerConfig
from pipeline.store.base import (
    ACL_GROUPS,
    ACL_PUBLIC,
    ACL_USERS,
    CHUNK_INDEX,
    DOC,
    TENANT,
    TEXT,
    VERSION,
    ChunkPoint,
    Filter,
    HybridParams,
    Match,
    MatchAny,
    VectorStore,
    chunk_point_id,
)
from tests.contract.test_store_contract import QDRANT_URL, SERVER_BACKENDS, build_store

#: the adapters that have sparse vectors; every scenario runs on each
HYBRID_BACKENDS = ("edge", "edge-int8", "qdrant-local", *SERVER_BACKENDS)
#: the adapters whose rankings are compared (exact dense scores: no int8 copies)
RANKED_BACKENDS = ("edge", "qdrant-local", *(SERVER_BACKENDS if QDRANT_URL else ()))
MODEL = "contract-model"
DIM = 16
ENCODER = SparseEncoder(TokenizerConfig())
RECORD = ENCODER.record()
RARE = "ZX-90210-QUOKKA"
WORDS = "kafka topic partition offset consumer producer broker vector search index shard replica segment".split()

StoreFactory = Callable[..., VectorStore]


def _server_skip(b: str) -> Any:
    return pytest.mark.skipif(
        b in SERVER_BACKENDS and not QDRANT_URL, reason="needs a Qdrant server: set VECTORSTREAM_TEST_QDRANT_URL"
    )


@pytest.fixture(params=[pytest.param(b, marks=_server_skip(b)) for b in HYBRID_BACKENDS])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_store(backend: str, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    made: list[VectorStore] = []

    def make(collection: str = "chunks", kind: str | None = None) -> VectorStore:
        store = build_store(kind or backend, tmp_path, collection)
        made.append(store)
        return store

    yield make
    await _close_all(made)


async def _close_all(made: list[VectorStore]) -> None:
    for store in reversed(made):
        await store.close()
    names = {n for s in made if s.__class__.__name__ == "QdrantStore" and not s.is_local for n in _names(s)}  # type: ignore[attr-defined]
    if names:
        client = AsyncQdrantClient(url=QDRANT_URL, check_compatibility=False)
        try:
            for name in names:
                await client.delete_collection(name)
        finally:
            await client.close()


def _names(store: Any) -> tuple[str, str]:
    return (store._collection, store._registry)


# --- the corpus -----------------------------------------------------------------------------------------------


def corpus(rng: np.random.Generator, tenants: tuple[str, ...] = ("t1", "t2")) -> list[ChunkPoint]:
    """20 documents a tenant of common words and random vectors; in t1, doc ``rare`` alone names RARE.

    Each document of a tenant has another length, so no two have the same BM25 score for a query: the order
    of tied candidates is the engine's own, and a tie in one branch would make RRF's ranks arbitrary."""
    points = []
    for tenant in tenants:
        for i in range(20):
            words = " ".join(rng.choice(WORDS, size=6 + i))
            doc = "rare" if (tenant == "t1" and i == 7) else f"d{i}"
            text = f"{words} {RARE} {words}" if doc == "rare" else words
            points.append(point(tenant, doc, rng, text, public=i % 4 != 0, users=("alice",) if i % 4 == 0 else ()))
    return points


def point(
    tenant: str,
    doc: str,
    rng: np.random.Generator,
    text: str,
    *,
    public: bool = True,
    users: tuple[str, ...] = (),
    vector: np.ndarray | None = None,
) -> ChunkPoint:
    if vector is None:
        vector = rng.normal(size=DIM)
    payload = {
        TENANT: tenant,
        DOC: doc,
        VERSION: 1,
        CHUNK_INDEX: 0,
        TEXT: text,
        ACL_PUBLIC: public,
        ACL_USERS: list(users),
        ACL_GROUPS: [],
    }
    return ChunkPoint(
        chunk_point_id(tenant, doc, 0), [float(x) for x in vector], payload, ENCODER.encode_document(text)
    )


def readable_by(tenant: str, user: str) -> Filter:
    """The shape of the server's tenant + access filter (pipeline.query_filter.search_filter)."""
    access = Filter(should=(Match(ACL_PUBLIC, True), MatchAny(ACL_USERS, (user,))))
    return Filter(must=(Match(TENANT, tenant), access))


def far_from(points: list[ChunkPoint], doc: str) -> list[float]:
    """A query vector as far as can be from ``doc``'s chunk: dense search ranks it last."""
    target = next(np.array(p.vector) for p in points if p.payload[DOC] == doc)
    return (-target / np.linalg.norm(target)).tolist()


async def filled(make_store: StoreFactory, points: list[ChunkPoint], **kw: Any) -> VectorStore:
    store = make_store(**kw)
    await store.open(model=MODEL, dim=DIM, sparse=RECORD)
    await store.upsert_chunks(points)
    await store.build_index()
    return store


def docs(hits: list[Any]) -> list[str]:
    return [h.payload[DOC] for h in hits]


# --- scenarios ------------------------------------------------------------------------------------------------


async def test_rare_identifier_is_found_by_sparse_and_hybrid_and_missed_by_dense(make_store: StoreFactory) -> None:
    rng = np.random.default_rng(1)
    points = corpus(rng, tenants=("t1",))
    store = await filled(make_store, points)
    assert store.sparse_record == RECORD
    flt = readable_by("t1", "alice")
    # the question names the identifier and a common word: dense search (this query vector) ranks the rare
    # chunk 15th of 20, as an embedding that blurs identifiers would; BM25 ranks it first (its identifier's terms are
    # in no other chunk: a high IDF), and both fusions lift it into the top 5
    vector = np.random.default_rng(105).normal(size=DIM).tolist()
    terms = ENCODER.encode_query(f"which broker logs {RARE}?")
    dense = await store.query(mode="dense", vector=vector, sparse=None, flt=flt, limit=5)
    sparse = await store.query(mode="sparse", vector=None, sparse=terms, flt=flt, limit=5)
    assert len(dense) == 5 and "rare" not in docs(dense)
    ranked_dense = docs(await store.query(mode="dense", vector=vector, sparse=None, flt=flt, limit=20))
    assert ranked_dense.index("rare") >= 8
    assert docs(sparse)[0] == "rare" and len(sparse) == 5
    for fusion in ("rrf", "dbsf"):
        hybrid = await store.query(
            mode="hybrid", vector=vector, sparse=terms, flt=flt, limit=5, hybrid=HybridParams(fusion=fusion)
        )
        assert "rare" in docs(hybrid), (fusion, docs(hybrid))
        assert len(hybrid) == 5  # the dense candidates fill the rest


async def test_sparse_scores_are_bm25_with_the_engines_idf(make_store: StoreFactory) -> None:
    rng = np.random.default_rng(2)
    points = corpus(rng, tenants=("t1",))
    store = await filled(make_store, points)
    query = "kafka broker replica"
    terms = ENCODER.encode_query(query)
    hits = await store.query(mode="sparse", vector=None, sparse=terms, flt=Filter(), limit=50)
    # the reference: idf = ln(1 + (N - n + 0.5) / (n + 0.5)) over the collection's points, times the weights
    n_points = len(points)
    df = {i: sum(i in p.sparse.indices for p in points if p.sparse) for i in terms.indices}
    expected = {}
    for p in points:
        assert p.sparse is not None
        weights = dict(zip(p.sparse.indices, p.sparse.values, strict=True))
        score = sum(
            math.log(1 + (n_points - df[i] + 0.5) / (df[i] + 0.5)) * q * weights[i]
            for i, q in zip(terms.indices, terms.values, strict=True)
            if i in weights
        )
        if score > 0:
            expected[p.payload[DOC]] = score
    assert {h.payload[DOC] for h in hits} == set(expected)
    for h in hits:
        assert h.score == pytest.approx(expected[h.payload[DOC]], rel=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


async def test_sparse_and_hybrid_never_cross_tenant_or_access(make_store: StoreFactory) -> None:
    rng = np.random.default_rng(3)
    points = corpus(rng)
    store = await filled(make_store, points)
    terms = ENCODER.encode_query(f"{RARE} kafka topic")
    vector = far_from(points, "rare")
    for tenant, user in (("t1", "bob"), ("t1", "alice"), ("t2", "alice"), ("t2", "bob")):
        flt = readable_by(tenant, user)
        allowed = {
            p.id
            for p in points
            if p.payload[TENANT] == tenant and (p.payload[ACL_PUBLIC] or user in p.payload[ACL_USERS])
        }
        for mode in ("sparse", "hybrid"):
            for fusion in ("rrf", "dbsf"):
                hits = await store.query(
                    mode=mode,  # type: ignore[arg-type]
                    vector=vector,
                    sparse=terms,
                    flt=flt,
                    limit=40,
                    hybrid=HybridParams(fusion=fusion),  # type: ignore[arg-type]
                )
                assert hits, (tenant, user, mode)
                assert {h.id for h in hits} <= allowed, (tenant, user, mode, fusion)
                if mode == "hybrid":  # every readable chunk is a dense candidate: all of them come back
                    assert {h.id for h in hits} == allowed
        # the rare document is t1's and public: t2 never sees it, whoever asks
        rare_visible = tenant == "t1"
        sparse = await store.query(mode="sparse", vector=None, sparse=ENCODER.encode_query(RARE), flt=flt, limit=5)
        assert docs(sparse) == (["rare"] if rare_visible else [])


async def test_tokenizer_mismatch_refuses_and_the_record_survives_reopen(make_store: StoreFactory) -> None:
    rng = np.random.default_rng(4)
    points = corpus(rng, tenants=("t1",))
    store = await filled(make_store, points)
    await store.close()
    other = SparseEncoder(TokenizerConfig(k1=1.2)).record()
    with pytest.raises(TokenizerMismatchError, match="k1"):
        await make_store().open(model=MODEL, dim=DIM, sparse=other)
    # a process without sparse settings (sparse.enabled=false, a tool) opens it with the collection's own record
    reopened = make_store()
    await reopened.open(model=MODEL, dim=DIM, sparse=None)
    assert reopened.sparse_record == RECORD
    await reopened.close()
    again = make_store()
    await again.open(model=MODEL, dim=DIM, sparse=RECORD)
    hits = await again.query(mode="sparse", vector=None, sparse=ENCODER.encode_query(RARE), flt=Filter(), limit=3)
    assert docs(hits) == ["rare"]  # the sparse vectors were persisted
    # and the dense vector next to them (its direction: local mode gives a reloaded vector back unnormalized)
    stored = np.array((await again.get_vectors([points[0].id]))[points[0].id])
    want = np.array(points[0].vector)
    assert stored / np.linalg.norm(stored) == pytest.approx(want / np.linalg.norm(want), abs=1e-5)


async def test_dense_only_collection_serves_dense_and_refuses_sparse_and_hybrid(make_store: StoreFactory) -> None:
    """A collection made without sparse vectors (as every collection made before them) keeps its one unnamed
    vector: it serves dense queries when reopened by a process with sparse settings, and refuses the others."""
    rng = np.random.default_rng(5)
    points = [ChunkPoint(p.id, p.vector, p.payload) for p in corpus(rng, tenants=("t1",))]
    old = make_store()
    await old.open(model=MODEL, dim=DIM)  # sparse=None: what the code before sparse vectors did
    await old.upsert_chunks(points)
    await old.close()
    store = make_store()
    await store.open(model=MODEL, dim=DIM, sparse=RECORD)
    assert store.sparse_record is None
    flt = readable_by("t1", "alice")
    vector = np.array(points[3].vector)
    dense = await store.query(mode="dense", vector=vector.tolist(), sparse=None, flt=flt, limit=3)
    assert docs(dense)[0] == points[3].payload[DOC]
    for mode in ("sparse", "hybrid"):
        with pytest.raises(ModeUnsupportedError, match="dense"):
            await store.query(
                mode=mode,  # type: ignore[arg-type]
                vector=vector.tolist(),
                sparse=ENCODER.encode_query(RARE),
                flt=flt,
                limit=3,
            )
    # writes keep working: a chunk with a sparse vector is stored dense-only
    extra = point("t1", "new", rng, f"{RARE} later", vector=vector)
    await store.upsert_chunks([extra])
    assert await store.count(Filter(must=(Match(DOC, "new"),))) == 1


async def test_pgvector_serves_dense_only_and_refuses_sparse_and_hybrid(tmp_path: Path, pg_url: str) -> None:
    store = build_store("pgvector", tmp_path, "chunks", pg_url=pg_url)
    try:
        await store.open(model=MODEL, dim=DIM, sparse=RECORD)
        assert store.sparse_record is None
        rng = np.random.default_rng(6)
        points = corpus(rng, tenants=("t1",))
        await store.upsert_chunks(points)
        flt = readable_by("t1", "alice")
        dense = await store.query(mode="dense", vector=points[2].vector, sparse=None, flt=flt, limit=3)
        assert docs(dense)[0] == points[2].payload[DOC]
        for mode in ("sparse", "hybrid"):
            with pytest.raises(ModeUnsupportedError, match="pgvector"):
                await store.query(
                    mode=mode,  # type: ignore[arg-type]
                    vector=points[2].vector,
                    sparse=ENCODER.encode_query(RARE),
                    flt=flt,
                    limit=3,
                )
    finally:
        await store.close()


async def test_adapters_rank_sparse_and_hybrid_the_same(tmp_path: Path) -> None:
    """The same points and queries on every ranked adapter: the same hits in the same order, the same scores."""
    rng = np.random.default_rng(7)
    points = corpus(rng)
    queries = [
        (f"{RARE} kafka", far_from(points, "rare")),
        ("broker replica segment", rng.normal(size=DIM).tolist()),
        ("offset consumer", rng.normal(size=DIM).tolist()),
    ]
    results: dict[str, list[list[tuple[str, float]]]] = {}
    made: list[VectorStore] = []
    try:
        for backend in RANKED_BACKENDS:
            store = build_store(backend, tmp_path, "ranked")
            made.append(store)
            await store.open(model=MODEL, dim=DIM, sparse=RECORD)
            await store.upsert_chunks(points)
            await store.build_index()
            rows = []
            for text, vector in queries:
                for tenant, user in (("t1", "bob"), ("t2", "alice")):
                    for mode, fusion in (("sparse", "rrf"), ("hybrid", "rrf"), ("hybrid", "dbsf")):
                        hits = await store.query(
                            mode=mode,  # type: ignore[arg-type]
                            vector=vector,
                            sparse=ENCODER.encode_query(text),
                            flt=readable_by(tenant, user),
                            limit=40,  # every candidate: no tie is cut at the limit
                            hybrid=HybridParams(fusion=fusion, prefetch_limit=20),  # type: ignore[arg-type]
                            exact=True,
                        )
                        rows.append([(h.id, h.score) for h in hits])
            results[backend] = rows
    finally:
        await _close_all(made)
    reference = [ranked(r) for r in results["edge"]]
    assert any(len(r) >= 5 for r in reference)
    for backend, rows in results.items():
        for got, want in zip(map(ranked, rows), reference, strict=True):
            assert [i for i, _ in got] == [i for i, _ in want], backend
            assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-4, abs=1e-6), backend


def ranked(hits: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Hits by score, equal scores (frequent under RRF) by id: the order two engines may disagree on is tied."""
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    groups: list[list[tuple[str, float]]] = []
    for hit in hits:
        if groups and abs(groups[-1][0][1] - hit[1]) <= 1e-5 * max(1.0, abs(hit[1])):
            groups[-1].append(hit)
        else:
            groups.append([hit])
    return [h for g in groups for h in sorted(g)]
