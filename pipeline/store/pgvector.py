"""The PostgreSQL + pgvector adapter of the vector-store port: chunks and the document registry in tables.

psycopg 3 (async, a connection pool that reconnects by itself) with pgvector's type adapters; filters compile
to SQL whose every value and key is a bound parameter, and Row-Level Security on the tenant backs them up.

Tables (``<c>`` is the collection, e.g. ``vectorstream_chunks``)::

    vectorstream_collections(name PK, model, dim, created_at)         the {model, dim} record of each collection
    <c>(id uuid PK, tenant_id, doc_id, version, acl_public, acl_users text[], acl_groups text[],
        payload jsonb, embedding vector(dim))                         one row per chunk, HNSW on embedding
    <c>__registry(tenant_id, doc_id PK, version, deleted, chunk_count, chunk_hashes text[])   one row per document

The columns beside ``payload`` are copies of its reserved fields, kept so that the mandatory tenant and
access conditions hit B-tree and GIN indexes; ``payload`` stays the whole truth (what ``scroll`` returns).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import psycopg
import psycopg.errors
from pgvector.psycopg import register_vector_async
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from pipeline.errors import ConfigurationError, ModeUnsupportedError, StoreUnavailableError
from pipeline.store.base import (
    ACL_GROUPS,
    ACL_PUBLIC,
    ACL_USERS,
    DOC,
    META_PREFIX,
    TENANT,
    VERSION,
    ChunkPoint,
    Condition,
    DocState,
    Filter,
    Hit,
    HnswParams,
    HybridParams,
    Match,
    MatchAny,
    Range,
    SearchMode,
    SparseVector,
    StoreInfo,
    VectorLike,
    VectorStore,
)
from pipeline.store.registry import REGISTRY_SUFFIX, check_meta, source_from_json

if TYPE_CHECKING:
    from pipeline.settings import StoreSettings

log = logging.getLogger(__name__)

#: the table of {model, dim} records, one row per collection, shared by every collection in the database
COLLECTIONS_TABLE = "vectorstream_collections"
#: a collection name becomes table and index names: PostgreSQL cuts identifiers at 63 bytes
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
#: the advisory lock start-up takes, transaction-scoped
_BOOTSTRAP_LOCK = "vectorstream:bootstrap"
#: pgvector's hnsw.ef_search range
_EF_MAX = 1000
#: the settings the Row-Level Security policies read, set per transaction (``set_config(..., true)``)
TENANT_SETTING = "vectorstream.tenant"
ALL_TENANTS_SETTING = "vectorstream.all_tenants"

IterativeScan = Literal["off", "relaxed_order", "strict_order"]


@dataclass(frozen=True)
class _Scope:
    """Which tenant's rows a transaction may see: one tenant, or all (writes, maintenance, admin reads)."""

    tenant: str | None

    @classmethod
    def of(cls, flt: Filter | None) -> _Scope:
        """A filter whose top level requires one tenant reads under that tenant's scope, whatever else it
        says: the policy then hides every other tenant's rows even if the compiled SQL lost the condition."""
        if flt is not None:
            for cond in flt.must:
                if isinstance(cond, Match) and cond.key == TENANT and isinstance(cond.value, str):
                    return cls(cond.value)
        return cls(None)


_ALL = _Scope(None)


class PgVectorStore(VectorStore):
    """Chunks in ``<collection>``, documents in ``<collection>__registry``, in the database ``url`` names."""

    def __init__(
        self,
        url: str,
        collection: str = "vectorstream_chunks",
        *,
        hnsw: HnswParams = HnswParams(),
        hnsw_ef: int = 128,
        iterative_scan: IterativeScan = "relaxed_order",
        max_scan_tuples: int = 20_000,
        pool_min_size: int = 1,
        pool_max_size: int = 4,
        timeout_seconds: float = 10.0,
        metadata_indexes: Mapping[str, str] | None = None,
    ) -> None:
        #: metadata key -> declared index type (store.metadata_indexes): an expression index each, and the
        #: filter compiler writes their conditions in the form that index serves
        self._metadata_indexes = dict(metadata_indexes or {})
        if not _NAME.match(collection):
            raise ConfigurationError(
                f"collection {collection!r} cannot name a PostgreSQL table: use 1-40 lower-case letters, digits "
                "and underscores, starting with a letter (VECTORSTREAM_STORE__COLLECTION)"
            )
        self._url = url
        self._collection = collection
        self._hnsw = hnsw
        self._hnsw_ef = hnsw_ef
        self._iterative_scan = iterative_scan
        self._max_scan_tuples = max_scan_tuples
        self._pool_min = pool_min_size
        self._pool_max = max(pool_max_size, pool_min_size)
        self._timeout = timeout_seconds
        self._pool: AsyncConnectionPool | None = None
        self._model = ""
        self._dim = 0
        self._chunks = sql.Identifier(collection)
        self._registry = sql.Identifier(f"{collection}{REGISTRY_SUFFIX}")

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> PgVectorStore:
        if settings.postgres_url is None:
            raise ConfigurationError(
                "store.backend is 'pgvector' but no database is set: set VECTORSTREAM_STORE__POSTGRES_URL, "
                "e.g. postgresql://vectorstream:secret@db:5432/vectorstream"
            )
        return cls(
            settings.postgres_url.get_secret_value(),
            settings.collection,
            hnsw=HnswParams(m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct),
            hnsw_ef=settings.hnsw_ef,
            iterative_scan=settings.pgvector_iterative_scan,
            max_scan_tuples=settings.pgvector_max_scan_tuples,
            pool_max_size=settings.postgres_pool_size,
            timeout_seconds=settings.timeout_seconds,
            metadata_indexes=settings.metadata_index_map,
        )

    @property
    def collection(self) -> str:
        return self._collection

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def open(self, *, model: str, dim: int, sparse: dict[str, Any] | None = None) -> StoreInfo:
        # dense only: the table keeps no BM25 vectors (sparse_record stays None), and query() refuses the
        # sparse and hybrid modes with an error reply rather than answering them with dense search
        if sparse is not None and self._pool is None:
            log.info("pgvector store %r serves dense search only: sparse vectors are not stored", self._collection)
        if self._pool is not None:
            check_meta(
                {"model": self._model, "dim": self._dim},
                model=model,
                dim=dim,
                collection=self._collection,
                remedy=self._remedy(),
            )
            return await self._info()
        try:
            conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True, connect_timeout=self._timeout_s)
        except psycopg.Error as exc:
            raise StoreUnavailableError(f"postgres at {self._where()}: {exc}") from exc
        try:
            async with conn:
                await self._bootstrap(conn, model, dim)
        except psycopg.Error as exc:
            raise _translate(exc, self._where()) from exc
        pool: AsyncConnectionPool = AsyncConnectionPool(
            self._url,
            min_size=self._pool_min,
            max_size=self._pool_max,
            kwargs={"autocommit": True, "connect_timeout": self._timeout_s},
            configure=register_vector_async,
            check=AsyncConnectionPool.check_connection,  # a connection broken by a server restart is replaced
            timeout=self._timeout,
            reconnect_timeout=24 * 3600.0,  # keep trying through a long outage; callers see StoreUnavailable
            name=f"vectorstream-{self._collection}",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=self._timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            await pool.close()
            raise StoreUnavailableError(f"postgres at {self._where()}: {exc}") from exc
        self._pool, self._model, self._dim = pool, model, dim
        return await self._info()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def _timeout_s(self) -> int:
        return max(1, round(self._timeout))

    def _where(self) -> str:
        """The server and database, without the credentials."""
        try:
            info = conninfo_to_dict(self._url)
        except psycopg.ProgrammingError:
            return "(unparsable url)"
        return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def _remedy(self) -> str:
        return (
            f"drop the tables {self._collection} and {self._collection}{REGISTRY_SUFFIX} and the row "
            f"{self._collection!r} of {COLLECTIONS_TABLE}"
        )

    async def _bootstrap(self, conn: psycopg.AsyncConnection[Any], model: str, dim: int) -> None:
        """Create what is missing, under an advisory lock so that workers starting together do not race."""
        async with conn.transaction():
            # one key for every collection: CREATE EXTENSION / CREATE TABLE IF NOT EXISTS racing each other can
            # still fail on the catalogs' unique indexes, whichever collection they are for
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (_BOOTSTRAP_LOCK,))
            await self._ensure_extension(conn)
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, model text NOT NULL, dim integer NOT NULL,"
                    " created_at timestamptz NOT NULL DEFAULT now())"
                ).format(sql.Identifier(COLLECTIONS_TABLE))
            )
            cur = await conn.execute(
                sql.SQL("SELECT model, dim FROM {} WHERE name = %s").format(sql.Identifier(COLLECTIONS_TABLE)),
                (self._collection,),
            )
            row = await cur.fetchone()
            stored = {"model": row[0], "dim": row[1]} if row else None
            check_meta(stored, model=model, dim=dim, collection=self._collection, remedy=self._remedy())
            existing_dim = await self._embedding_dim(conn)
            if existing_dim is not None and existing_dim != dim:  # the record is gone but the table says otherwise
                check_meta(
                    {"model": stored["model"] if stored else "(unrecorded)", "dim": existing_dim},
                    model=model,
                    dim=dim,
                    collection=self._collection,
                    remedy=self._remedy(),
                )
            # only what is missing: even an "IF NOT EXISTS" takes its table lock first, and a worker starting
            # beside one that is writing must not queue for (or deadlock on) the writer's tables
            for relation, statement in self._ddl(dim):
                if not await self._exists(conn, relation):
                    await conn.execute(statement)
            await self._ensure_metadata_indexes(conn)
            await self._ensure_policies(conn)
            if stored is None:
                await conn.execute(
                    sql.SQL("INSERT INTO {} (name, model, dim) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING").format(
                        sql.Identifier(COLLECTIONS_TABLE)
                    ),
                    (self._collection, model, dim),
                )
                log.info(
                    "created pgvector collection %r at %s (model %s, dim %d)",
                    self._collection,
                    self._where(),
                    model,
                    dim,
                )
            cur = await conn.execute("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
            bypass = await cur.fetchone()
            if bypass and bypass[0]:
                log.warning(
                    "connected to postgres as a role that bypasses row-level security: the tenant policy is not "
                    "enforced for this process; connect as an ordinary role (see README, pgvector)"
                )

    async def _ensure_extension(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        row = await cur.fetchone()
        if row is None:
            try:
                async with conn.transaction():
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.errors.InsufficientPrivilege as exc:
                raise ConfigurationError(
                    f"the pgvector extension is not installed in {self._where()} and this role may not install it: "
                    "ask a superuser to run CREATE EXTENSION vector; in that database"
                ) from exc
            except psycopg.errors.FeatureNotSupported as exc:
                raise ConfigurationError(f"pgvector is not available on the server {self._where()}: {exc}") from exc
            cur = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            row = await cur.fetchone()
        version = tuple(int(x) for x in re.findall(r"\d+", str(row[0]))[:2]) if row else (0, 0)
        if version < (0, 8):
            raise ConfigurationError(
                f"pgvector {row[0] if row else '?'} at {self._where()} is too old: filtered search needs 0.8 "
                "(iterative index scans); ALTER EXTENSION vector UPDATE;"
            )

    @staticmethod
    async def _exists(conn: psycopg.AsyncConnection[Any], relation: str) -> bool:
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(relation).as_string(conn),))
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _embedding_dim(self, conn: psycopg.AsyncConnection[Any]) -> int | None:
        cur = await conn.execute(
            "SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attname = 'embedding'",
            (self._collection,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row and row[0] and row[0] > 0 else None

    def _ddl(self, dim: int) -> list[tuple[str, sql.Composed]]:
        """(relation, the statement that creates it), in creation order."""
        c, r = self._chunks, self._registry
        name = self._collection
        registry = f"{name}{REGISTRY_SUFFIX}"

        def ix(suffix: str) -> sql.Identifier:
            return sql.Identifier(f"{self._collection}_{suffix}")

        statements = [
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " id uuid PRIMARY KEY,"
                " tenant_id text NOT NULL,"
                " doc_id text NOT NULL,"
                " version bigint,"
                " acl_public boolean,"
                " acl_users text[],"
                " acl_groups text[],"
                " payload jsonb NOT NULL,"
                " embedding vector({}) NOT NULL)"
            ).format(c, sql.Literal(int(dim))),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding vector_cosine_ops)"
                " WITH (m = {}, ef_construction = {})"
            ).format(ix("hnsw"), c, sql.Literal(int(self._hnsw.m)), sql.Literal(int(self._hnsw.ef_construct))),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (tenant_id, doc_id, version)").format(ix("doc"), c),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gin (acl_users)").format(ix("acl_users"), c),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gin (acl_groups)").format(ix("acl_groups"), c),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gin (payload jsonb_path_ops)").format(ix("payload"), c),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " tenant_id text NOT NULL,"
                " doc_id text NOT NULL,"
                " version bigint NOT NULL,"
                " deleted boolean NOT NULL DEFAULT false,"
                " chunk_count integer NOT NULL DEFAULT 0,"
                " chunk_hashes text[] NOT NULL DEFAULT '{{}}',"
                # where the event that produced the state sits in the log: [topic, partition, offset, timestamp_ms]
                " source jsonb,"
                " PRIMARY KEY (tenant_id, doc_id))"
            ).format(r),
        ]
        names = [name, f"{name}_hnsw", f"{name}_doc", f"{name}_acl_users", f"{name}_acl_groups", f"{name}_payload"]
        return list(zip([*names, registry], statements, strict=True))

    def metadata_index_names(self, key: str) -> tuple[str, str]:
        """The two indexes of declared metadata key ``key``: on its value column, and the partial one on the
        rows where it holds a list (names within PostgreSQL's 63 bytes: a hash of the key when needed)."""
        name = f"{self._collection}_{_meta_column(key)}"
        if len(name) > 61:
            name = f"{self._collection}_meta_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        return name, f"{name}_l"

    async def _ensure_metadata_indexes(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Each declared metadata field gets two generated (stored) columns and an index on each: its scalar
        value (text, boolean, or double precision for integer and float) with a B-tree, and whether it holds
        a list, with a partial index on those rows.

        Not expression indexes on the jsonb: Row-Level Security is forced on the table, and PostgreSQL then
        uses an index only for conditions whose operators are leakproof, which no jsonb or array operator
        is (=, <, > on text, float8 and boolean are). A condition on a declared field is compiled to
        ``value = x OR (is_list AND <the jsonb test>)``: both arms are indexed, so a selective filter is a
        bitmap scan instead of a walk over every row. A column of the wrong type (the declaration changed)
        is dropped and made again. Adding a stored column rewrites the table, in the start-up transaction:
        on a large table that blocks writes while it runs, once."""
        for key, kind in self._metadata_indexes.items():
            column = _meta_column(key)
            sql_type = _SQL_TYPES[kind]
            cur = await conn.execute(
                "SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = %s AND column_name = %s",
                (self._collection, column),
            )
            row = await cur.fetchone()
            if row is not None and row[0] == sql_type:
                continue
            value, is_list = sql.Identifier(column), sql.Identifier(f"{column}_list")
            if row is not None:
                log.info("metadata index %s: its column becomes %s (declared %s)", key, sql_type, kind)
                await conn.execute(
                    sql.SQL("ALTER TABLE {} DROP COLUMN {}, DROP COLUMN IF EXISTS {}").format(
                        self._chunks, value, is_list
                    )
                )
            e = _meta_expr(key)
            await conn.execute(
                sql.SQL(
                    "ALTER TABLE {c} ADD COLUMN {v} {t} GENERATED ALWAYS AS "
                    "(CASE WHEN jsonb_typeof({e}) = {j} THEN {cast} END) STORED, "
                    "ADD COLUMN IF NOT EXISTS {l} boolean GENERATED ALWAYS AS "
                    "(coalesce(jsonb_typeof({e}) = 'array', false)) STORED"
                ).format(
                    c=self._chunks,
                    v=value,
                    t=sql.SQL(sql_type),
                    e=e,
                    j=sql.Literal(_JSON_TYPES[kind]),
                    cast=(sql.SQL("{} ->> {}").format(sql.SQL("(payload -> 'meta')"), sql.Literal(key)))
                    if kind == "keyword"
                    else sql.SQL("({})::{}").format(e, sql.SQL(sql_type)),
                    l=is_list,
                )
            )
            index, list_index = self.metadata_index_names(key)
            await conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(sql.Identifier(index), self._chunks, value)
            )
            await conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (id) WHERE {}").format(
                    sql.Identifier(list_index), self._chunks, is_list
                )
            )
            log.info("pgvector collection %r: metadata %r indexed as %s (%s)", self._collection, key, kind, index)

    async def _ensure_policies(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Row-Level Security on both tables: a transaction sees the rows of the tenant it declared, or all
        rows if it declared so, and nothing when it declared neither. FORCE: the owner is bound too."""
        rule = sql.SQL("(current_setting({all}, true) = 'on' OR tenant_id = current_setting({tenant}, true))").format(
            all=sql.Literal(ALL_TENANTS_SETTING), tenant=sql.Literal(TENANT_SETTING)
        )
        for table_name in (self._collection, f"{self._collection}{REGISTRY_SUFFIX}"):
            table = sql.Identifier(table_name)
            policy = f"{table_name}_tenant"
            cur = await conn.execute(
                "SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE oid = to_regclass(%s)", (table_name,)
            )
            row = await cur.fetchone()
            if not (row and row[0]):  # ALTER TABLE takes an exclusive lock: only when it changes something
                await conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
                await conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(table))
            cur = await conn.execute(
                "SELECT 1 FROM pg_policy WHERE polrelid = to_regclass(%s) AND polname = %s", (table_name, policy)
            )
            if await cur.fetchone() is None:
                await conn.execute(
                    sql.SQL("CREATE POLICY {} ON {} USING {rule} WITH CHECK {rule}").format(
                        sql.Identifier(policy), table, rule=rule
                    )
                )

    async def _info(self) -> StoreInfo:
        async with self._tx(_ALL) as cur:
            await cur.execute(sql.SQL("SELECT count(*) FROM {}").format(self._chunks))
            row = await cur.fetchone()
        return StoreInfo(
            model=self._model,
            dim=self._dim,
            chunk_count=int(row[0]) if row else 0,
            extra={"backend": "pgvector", "database": self._where(), "table": self._collection},
        )

    # --- registry -------------------------------------------------------------------------------------------

    async def get_doc_states(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], DocState]:
        if not keys:
            return {}
        tenants = [t for t, _ in keys]
        docs = [d for _, d in keys]
        async with self._tx(_ALL) as cur:
            await cur.execute(
                sql.SQL(
                    "SELECT r.tenant_id, r.doc_id, r.version, r.deleted, r.chunk_count, r.chunk_hashes, r.source"
                    " FROM {} r"
                    " JOIN unnest(%s::text[], %s::text[]) AS k(tenant_id, doc_id) USING (tenant_id, doc_id)"
                ).format(self._registry),
                (tenants, docs),
            )
            rows = await cur.fetchall()
        found = {
            (t, d): DocState(t, d, int(v), bool(deleted), int(n), tuple(hashes or ()), source_from_json(source))
            for t, d, v, deleted, n, hashes, source in rows
        }
        return {key: found[key] for key in keys if key in found}

    async def put_doc_states(self, states: Sequence[DocState]) -> None:
        if not states:
            return
        async with self._tx(_ALL) as cur:
            await self._put_states(cur, states)

    async def _put_states(self, cur: psycopg.AsyncCursor[Any], states: Sequence[DocState]) -> None:
        latest = {(s.tenant_id, s.doc_id): s for s in states}  # one row per key and statement
        await cur.executemany(
            sql.SQL(
                "INSERT INTO {r} AS r (tenant_id, doc_id, version, deleted, chunk_count, chunk_hashes, source)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (tenant_id, doc_id) DO UPDATE SET version = EXCLUDED.version,"
                " deleted = EXCLUDED.deleted, chunk_count = EXCLUDED.chunk_count, chunk_hashes = EXCLUDED.chunk_hashes,"
                " source = EXCLUDED.source"
                # a document's state only moves forward (every applied op raises (version, deleted)): a worker
                # still finishing a batch after a rebalance cannot set back what the partition's new owner wrote
                " WHERE (r.version, r.deleted) <= (EXCLUDED.version, EXCLUDED.deleted)"
            ).format(r=self._registry),
            [
                (
                    s.tenant_id,
                    s.doc_id,
                    int(s.version),
                    bool(s.deleted),
                    int(s.chunk_count),
                    list(s.chunk_hashes),
                    Jsonb(list(s.source)) if s.source is not None else None,
                )
                for s in latest.values()
            ],
        )

    # --- chunks ---------------------------------------------------------------------------------------------

    async def upsert_chunks(self, points: Sequence[ChunkPoint]) -> None:
        if not points:
            return
        rows = [self._row(p) for p in points]
        async with self._tx(_ALL) as cur:
            await self._upsert(cur, rows)

    async def _upsert(self, cur: psycopg.AsyncCursor[Any], rows: list[tuple[Any, ...]]) -> None:
        await cur.executemany(
            sql.SQL(
                "INSERT INTO {c} AS c (id, tenant_id, doc_id, version, acl_public, acl_users, acl_groups, payload,"
                " embedding)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, doc_id = EXCLUDED.doc_id,"
                " version = EXCLUDED.version, acl_public = EXCLUDED.acl_public, acl_users = EXCLUDED.acl_users,"
                " acl_groups = EXCLUDED.acl_groups, payload = EXCLUDED.payload, embedding = EXCLUDED.embedding"
                " WHERE c.version IS NULL OR EXCLUDED.version IS NULL OR c.version <= EXCLUDED.version"
            ).format(c=self._chunks),
            rows,
        )

    def _row(self, point: ChunkPoint) -> tuple[Any, ...]:
        payload = dict(point.payload)
        tenant, doc = payload.get(TENANT), payload.get(DOC)
        if not isinstance(tenant, str) or not isinstance(doc, str):
            raise ValueError(f"chunk {point.id} has no string {TENANT!r} and {DOC!r} in its payload")
        vector = np.asarray(point.vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self._dim:
            raise ValueError(f"chunk {point.id} has a {vector.shape[0]}-dim vector, the collection holds {self._dim}")
        norm = float(np.linalg.norm(vector))
        if norm > 0:  # stored normalized, as Qdrant does for cosine: get_vectors returns unit vectors
            vector = vector / norm
        return (
            uuid.UUID(str(point.id)),
            tenant,
            doc,
            _int_or_none(payload.get(VERSION)),
            payload.get(ACL_PUBLIC) if isinstance(payload.get(ACL_PUBLIC), bool) else None,
            _strings(payload.get(ACL_USERS)),
            _strings(payload.get(ACL_GROUPS)),
            Jsonb(payload),
            vector,
        )

    async def delete_chunks(self, tenant_id: str, doc_id: str, *, below_version: int | None = None) -> None:
        async with self._tx(_ALL) as cur:
            await self._delete(cur, tenant_id, doc_id, below_version)

    async def _delete(
        self, cur: psycopg.AsyncCursor[Any], tenant_id: str, doc_id: str, below_version: int | None
    ) -> None:
        if below_version is None:
            await cur.execute(
                sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND doc_id = %s").format(self._chunks), (tenant_id, doc_id)
            )
        else:
            await cur.execute(
                sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND doc_id = %s AND version < %s").format(self._chunks),
                (tenant_id, doc_id, int(below_version)),
            )

    async def write_batch(
        self,
        *,
        points: Sequence[ChunkPoint] = (),
        leftovers: Sequence[tuple[str, str, int]] = (),
        deletes: Sequence[tuple[str, str]] = (),
        states: Sequence[DocState] = (),
        upsert_batch_points: int = 512,
    ) -> None:
        """One batch's writes in ONE transaction: new chunks, removal of older versions' leftovers, deleted
        documents' chunks, and the registry records. Either all of it is visible, or none of it.

        Each document in ``states`` is locked for the transaction (an advisory lock on its key) and its writes
        are dropped when the registry already holds a newer state: a worker that lost the partition in a
        rebalance but is still finishing its batch cannot delete or overwrite what the new owner wrote since.
        """
        rows = [self._row(p) for p in points]
        async with self._tx(_ALL) as cur:
            superseded = await self._superseded(cur, states)
            if superseded:
                log.info("skipping %d documents a newer write superseded (a rebalance's overlap)", len(superseded))
                rows = [r for r in rows if (r[1], r[2]) not in superseded]
                leftovers = [x for x in leftovers if (x[0], x[1]) not in superseded]
                deletes = [x for x in deletes if (x[0], x[1]) not in superseded]
                states = [x for x in states if (x.tenant_id, x.doc_id) not in superseded]
            if rows:
                await self._upsert(cur, rows)
            for tenant_id, doc_id, below in leftovers:
                await self._delete(cur, tenant_id, doc_id, below)
            for tenant_id, doc_id in deletes:
                await self._delete(cur, tenant_id, doc_id, None)
            if states:
                await self._put_states(cur, states)

    async def _superseded(self, cur: psycopg.AsyncCursor[Any], states: Sequence[DocState]) -> set[tuple[str, str]]:
        """Lock the documents (in one order, so two writers cannot deadlock) and return those whose stored
        (version, deleted) is above the one about to be written."""
        if not states:
            return set()
        new = {(s.tenant_id, s.doc_id): (int(s.version), bool(s.deleted)) for s in states}
        keys = sorted(new)
        await cur.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(k, 1)) FROM unnest(%s::text[]) WITH ORDINALITY AS t(k, i)"
            " ORDER BY i",
            ([f"{t}\x1f{d}" for t, d in keys],),
        )
        await cur.execute(
            sql.SQL(
                "SELECT r.tenant_id, r.doc_id, r.version, r.deleted FROM {} r"
                " JOIN unnest(%s::text[], %s::text[]) AS k(tenant_id, doc_id) USING (tenant_id, doc_id)"
            ).format(self._registry),
            ([t for t, _ in keys], [d for _, d in keys]),
        )
        return {(t, d) for t, d, v, deleted in await cur.fetchall() if (int(v), bool(deleted)) > new[(t, d)]}

    async def get_vectors(self, ids: Sequence[str]) -> dict[str, list[float]]:
        wanted = []
        for i in dict.fromkeys(ids):
            with contextlib.suppress(ValueError):
                wanted.append(uuid.UUID(str(i)))
        if not wanted:
            return {}
        async with self._tx(_ALL) as cur:
            await cur.execute(
                sql.SQL("SELECT id, embedding FROM {} WHERE id = ANY(%s)").format(self._chunks), (wanted,)
            )
            rows = await cur.fetchall()
        return {str(pid): _floats(vec) for pid, vec in rows}

    async def count(self, flt: Filter | None = None) -> int:
        where = compile_filter(flt, self._metadata_indexes)
        async with self._tx(_Scope.of(flt)) as cur:
            await cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE ").format(self._chunks) + where.sql, where.params)
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def scroll(self, flt: Filter | None = None, *, limit: int = 10_000) -> list[Hit]:
        where = compile_filter(flt, self._metadata_indexes)
        async with self._tx(_Scope.of(flt)) as cur:
            await cur.execute(
                sql.SQL("SELECT id, payload FROM {} WHERE ").format(self._chunks)
                + where.sql
                + sql.SQL(" ORDER BY id LIMIT %s"),
                [*where.params, int(limit)],
            )
            rows = await cur.fetchall()
        return [Hit(id=str(pid), score=0.0, payload=dict(payload)) for pid, payload in rows]

    async def query(
        self,
        *,
        mode: SearchMode,
        vector: VectorLike | None,
        sparse: SparseVector | None,
        flt: Filter | None,
        limit: int,
        hybrid: HybridParams = HybridParams(),
        hnsw_ef: int | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        if mode != "dense":
            raise ModeUnsupportedError(
                f"the pgvector store serves mode 'dense' only, not {mode!r}: sparse and hybrid search need a "
                f"Qdrant store (store.backend edge or qdrant)"
            )
        return await super().query(
            mode=mode, vector=vector, sparse=sparse, flt=flt, limit=limit, hnsw_ef=hnsw_ef, exact=exact
        )

    async def search(
        self,
        vector: Sequence[float] | np.ndarray[Any, Any],
        *,
        flt: Filter | None,
        limit: int,
        hnsw_ef: int | None = None,
        exact: bool = False,
        with_vectors: bool = False,
    ) -> list[Hit]:
        if limit <= 0:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        hits = await self._search(query, flt, limit, hnsw_ef, exact, with_vectors)
        if not exact and len(hits) < limit:
            # the graph walk gave up before it found k matches (a selective filter beyond max_scan_tuples):
            # the exact scan answers whether there are more, as the Qdrant path does
            hits = await self._search(query, flt, limit, hnsw_ef, True, with_vectors)
        return hits

    async def _search(
        self,
        query: np.ndarray,
        flt: Filter | None,
        limit: int,
        hnsw_ef: int | None,
        exact: bool,
        with_vectors: bool,
    ) -> list[Hit]:
        where = compile_filter(flt, self._metadata_indexes)
        columns = sql.SQL("id, payload, embedding <=> %s AS distance") + (
            sql.SQL(", embedding") if with_vectors else sql.SQL("")
        )
        statement = (
            sql.SQL("SELECT ")
            + columns
            + sql.SQL(" FROM {} WHERE ").format(self._chunks)
            + where.sql
            + sql.SQL(" ORDER BY embedding <=> %s LIMIT %s")
        )
        ef = min(_EF_MAX, max(int(hnsw_ef or self._hnsw_ef), limit))
        async with self._tx(_Scope.of(flt)) as cur:
            if exact:  # no index: a sequential scan and a sort, the ground truth of recall
                await cur.execute(
                    "SELECT set_config('enable_indexscan', 'off', true), set_config('enable_bitmapscan', 'off', true)"
                )
            else:
                await cur.execute(
                    "SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true),"
                    " set_config('hnsw.max_scan_tuples', %s, true)",
                    (str(ef), self._iterative_scan, str(self._max_scan_tuples)),
                )
            await cur.execute(statement, [query, *where.params, query, int(limit)])
            rows = await cur.fetchall()
        hits = [
            Hit(
                id=str(row[0]),
                score=1.0 - float(row[2]),
                payload=dict(row[1]),
                vector=_floats(row[3]) if with_vectors else None,
            )
            for row in rows
        ]
        hits.sort(key=lambda h: -h.score)  # relaxed_order iterative scans may return near-ties out of order
        return hits

    async def build_index(self) -> None:
        """The HNSW index is kept up to date on every insert; refresh the planner's statistics instead."""
        async with self._tx(_ALL) as cur:
            await cur.execute(sql.SQL("ANALYZE {}").format(self._chunks))

    # --- plumbing -------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _tx(self, scope: _Scope) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
        """A transaction on a pooled connection with the tenant scope the row-level policies read."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError(f"pgvector store {self._collection!r} is not open")
        try:
            async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                await cur.execute(
                    "SELECT set_config(%s, %s, true), set_config(%s, %s, true)",
                    (
                        TENANT_SETTING,
                        scope.tenant or "",
                        ALL_TENANTS_SETTING,
                        "off" if scope.tenant is not None else "on",
                    ),
                )
                yield cur
        except PoolClosed as exc:
            raise StoreUnavailableError(f"pgvector store {self._collection!r} is closed") from exc
        except PoolTimeout as exc:
            raise StoreUnavailableError(f"postgres at {self._where()}: no connection within {self._timeout}s") from exc
        except psycopg.Error as exc:
            raise _translate(exc, self._where()) from exc


#: SQLSTATEs of errors that go away by themselves: retry, do not dead-letter
_RETRIABLE_STATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
        "57014",  # query_canceled (statement_timeout)
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, shutting down, in recovery)
        "53300",  # too_many_connections
        "53100",  # disk_full
        "25006",  # read_only_sql_transaction (a replica being promoted)
    }
)


def _translate(exc: psycopg.Error, where: str) -> Exception:
    """A database error as the port's taxonomy sees it: transient ones become StoreUnavailableError."""
    state = getattr(exc, "sqlstate", None)
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or (
        state is not None and (state in _RETRIABLE_STATES or state.startswith("08"))
    ):
        return StoreUnavailableError(f"postgres at {where}: {type(exc).__name__}: {exc}")
    return exc


def _floats(vector: Any) -> list[float]:
    """A loaded ``vector`` value (pgvector's Vector; a numpy array with older pgvector releases) as floats."""
    to_list = getattr(vector, "to_list", None)
    values = to_list() if to_list is not None else np.asarray(vector).tolist()
    return [float(x) for x in values]


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _strings(value: Any) -> list[str] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str)]


# --- filter compilation: SQL text from fixed fragments, every key and value a bound parameter ---------------


@dataclass(frozen=True)
class Where:
    """A boolean SQL expression and its parameters, in order."""

    sql: sql.Composed | sql.SQL
    params: tuple[Any, ...]


_TRUE = Where(sql.SQL("TRUE"), ())
_FALSE = Where(sql.SQL("FALSE"), ())

#: reserved payload fields kept in their own columns (what the mandatory filters use, and their indexes)
_TEXT_COLUMNS = {TENANT: "tenant_id", DOC: "doc_id"}
_ARRAY_COLUMNS = {ACL_USERS: "acl_users", ACL_GROUPS: "acl_groups"}

#: the Range test on whatever a path holds (a number, or a list with numbers in it); ``$gt``... are jsonpath
#: variables bound through the ``vars`` parameter, never spliced in
_RANGE_OPS = (("gt", ">"), ("gte", ">="), ("lt", "<"), ("lte", "<="))


#: the column type of each declared metadata type, and the JSON type its values have
_SQL_TYPES = {"keyword": "text", "bool": "boolean", "integer": "double precision", "float": "double precision"}
_JSON_TYPES = {"keyword": "string", "bool": "boolean", "integer": "number", "float": "number"}


def _meta_column(key: str) -> str:
    """The generated column of declared metadata key ``key`` (and ``<it>_list``), within 63 bytes."""
    name = f"meta_{key}"
    return name if len(name) <= 55 else f"meta_{key[:41]}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _meta_expr(key: str) -> sql.Composed:
    """``payload -> 'meta' -> 'key'``; the key is a literal in the generated column's DDL. Keys reach here
    validated (``[a-z][a-z0-9_]*``, store.metadata_indexes) and quoted by psycopg."""
    return sql.SQL("(payload -> {} -> {})").format(sql.Literal(META_PREFIX), sql.Literal(key))


def compile_filter(flt: Filter | None, indexed: Mapping[str, str] | None = None) -> Where:
    """The store-neutral filter as a WHERE expression. SQL text comes only from fixed fragments in this module;
    keys travel as ``text[]`` paths or inside bound jsonb documents, values as bound parameters; a metadata
    key declared in ``indexed`` (key -> type, store.metadata_indexes) is tested on its generated columns
    (``PgVectorStore._ensure_metadata_indexes``), whose names come from the validated key."""
    if flt is None:
        return _TRUE
    return _filter(flt, dict(indexed or {}))


def _filter(flt: Filter, indexed: dict[str, str]) -> Where:
    parts: list[Where] = [_condition(c, indexed) for c in flt.must]
    if flt.should:
        parts.append(_join([_condition(c, indexed) for c in flt.should], " OR "))
    if flt.must_not:
        inner = _join([_condition(c, indexed) for c in flt.must_not], " OR ")
        # an indexed condition is NULL where the field is missing: NOT must see that as false, not as NULL
        parts.append(Where(sql.SQL("NOT coalesce(") + inner.sql + sql.SQL(", false)"), inner.params))
    if not parts:
        return _TRUE
    return _join(parts, " AND ")


def _join(parts: list[Where], op: str) -> Where:
    if len(parts) == 1:
        return parts[0]
    joined = sql.SQL(op).join(p.sql for p in parts)
    return Where(sql.SQL("(") + joined + sql.SQL(")"), tuple(v for p in parts for v in p.params))


def _condition(cond: Condition, indexed: dict[str, str]) -> Where:
    if isinstance(cond, Filter):
        inner = _filter(cond, indexed)
        return Where(sql.SQL("(") + inner.sql + sql.SQL(")"), inner.params)
    kind = _indexed_kind(cond.key, indexed)
    if isinstance(cond, Match):
        return _match(cond.key, cond.value, kind)
    if isinstance(cond, MatchAny):
        if not cond.values:
            return _FALSE
        return _join([_match(cond.key, v, kind) for v in cond.values], " OR ")
    if isinstance(cond, Range):
        return _range(cond, kind)
    raise TypeError(f"not a filter condition: {cond!r}")


def _indexed_kind(key: str, indexed: dict[str, str]) -> str | None:
    prefix, dot, meta = key.partition(".")
    return indexed.get(meta) if dot and prefix == META_PREFIX else None


def _indexed_match(key: str, value: str | int | bool, kind: str) -> Where | None:
    """A match on a declared metadata field through its columns: the scalar value, or a list holding it
    (the general form, on the list rows only); None when ``value`` is not of the declared type."""
    meta = key.partition(".")[2]
    column = _meta_column(meta)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "keyword" and isinstance(value, str):
        bound: Any = value
    elif kind == "bool" and isinstance(value, bool):
        bound = value
    elif kind in ("integer", "float") and number:
        bound = float(value)
    else:
        return None
    general = _match(key, value)
    return Where(
        sql.SQL("({} = %s OR ({} AND ").format(sql.Identifier(column), sql.Identifier(f"{column}_list"))
        + general.sql
        + sql.SQL("))"),
        (bound, *general.params),
    )


def _path(key: str) -> list[str]:
    """A dotted key names a path into nested objects ("meta.lang" is payload["meta"]["lang"])."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a filter key must be a non-empty string, not {key!r}")
    return key.split(".")


def _nest(path: list[str], leaf: Any) -> Any:
    doc = leaf
    for part in reversed(path):
        doc = {part: doc}
    return doc


def _match(key: str, value: str | int | bool, kind: str | None = None) -> Where:
    if not isinstance(value, str | int | bool | float):
        raise ValueError(f"a match value must be a string, integer or boolean, not {type(value).__name__}")
    if kind is not None:
        served = _indexed_match(key, value, kind)
        if served is not None:
            return served
    if key in _TEXT_COLUMNS and isinstance(value, str):
        return Where(sql.SQL("{} = %s").format(sql.Identifier(_TEXT_COLUMNS[key])), (value,))
    if key in _ARRAY_COLUMNS and isinstance(value, str):
        return Where(
            sql.SQL("coalesce({} @> ARRAY[%s]::text[], false)").format(sql.Identifier(_ARRAY_COLUMNS[key])), (value,)
        )
    if key == ACL_PUBLIC and isinstance(value, bool):
        return Where(sql.SQL("coalesce(acl_public = %s, false)"), (value,))
    if key == VERSION and isinstance(value, int) and not isinstance(value, bool):
        return Where(sql.SQL("coalesce(version = %s, false)"), (value,))
    # anything else through the payload: the value itself at the path, or a list there that holds it
    # (jsonb containment; the GIN index on payload serves both). true never equals 1 in jsonb.
    path = _path(key)
    return Where(
        sql.SQL("(payload @> %s OR payload @> %s)"),
        (Jsonb(_nest(path, value)), Jsonb(_nest(path, [value]))),
    )


def _range(cond: Range, kind: str | None = None) -> Where:
    bounds = {name: getattr(cond, name) for name, _ in _RANGE_OPS if getattr(cond, name) is not None}
    for name, bound in bounds.items():
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise ValueError(f"a range bound must be a number, not {bound!r} ({name})")
    general = _range_general(cond, bounds)
    if kind not in ("integer", "float") or not bounds:
        return general
    # a declared numeric field: its scalar value within the bounds (a B-tree range), or a list holding one
    column = _meta_column(cond.key.partition(".")[2])
    tests = [sql.SQL("{} " + op + " %s").format(sql.Identifier(column)) for name, op in _RANGE_OPS if name in bounds]
    return Where(
        sql.SQL("((")
        + sql.SQL(" AND ").join(tests)
        + sql.SQL(") OR ({} AND ").format(sql.Identifier(f"{column}_list"))
        + general.sql
        + sql.SQL("))"),
        (*(float(bounds[name]) for name, _ in _RANGE_OPS if name in bounds), *general.params),
    )


def _range_general(cond: Range, bounds: dict[str, Any]) -> Where:
    if cond.key == VERSION:
        tests = [sql.SQL("version " + op + " %s") for name, op in _RANGE_OPS if name in bounds]
        if not tests:
            return Where(sql.SQL("version IS NOT NULL"), ())
        return Where(
            sql.SQL("coalesce(") + sql.SQL(" AND ").join(tests) + sql.SQL(", false)"),
            tuple(bounds[name] for name, _ in _RANGE_OPS if name in bounds),
        )
    predicates = ['@.type() == "number"'] + [f"@ {op} ${name}" for name, op in _RANGE_OPS if name in bounds]
    jsonpath = "$[*] ? (" + " && ".join(predicates) + ")"  # built from the fixed fragments above only
    return Where(
        sql.SQL("coalesce(jsonb_path_exists(payload #> %s, %s::jsonpath, %s), false)"),
        (_path(cond.key), jsonpath, Jsonb(bounds)),
    )
