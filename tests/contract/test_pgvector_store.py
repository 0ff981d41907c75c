"""What only the pgvector adapter promises beyond the shared contract: the tenant policy as a second wall,
filters that never put a caller's key or value into SQL text, one transaction per batch, shared use by several
stores at once, and riding out a database restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import psycopg
import pytest

from pipeline.errors import StoreUnavailableError
from pipeline.store.base import TENANT, DocState, Filter, Match, MatchAny, Range
from pipeline.store.pgvector import ALL_TENANTS_SETTING, TENANT_SETTING, PgVectorStore, compile_filter
from tests.contract.test_store_contract import DIM, HNSW, MODEL, chunk, unit_vectors
from tests.support.postgres import PostgresServer


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PgVectorStore]:
    s = PgVectorStore(pg_url, "chunks", hnsw=HNSW)
    await s.open(model=MODEL, dim=DIM)
    yield s
    await s.close()


async def _two_tenants(store: PgVectorStore) -> None:
    rng = np.random.default_rng(1)
    await store.upsert_chunks(
        [chunk(t, "d", i, v, public=True) for t in ("a", "b") for i, v in enumerate(unit_vectors(rng, 5))]
    )
    await store.put_doc_states([DocState(t, "d", 1, chunk_count=5) for t in ("a", "b")])


# --- row-level security -------------------------------------------------------------------------------------


async def test_rls_hides_other_tenants_from_a_query_without_the_tenant_condition(
    store: PgVectorStore, pg_url: str
) -> None:
    await _two_tenants(store)
    # the application role, as the adapter connects; autocommit, so each transaction() below is a real one
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        assert await cur.fetchone() == (False, False), "the test must run as a role the policy binds"

        async def rows(tenant: str | None, all_tenants: bool = False) -> list[tuple[str, str]]:
            async with conn.transaction():
                if tenant is not None:
                    await conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant))
                if all_tenants:
                    await conn.execute("SELECT set_config(%s, 'on', true)", (ALL_TENANTS_SETTING,))
                # a SELECT with no tenant predicate at all: what a filter-compilation bug would send
                chunks = await (await conn.execute("SELECT tenant_id, doc_id FROM chunks")).fetchall()
                registry = await (await conn.execute("SELECT tenant_id, doc_id FROM chunks__registry")).fetchall()
                return chunks + registry

        assert await rows(None) == []  # no scope declared: nothing at all
        assert {t for t, _ in await rows("a")} == {"a"} and len(await rows("a")) == 6
        assert {t for t, _ in await rows("b")} == {"b"}
        assert len(await rows(None, all_tenants=True)) == 12
        async with conn.transaction():  # a write under one tenant's scope reaches that tenant's rows only
            await conn.execute("SELECT set_config(%s, 'a', true)", (TENANT_SETTING,))
            deleted = await conn.execute("DELETE FROM chunks")
            assert deleted.rowcount == 5
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            async with conn.transaction():  # and cannot write another tenant's
                await conn.execute("SELECT set_config(%s, 'a', true)", (TENANT_SETTING,))
                await conn.execute("UPDATE chunks__registry SET tenant_id = 'a' WHERE tenant_id = 'a'")
                await conn.execute(
                    "INSERT INTO chunks__registry (tenant_id, doc_id, version) VALUES ('b', 'planted', 9)"
                )
        assert await store.count() == 5  # tenant a's chunks went, b's stayed


async def test_a_tenant_scoped_search_cannot_reach_another_tenant_even_if_the_sql_lost_the_condition(
    store: PgVectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate the bug the policy is for: the compiled WHERE drops every condition. The scope still comes
    from the filter's tenant, so the database returns that tenant's rows only."""
    await _two_tenants(store)
    import pipeline.store.pgvector as pg

    monkeypatch.setattr(pg, "compile_filter", lambda flt, indexed=None: pg._TRUE)
    flt = Filter(must=(Match(TENANT, "a"),))
    for exact in (True, False):
        hits = await store.search(np.ones(DIM), flt=flt, limit=100, exact=exact)
        assert len(hits) == 5 and {h.payload[TENANT] for h in hits} == {"a"}
    assert await store.count(flt) == 5
    assert {h.payload[TENANT] for h in await store.scroll(flt)} == {"a"}


# --- hostile filters ----------------------------------------------------------------------------------------

HOSTILE = [
    "x'); DROP TABLE chunks; --",
    'meta."; DELETE FROM chunks; --',
    "a' OR '1'='1",
    "$.** ? (@ == 1)",
    "meta.lang') OR true --",
]


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_hostile_filter_keys_and_values_never_reach_sql_text(store: PgVectorStore, hostile: str) -> None:
    await _two_tenants(store)
    flt = Filter(
        must=(Match(TENANT, "a"), Match(hostile, hostile), Range(hostile, gte=1)),
        should=(MatchAny(f"meta.{hostile}", (hostile, 3)), Match("meta.lang", hostile)),
        must_not=(Match(hostile, True),),
    )
    where = compile_filter(flt)
    async with await psycopg.AsyncConnection.connect(store._url) as conn:
        text = where.sql.as_string(conn)
    # the statement's text: fixed fragments and placeholders only
    assert hostile not in text
    for fragment in ("DROP", "DELETE", "'1'='1", "OR true"):
        assert fragment not in text
    assert text.count("%s") == len(where.params)
    # and the database runs it as data: nothing matches, nothing is dropped
    assert await store.count(flt) == 0
    assert await store.search(np.ones(DIM), flt=flt, limit=10) == []
    assert await store.count() == 10


async def test_a_hostile_key_is_matched_as_a_literal_key(store: PgVectorStore) -> None:
    key = "x'); DROP TABLE chunks; --"
    point = chunk("a", "d", 0, np.ones(DIM), meta={key: "yes"})
    await store.upsert_chunks([point])
    assert await store.count(Filter(must=(Match(f"meta.{key}", "yes"),))) == 1
    assert await store.count(Filter(must=(Match(f"meta.{key}", "no"),))) == 0


# --- one transaction per batch ------------------------------------------------------------------------------


async def test_write_batch_is_all_or_nothing(store: PgVectorStore) -> None:
    rng = np.random.default_rng(2)
    old = [chunk("a", "d", i, v, version=1) for i, v in enumerate(unit_vectors(rng, 4))]
    await store.upsert_chunks(old)
    await store.put_doc_states([DocState("a", "d", 1, chunk_count=4)])

    new = [chunk("a", "d", i, v, version=2) for i, v in enumerate(unit_vectors(rng, 2))]
    broken = DocState("a", "d", 2, chunk_count=2, chunk_hashes=("x\x00",))  # NUL: PostgreSQL refuses the text
    with pytest.raises(psycopg.Error):
        await store.write_batch(points=new, leftovers=[("a", "d", 2)], states=[broken])
    # nothing of it happened: the old version is whole, the registry unchanged
    assert sorted(h.payload["version"] for h in await store.scroll()) == [1, 1, 1, 1]
    assert (await store.get_doc_states([("a", "d")]))[("a", "d")].version == 1

    await store.write_batch(
        points=new, leftovers=[("a", "d", 2)], states=[DocState("a", "d", 2, chunk_count=2)], deletes=[("b", "x")]
    )
    assert sorted(h.payload["version"] for h in await store.scroll()) == [2, 2]
    assert (await store.get_doc_states([("a", "d")]))[("a", "d")].version == 2


# --- several stores, one database ---------------------------------------------------------------------------


async def test_stores_opening_together_do_not_race(pg_url: str) -> None:
    stores = [PgVectorStore(pg_url, "shared", hnsw=HNSW) for _ in range(4)]
    others = [PgVectorStore(pg_url, f"other_{i}", hnsw=HNSW) for i in range(2)]  # first use of the database too
    try:
        infos = await asyncio.gather(*(s.open(model=MODEL, dim=DIM) for s in stores + others))
        assert {(i.model, i.dim) for i in infos} == {(MODEL, DIM)}
        await stores[0].upsert_chunks([chunk("a", "d", 0, np.ones(DIM))])
        assert [await s.count() for s in stores] == [1, 1, 1, 1]  # they all see one table
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_indexes WHERE tablename = 'shared' AND indexdef LIKE '%hnsw%'"
            )
            assert await cur.fetchone() == (1,)
    finally:
        for s in stores + others:
            await s.close()


async def test_the_hnsw_index_takes_m_and_ef_construction_from_settings(store: PgVectorStore, pg_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'chunks_hnsw'")
        row = await cur.fetchone()
    assert row is not None
    assert (
        "vector_cosine_ops" in row[0]
        and f"m='{HNSW.m}'" in row[0]
        and f"ef_construction='{HNSW.ef_construct}'" in row[0]
    )


# --- a database restart -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hard", [False, True], ids=["restart", "crash"])
async def test_the_store_is_unavailable_while_the_database_is_down_and_reconnects_after(hard: bool) -> None:
    server = PostgresServer(quiet=True)
    await server.astart()
    store = PgVectorStore(server.app_url(server.create_database()), "chunks", hnsw=HNSW, timeout_seconds=2)
    try:
        await store.open(model=MODEL, dim=DIM)
        await store.upsert_chunks([chunk("a", "d", 0, np.ones(DIM))])
        if hard:
            await asyncio.to_thread(server.kill)
        else:
            await asyncio.to_thread(server.stop)
        with pytest.raises(StoreUnavailableError):
            await store.count()
        with pytest.raises(StoreUnavailableError):
            await store.upsert_chunks([chunk("a", "d", 1, np.ones(DIM))])
        await server.astart()
        async with asyncio.timeout(30):  # the pool replaces its broken connections by itself
            while True:
                try:
                    assert await store.count() == 1
                    break
                except StoreUnavailableError:
                    await asyncio.sleep(0.2)
        await store.upsert_chunks([chunk("a", "d", 1, np.ones(DIM))])
        assert await store.count() == 2
    finally:
        await store.close()
        await asyncio.to_thread(server.close)


async def test_a_serialization_failure_is_retriable() -> None:
    from pipeline.store.pgvector import _translate

    error = psycopg.errors.SerializationFailure("could not serialize access")
    assert isinstance(_translate(error, "db"), StoreUnavailableError)
    assert _translate(error, "db").retriable
    assert not isinstance(_translate(psycopg.errors.UndefinedColumn("no"), "db"), StoreUnavailableError)


# --- recall -------------------------------------------------------------------------------------------------


async def test_the_recall_sweep_runs_on_pgvector(store: PgVectorStore) -> None:
    """What `vectorstream recall` does (pipeline.recall): stored vectors as queries, each filtered to its tenant,
    HNSW at several ef against the exact scan."""
    from pipeline.recall import measure, sample_cases

    rng = np.random.default_rng(5)
    vectors = unit_vectors(rng, 1500)
    await store.upsert_chunks([chunk(f"t{i % 3}", f"d{i}", 0, v) for i, v in enumerate(vectors)])
    await store.build_index()
    cases = await sample_cases(store, n=30, seed=1)
    assert len(cases) == 30
    assert all(isinstance(c.flt.must[0], Match) and c.flt.must[0].key == TENANT for c in cases)
    rows = await measure(store, cases, k=10, efs=(10, 200), progress=False)
    exact, low, high = rows
    assert exact.ef is None and (low.ef, high.ef) == (10, 200)
    assert high.recall >= 0.95 and high.recall >= low.recall


# --- a rebalance's overlap: the partition's old owner still finishing a batch ------------------------------


async def test_a_superseded_write_batch_changes_nothing(store: PgVectorStore) -> None:
    rng = np.random.default_rng(6)
    v3 = [chunk("a", "d", i, v, version=3) for i, v in enumerate(unit_vectors(rng, 2))]
    await store.write_batch(points=v3, leftovers=[("a", "d", 3)], states=[DocState("a", "d", 3, chunk_count=2)])
    # the old owner's batch: an older delete of the same document, and an older upsert of another it wrote first
    other_v1 = [chunk("a", "e", 0, np.ones(DIM), version=1)]
    await store.write_batch(points=other_v1, states=[DocState("a", "e", 1, chunk_count=1)])
    await store.write_batch(
        points=[chunk("a", "e", 0, np.ones(DIM), version=2)], states=[DocState("a", "e", 2, chunk_count=1)]
    )
    await store.write_batch(
        points=other_v1,
        deletes=[("a", "d")],
        states=[DocState("a", "d", 2, deleted=True), DocState("a", "e", 1, chunk_count=1)],
    )
    versions = sorted((h.payload["doc_id"], h.payload["version"]) for h in await store.scroll())
    assert versions == [("d", 3), ("d", 3), ("e", 2)]
    states = await store.get_doc_states([("a", "d"), ("a", "e")])
    assert (states[("a", "d")].version, states[("a", "d")].deleted) == (3, False)
    assert states[("a", "e")].version == 2
    # a tombstone at the same version is newer than the live state (the ingest rules' order), and applies
    await store.write_batch(deletes=[("a", "d")], states=[DocState("a", "d", 3, deleted=True)])
    assert {h.payload["doc_id"] for h in await store.scroll()} == {"e"}


async def test_the_registry_and_chunks_never_move_backwards(store: PgVectorStore) -> None:
    await store.put_doc_states([DocState("a", "d", 5, chunk_count=1)])
    await store.put_doc_states([DocState("a", "d", 4, chunk_count=9)])
    assert (await store.get_doc_states([("a", "d")]))[("a", "d")].version == 5
    await store.upsert_chunks([chunk("a", "d", 0, np.ones(DIM), version=5)])
    await store.upsert_chunks([chunk("a", "d", 0, -np.ones(DIM), version=4)])
    (hit,) = await store.scroll()
    assert hit.payload["version"] == 5


async def test_a_store_opens_beside_a_writer_without_waiting_for_its_locks(store: PgVectorStore, pg_url: str) -> None:
    """A second worker starting while the first writes: its start-up must not need the tables' locks (an
    ALTER TABLE there once deadlocked against a writer's transaction)."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as writer:
        async with writer.transaction():
            await writer.execute("SELECT set_config(%s, 'on', true)", (ALL_TENANTS_SETTING,))
            await writer.execute("INSERT INTO chunks__registry (tenant_id, doc_id, version) VALUES ('a', 'x', 1)")
            await writer.execute("UPDATE chunks SET version = version")  # row-exclusive locks on both tables
            second = PgVectorStore(pg_url, "chunks", hnsw=HNSW, timeout_seconds=5)
            try:
                async with asyncio.timeout(5):
                    info = await second.open(model=MODEL, dim=DIM)
            finally:
                await second.close()
    assert info.model == MODEL
