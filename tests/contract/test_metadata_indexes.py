"""store.metadata_indexes: every adapter creates a payload index per declared metadata field at start-up (seen
in the store itself: Edge's and the Qdrant server's payload schema, PostgreSQL's pg_indexes), the filters on
declared fields return the same hits as without an index, and a filter on an undeclared field still works.

The Qdrant server rows run when VECTORSTREAM_TEST_QDRANT_URL names one; qdrant-client's local mode keeps no
payload indexes at all, so there only the filters' results are checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from qdrant_client import AsyncQdrantClient

from pipeline.settings import StoreSettings
from pipeline.store.base import (
    META_PREFIX,
    TENANT,
    ChunkPoint,
    Filter,
    Match,
    MatchAny,
    Range,
    VectorStore,
    chunk_point_id,
)
from pipeline.store.edge import EdgeStore
from pipeline.store.pgvector import PgVectorStore
from pipeline.store.qdrant import QdrantStore
from tests.contract.test_store_contract import HNSW, QDRANT_URL, SERVER_HNSW, server_collection

DIM = 8
MODEL = "metadata-index-model"
DECLARED = "lang:keyword,year:integer,tags:keyword,score:float,draft:bool"
#: doc -> metadata; "region" is never declared
DOCS: dict[str, dict[str, object]] = {
    "d0": {"lang": "en", "year": 2021, "tags": ["howto", "account"], "score": 0.5, "draft": False, "region": "eu"},
    "d1": {"lang": "de", "year": 2023, "tags": ["account"], "score": 0.9, "draft": True, "region": "us"},
    "d2": {"lang": "en", "year": 2024, "tags": [], "score": 0.1, "region": "eu"},
    "d3": {"lang": "fr", "year": [2019, 2022], "tags": ["howto"], "draft": False},  # a list of years
    "d4": {"lang": ["en", "de"], "year": "unknown", "score": 2.5, "region": "apac"},  # a list, a string year
    "d5": {},
}
#: (filter on meta fields, the docs it selects), the same on every adapter, with or without indexes
CASES: list[tuple[Filter, set[str]]] = [
    (Filter(must=(Match("meta.lang", "en"),)), {"d0", "d2", "d4"}),
    (Filter(must=(MatchAny("meta.lang", ("de", "fr")),)), {"d1", "d3", "d4"}),
    (Filter(must=(Match("meta.tags", "account"),)), {"d0", "d1"}),
    (Filter(must=(Match("meta.year", 2023),)), {"d1"}),
    (Filter(must=(Match("meta.year", 2022),)), {"d3"}),  # an element of a list
    (Filter(must=(Range("meta.year", gte=2022),)), {"d1", "d2", "d3"}),
    (Filter(must=(Range("meta.year", gt=2019, lt=2024),)), {"d0", "d1", "d3"}),
    (Filter(must=(Range("meta.year", lt=2021),)), {"d3"}),
    (Filter(must=(Range("meta.score", gte=0.5, lte=1.0),)), {"d0", "d1"}),
    (Filter(must=(Match("meta.draft", True),)), {"d1"}),
    (Filter(must_not=(Match("meta.lang", "en"),)), {"d1", "d3", "d5"}),
    (Filter(must_not=(Range("meta.year", gte=2022),)), {"d0", "d4", "d5"}),
    (Filter(must=(Match("meta.lang", "en"), Range("meta.year", lte=2021))), {"d0"}),
    (Filter(should=(Match("meta.lang", "fr"), Match("meta.year", 2024))), {"d2", "d3"}),
    # undeclared: still filtered, by the payload itself
    (Filter(must=(Match("meta.region", "eu"),)), {"d0", "d2"}),
    (Filter(must=(Match("meta.region", "eu"), Match("meta.lang", "en"), Range("meta.year", gte=2022))), {"d2"}),
    (Filter(must_not=(Match("meta.region", "eu"),)), {"d1", "d3", "d4", "d5"}),
]

BACKENDS = ["edge", "qdrant-local", "pgvector", "qdrant-server"]


def _points() -> list[ChunkPoint]:
    rng = np.random.default_rng(3)
    points = []
    for tenant in ("t1", "t2"):
        for doc, meta in DOCS.items():
            v = rng.normal(size=DIM)
            points.append(
                ChunkPoint(
                    chunk_point_id(tenant, doc, 0),
                    (v / np.linalg.norm(v)).tolist(),
                    {TENANT: tenant, "doc_id": doc, "version": 1, "chunk_index": 0, META_PREFIX: meta},
                )
            )
    return points


def _make(backend: str, root: Path, pg_url: str | None, declared: str) -> VectorStore:
    indexes = StoreSettings(metadata_indexes=declared).metadata_index_map
    if backend == "edge":
        return EdgeStore(root / "edge", "chunks", hnsw=HNSW, metadata_indexes=indexes)
    if backend == "qdrant-local":
        return QdrantStore("chunks", path=root / "local", hnsw=HNSW, metadata_indexes=indexes)
    if backend == "qdrant-server":
        return QdrantStore(
            server_collection(root, "chunks"), url=QDRANT_URL, hnsw=SERVER_HNSW, metadata_indexes=indexes
        )
    assert pg_url is not None
    return PgVectorStore(pg_url, "chunks", hnsw=HNSW, metadata_indexes=indexes)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "qdrant-server" and not QDRANT_URL:
        pytest.skip("needs a Qdrant server: set VECTORSTREAM_TEST_QDRANT_URL")
    return str(request.param)


@pytest.fixture
def pg(backend: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("pg_url") if backend == "pgvector" else None


@pytest.fixture
async def opened(backend: str, tmp_path: Path, pg: str | None) -> AsyncIterator[VectorStore]:
    store = _make(backend, tmp_path, pg, DECLARED)
    await store.open(model=MODEL, dim=DIM)
    await store.upsert_chunks(_points())
    await store.build_index()
    yield store
    await store.close()
    if backend == "qdrant-server":
        client = AsyncQdrantClient(url=QDRANT_URL, check_compatibility=False)
        try:
            for name in (store._collection, store._registry):  # type: ignore[attr-defined]
                await client.delete_collection(name)
        finally:
            await client.close()


async def _indexes(backend: str, store: VectorStore, pg: str | None) -> dict[str, str]:
    """The metadata indexes the store itself reports: payload key (or index name) -> its type or method."""
    if backend == "edge":
        assert isinstance(store, EdgeStore)
        schema = store._chunk_shard().info().payload_schema  # noqa: SLF001 - the store's own report
        return {k: str(v.data_type).rsplit(".", 1)[-1].lower() for k, v in schema.items() if k.startswith("meta.")}
    if backend == "qdrant-server":
        client = AsyncQdrantClient(url=QDRANT_URL, check_compatibility=False)
        try:
            info = await client.get_collection(store._collection)  # type: ignore[attr-defined]
        finally:
            await client.close()
        schema = info.payload_schema or {}
        return {k: str(v.data_type.value) for k, v in schema.items() if k.startswith("meta.")}
    assert pg is not None
    async with await psycopg.AsyncConnection.connect(pg, autocommit=True) as conn:
        cur = await conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'chunks_meta_%'")
        indexes = {name: d for name, d in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'chunks' "
            "AND column_name LIKE 'meta_%'"
        )
        columns = dict(await cur.fetchall())
    # pg_indexes: the value column's B-tree and the partial index of the list rows, per declared key
    out = {}
    for name, definition in indexes.items():
        column = name.removeprefix("chunks_").removesuffix("_l")
        if name.endswith("_l"):
            assert f"WHERE {column}_list" in definition, definition
        else:
            assert f"btree ({column})" in definition, definition
            out[column.removeprefix("meta_")] = columns[column]
    assert {f"chunks_meta_{k}_l" for k in out} <= set(indexes), indexes
    return out


async def test_declared_metadata_fields_get_payload_indexes(backend: str, opened: VectorStore, pg: str | None) -> None:
    if backend == "qdrant-local":
        pytest.skip("qdrant-client local mode keeps no payload indexes (its filters are checked below)")
    found = await _indexes(backend, opened, pg)
    if backend == "pgvector":
        assert found == {
            "lang": "text",
            "year": "double precision",
            "tags": "text",
            "score": "double precision",
            "draft": "boolean",
        }
    else:
        assert found == {
            "meta.lang": "keyword",
            "meta.year": "integer",
            "meta.tags": "keyword",
            "meta.score": "float",
            "meta.draft": "bool",
        }


@pytest.mark.parametrize("case", range(len(CASES)))
async def test_filters_on_declared_and_undeclared_fields_return_the_right_hits(opened: VectorStore, case: int) -> None:
    meta, expected = CASES[case]
    flt = Filter(must=(Match(TENANT, "t1"), meta))
    assert {h.payload["doc_id"] for h in await opened.scroll(flt)} == expected
    for exact in (True, False):
        hits = await opened.search(np.ones(DIM) / np.sqrt(DIM), flt=flt, limit=10, exact=exact)
        assert {h.payload["doc_id"] for h in hits} == expected, exact
    assert await opened.count(flt) == len(expected)


async def test_reopening_keeps_the_indexes_and_a_changed_type_is_rebuilt(
    backend: str, tmp_path: Path, pg: str | None
) -> None:
    if backend == "qdrant-local":
        pytest.skip("qdrant-client local mode keeps no payload indexes")
    first = _make(backend, tmp_path, pg, "lang:keyword,year:integer")
    await first.open(model=MODEL, dim=DIM)
    await first.upsert_chunks(_points())
    before = await _indexes(backend, first, pg)
    await first.close()
    again = _make(backend, tmp_path, pg, "lang:keyword,year:integer")
    await again.open(model=MODEL, dim=DIM)
    assert await _indexes(backend, again, pg) == before
    await again.close()
    changed = _make(backend, tmp_path, pg, "lang:keyword,year:keyword")
    await changed.open(model=MODEL, dim=DIM)
    after = await _indexes(backend, changed, pg)
    if backend == "pgvector":
        assert after["year"] == "text", after
    else:
        assert after["meta.year"] == "keyword", after
    flt = Filter(must=(Match(TENANT, "t1"), Match("meta.lang", "en")))
    assert {h.payload["doc_id"] for h in await changed.scroll(flt)} == {"d0", "d2", "d4"}
    await changed.close()


async def test_pgvector_plans_a_selective_declared_filter_through_its_index(
    backend: str, opened: VectorStore, pg: str | None
) -> None:
    """The query planner uses the indexes as the application role, under the table's forced Row-Level
    Security (which allows index conditions with leakproof operators only): with sequential scans priced
    out, a declared field's compiled filter is a bitmap scan of its indexes."""
    if backend != "pgvector":
        pytest.skip("pgvector only")
    from pipeline.store.pgvector import compile_filter

    assert pg is not None and isinstance(opened, PgVectorStore)
    indexed = StoreSettings(metadata_indexes=DECLARED).metadata_index_map
    async with await psycopg.AsyncConnection.connect(pg, autocommit=True) as conn:
        await conn.execute("SET enable_seqscan = off")
        for flt, index in (
            (Filter(must=(Match("meta.lang", "fr"),)), "chunks_meta_lang"),
            (Filter(must=(MatchAny("meta.tags", ("howto", "x")),)), "chunks_meta_tags"),
            (Filter(must=(Range("meta.year", gte=2023),)), "chunks_meta_year"),
            (Filter(must=(Match("meta.year", 2023),)), "chunks_meta_year"),
        ):
            where = compile_filter(flt, indexed)  # the tenant comes from the policy alone here
            async with conn.transaction():
                await conn.execute("SELECT set_config('vectorstream.tenant', 't1', true)")
                cur = await conn.execute(
                    psycopg.sql.SQL("EXPLAIN SELECT id FROM chunks WHERE ") + where.sql, where.params
                )
                plan = "\n".join(r[0] for r in await cur.fetchall())
            assert f"Bitmap Index Scan on {index}\n" in plan + "\n" or f"on {index} " in plan, plan
            assert f"{index}_l" in plan, plan  # the list rows, through the partial index
            assert "Seq Scan" not in plan, plan
