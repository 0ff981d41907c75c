"""The qdrant-client adapter of the vector-store port: a Qdrant server, or qdrant-client's local mode.

Local mode (a folder or ":memory:") searches by brute force and ignores HNSW and payload indexes; it is for tests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import httpx
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from pipeline.errors import (
    ConfigurationError,
    ModelMismatchError,
    StoreUnavailableError,
    VectorstreamError,
)
from pipeline.store.base import (
    ACL_GROUPS,
    ACL_PUBLIC,
    ACL_USERS,
    DENSE_VECTOR,
    DOC,
    META_PREFIX,
    SPARSE_VECTOR,
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
    VectorLayout,
    VectorLike,
    VectorStore,
    doc_point_id,
)
from pipeline.store.common import (
    SCROLL_PAGE,
    as_floats,
    check_sparse_query,
    dense_floats,
    doc_chunks_filter,
    hnsw_from_settings,
    layout_from_settings,
    match_any_values,
)
from pipeline.store.registry import (
    META_POINT_ID,
    REGISTRY_VECTOR,
    check_meta,
    doc_state_ids,
    doc_state_payload,
    doc_states_by_key,
    meta_payload,
    registry_name,
    resolve_sparse,
)

if TYPE_CHECKING:
    from pipeline.settings import StoreSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHUNK_INDEXES: tuple[tuple[str, Any], ...] = (
    (TENANT, models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)),
    (DOC, models.PayloadSchemaType.KEYWORD),
    (VERSION, models.IntegerIndexParams(type=models.IntegerIndexType.INTEGER, lookup=True, range=True)),
    (ACL_PUBLIC, models.PayloadSchemaType.BOOL),
    (ACL_USERS, models.PayloadSchemaType.KEYWORD),
    (ACL_GROUPS, models.PayloadSchemaType.KEYWORD),
)

#: the payload index of a metadata field declared with each type (store.metadata_indexes)
_METADATA_SCHEMAS: dict[str, tuple[models.PayloadSchemaType, Any]] = {
    "keyword": (models.PayloadSchemaType.KEYWORD, models.PayloadSchemaType.KEYWORD),
    "integer": (
        models.PayloadSchemaType.INTEGER,
        models.IntegerIndexParams(type=models.IntegerIndexType.INTEGER, lookup=True, range=True),
    ),
    "float": (models.PayloadSchemaType.FLOAT, models.PayloadSchemaType.FLOAT),
    "bool": (models.PayloadSchemaType.BOOL, models.PayloadSchemaType.BOOL),
}

#: HTTP statuses that mean "try again later" rather than "the request is wrong"
_RETRIABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_RETRIABLE_GRPC = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
#: RuntimeErrors of local mode that are about reaching the storage folder
_LOCAL_UNAVAILABLE = ("already accessed by another instance", "instance is closed")

#: how long build_index waits at most for a server to finish optimizing
_INDEX_WAIT_SECONDS = 60.0


class QdrantStore(VectorStore):
    """Two collections, ``<collection>`` (the chunks) and ``<collection>__registry``, reached through qdrant-client.

    Exactly one of ``url`` (a server), ``path`` (local mode persisted in a folder) or ``location`` (":memory:").
    """

    def __init__(
        self,
        collection: str,
        *,
        url: str | None = None,
        path: str | Path | None = None,
        location: str | None = None,
        api_key: str | None = None,
        prefer_grpc: bool = False,
        grpc_port: int = 6334,
        timeout_seconds: float = 10.0,
        hnsw: HnswParams = HnswParams(),
        hnsw_ef: int = 128,
        layout: VectorLayout = VectorLayout(),
        shard_number: int = 1,
        replication_factor: int = 1,
        write_consistency_factor: int = 1,
        metadata_indexes: Mapping[str, str] | None = None,
    ) -> None:
        #: metadata key -> declared index type (store.metadata_indexes)
        self._metadata_indexes = dict(metadata_indexes or {})
        if sum(x is not None for x in (url, path, location)) != 1:
            raise ConfigurationError("QdrantStore needs exactly one of url (server), path or location (local mode)")
        self._collection = collection
        self._registry = registry_name(collection)
        self._url = url
        self._path = Path(path) if path is not None else None
        self._location = location
        self._api_key = api_key
        self._prefer_grpc = prefer_grpc
        self._grpc_port = grpc_port
        self._timeout = timeout_seconds
        self._hnsw = hnsw
        self._hnsw_ef = hnsw_ef
        self._layout = layout
        #: every new collection's distribution over a Qdrant cluster (local mode accepts and ignores it)
        self._cluster = {
            "shard_number": shard_number,
            "replication_factor": replication_factor,
            "write_consistency_factor": write_consistency_factor,
        }
        self._client: AsyncQdrantClient | None = None
        self._model = ""
        self._dim = 0
        #: the tokenizer record of the chunk collection's sparse vectors; None: one unnamed dense vector only
        self._sparse: dict[str, Any] | None = None

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> QdrantStore:
        if settings.url:
            where: dict[str, Any] = {"url": settings.url}
        elif settings.local_path is not None:
            where = {"path": settings.local_path}
        else:
            raise ConfigurationError(
                "store.backend is 'qdrant' but neither VECTORSTREAM_STORE__URL (a Qdrant server) nor "
                "VECTORSTREAM_STORE__LOCAL_PATH (qdrant-client local mode) is set"
            )
        return cls(
            settings.collection,
            **where,
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            prefer_grpc=settings.prefer_grpc,
            grpc_port=settings.grpc_port,
            timeout_seconds=settings.timeout_seconds,
            hnsw=hnsw_from_settings(settings),
            hnsw_ef=settings.hnsw_ef,
            layout=layout_from_settings(settings),
            shard_number=settings.shard_number,
            replication_factor=settings.replication_factor,
            write_consistency_factor=settings.write_consistency_factor,
            metadata_indexes=settings.metadata_index_map,
        )

    @property
    def is_local(self) -> bool:
        return self._url is None

    # --- lifecycle ------------------------------------------------------------------------------------------

    @property
    def sparse_record(self) -> dict[str, Any] | None:
        return self._sparse

    async def open(self, *, model: str, dim: int, sparse: dict[str, Any] | None = None) -> StoreInfo:
        if self._client is None:
            self._client = await self._guard("connect", self._connect)
        try:
            stored = await self._ensure_registry()
            check_meta(stored, model=model, dim=dim, collection=self._collection, remedy=self._remedy())
            record = resolve_sparse(stored, sparse, collection=self._collection, remedy=self._remedy())
            await self._ensure_chunks(dim, named=record is not None)
            self._sparse = record
            if stored is None:
                payload = meta_payload(model, dim, record)
                meta = models.PointStruct(id=META_POINT_ID, vector=REGISTRY_VECTOR, payload=payload)
                await self._call("write meta", lambda c: c.upsert(self._registry, [meta], wait=True))
                log.info("created qdrant collection %r (model %s, dim %d)", self._collection, model, dim)
            self._model, self._dim = model, dim
            return StoreInfo(
                model=model,
                dim=dim,
                chunk_count=await self.count(),
                extra={"backend": "qdrant", "mode": "local" if self.is_local else "server", "where": self._where()},
            )
        except BaseException:
            if not self._model:  # a failed first open leaves nothing behind
                await self.close()
            raise

    async def close(self) -> None:
        client, self._client = self._client, None
        self._model = ""
        if client is not None:
            try:
                await client.close()
            except Exception as exc:  # closing a connection that is already gone is not worth failing over
                log.debug("closing the qdrant client failed: %s", exc)

    async def _connect(self) -> AsyncQdrantClient:
        if self._url is not None:
            return AsyncQdrantClient(
                url=self._url,
                api_key=self._api_key,
                prefer_grpc=self._prefer_grpc,
                grpc_port=self._grpc_port,
                timeout=max(1, math.ceil(self._timeout)),
                check_compatibility=False,  # would be a blocking request inside the event loop
            )
        if self._path is not None:
            self._path.mkdir(parents=True, exist_ok=True)
            return AsyncQdrantClient(path=str(self._path))
        return AsyncQdrantClient(location=self._location)

    async def _ensure_registry(self) -> dict[str, Any] | None:
        """Create the registry if missing; return the meta point's payload (None on a new collection)."""
        if not await self._call("check registry", lambda c: c.collection_exists(self._registry)):
            await self._create_collection(
                self._registry,
                vectors_config=models.VectorParams(size=len(REGISTRY_VECTOR), distance=models.Distance.DOT),
                hnsw_config=models.HnswConfigDiff(m=0),  # looked up by id only: no graph
            )
            return None
        records = await self._call(
            "read meta",
            lambda c: c.retrieve(self._registry, [META_POINT_ID], with_payload=True, with_vectors=False),
        )
        return dict(records[0].payload or {}) if records else None

    async def _ensure_chunks(self, dim: int, *, named: bool) -> None:
        """A dense-only collection has one unnamed vector (as every collection made before sparse vectors);
        one with sparse vectors names its dense vector DENSE_VECTOR and adds SPARSE_VECTOR (IDF modifier)."""
        if await self._call("check collection", lambda c: c.collection_exists(self._collection)):
            info = await self._call("read collection", lambda c: c.get_collection(self._collection))
            params: Any = info.config.params.vectors
            if named:
                params = params.get(DENSE_VECTOR) if isinstance(params, dict) else None
                if SPARSE_VECTOR not in (info.config.params.sparse_vectors or {}):
                    params = None
            size = params.size if isinstance(params, models.VectorParams) else None
            distance = params.distance if isinstance(params, models.VectorParams) else None
            if size != dim or distance != models.Distance.COSINE:
                raise ModelMismatchError(
                    f"collection {self._collection!r} holds vectors of size {size} ({distance}), not {dim}-dim "
                    f"cosine vectors. Either set VECTORSTREAM_STORE__COLLECTION to another collection name, "
                    f"or {self._remedy()} and re-ingest the documents."
                )
            existing = dict(info.payload_schema or {})
        else:
            layout = self._layout
            quantization = None
            if layout.quantized:
                quantization = models.ScalarQuantization(
                    scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True)
                )
            dense = models.VectorParams(
                size=dim, distance=models.Distance.COSINE, on_disk=layout.vectors_on_disk or None
            )
            await self._create_collection(
                self._collection,
                vectors_config={DENSE_VECTOR: dense} if named else dense,
                sparse_vectors_config=(
                    {SPARSE_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)} if named else None
                ),
                hnsw_config=models.HnswConfigDiff(
                    m=self._hnsw.m,
                    ef_construct=self._hnsw.ef_construct,
                    full_scan_threshold=self._hnsw.full_scan_threshold_kb,
                    on_disk=layout.hnsw_on_disk or None,
                ),
                quantization_config=quantization,
                optimizers_config=models.OptimizersConfigDiff(max_segment_size=layout.max_segment_size_kb),
            )
            existing = {}
        if self.is_local:
            # local mode has no payload indexes (and warns when asked for one): every filter scans the payloads
            if self._metadata_indexes:
                log.info("qdrant-client local mode keeps no payload indexes: store.metadata_indexes is not used")
            return
        wanted: list[tuple[str, Any]] = list(_CHUNK_INDEXES)
        for key, kind in self._metadata_indexes.items():
            name = f"{META_PREFIX}.{key}"
            data_type, schema = _METADATA_SCHEMAS[kind]
            if name in existing and existing[name].data_type != data_type:
                # the declaration changed type: the old index would serve the filters wrongly typed
                log.info("metadata index %s: %s becomes %s", name, existing[name].data_type, kind)
                drop = functools.partial(
                    AsyncQdrantClient.delete_payload_index,
                    collection_name=self._collection,
                    field_name=name,
                    wait=True,
                )
                await self._call(f"drop index {name}", drop)
                del existing[name]
            wanted.append((name, schema))
        for field_name, schema in wanted:
            if field_name not in existing:
                create = functools.partial(
                    AsyncQdrantClient.create_payload_index,
                    collection_name=self._collection,
                    field_name=field_name,
                    field_schema=schema,
                    wait=True,
                )
                await self._call(f"create index {field_name}", create)

    async def _create_collection(self, name: str, **config: Any) -> None:
        """Create ``name`` with the configured sharding, replication and write consistency: the chunks and the
        registry alike (a registry with one replica stops every worker's ingest when its node is down)."""
        config = {**self._cluster, **config}
        try:
            await self._call(f"create {name}", lambda c: c.create_collection(name, **config))
        except (UnexpectedResponse, grpc.RpcError, ValueError) as exc:
            # another worker created it in between (REST 409, gRPC ALREADY_EXISTS, local mode ValueError)
            if not await self._call(f"check {name}", lambda c: c.collection_exists(name)):
                raise
            log.debug("collection %s was created concurrently: %s", name, exc)

    def _remedy(self) -> str:
        if self.is_local:
            return f"stop the workers, delete the folder {self._where()}"
        return f"delete the collections {self._collection!r} and {self._registry!r} on {self._url}"

    def _where(self) -> str:
        return self._url or (str(self._path) if self._path is not None else str(self._location))

    # --- registry -------------------------------------------------------------------------------------------

    async def get_doc_states(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], DocState]:
        if not keys:
            return {}
        ids = doc_state_ids(keys)
        records = await self._call(
            "read doc states", lambda c: c.retrieve(self._registry, ids, with_payload=True, with_vectors=False)
        )
        return doc_states_by_key(keys, (r.payload or {} for r in records))

    async def put_doc_states(self, states: Sequence[DocState]) -> None:
        if not states:
            return
        points = [
            models.PointStruct(
                id=doc_point_id(s.tenant_id, s.doc_id), vector=REGISTRY_VECTOR, payload=doc_state_payload(s)
            )
            for s in states
        ]
        await self._call("write doc states", lambda c: c.upsert(self._registry, points, wait=True))

    # --- chunks ---------------------------------------------------------------------------------------------

    async def upsert_chunks(self, points: Sequence[ChunkPoint]) -> None:
        if not points:
            return
        structs = [models.PointStruct(id=p.id, vector=self._point_vector(p), payload=dict(p.payload)) for p in points]
        await self._call("upsert chunks", lambda c: c.upsert(self._collection, structs, wait=True))

    def _point_vector(self, point: ChunkPoint) -> Any:
        dense = as_floats(point.vector)
        if self._sparse is None:
            return dense
        vectors: dict[str, Any] = {DENSE_VECTOR: dense}
        if point.sparse:  # a chunk without a single term has no sparse vector
            vectors[SPARSE_VECTOR] = _qdrant_sparse(point.sparse)
        return vectors

    async def delete_chunks(self, tenant_id: str, doc_id: str, *, below_version: int | None = None) -> None:
        flt = _qdrant_filter(doc_chunks_filter(tenant_id, doc_id, below_version=below_version))
        selector = models.FilterSelector(filter=flt)
        await self._call("delete chunks", lambda c: c.delete(self._collection, points_selector=selector, wait=True))

    async def get_vectors(self, ids: Sequence[str]) -> dict[str, list[float]]:
        if not ids:
            return {}
        unique = list(dict.fromkeys(ids))
        records = await self._call(
            "read vectors", lambda c: c.retrieve(self._collection, unique, with_payload=False, with_vectors=True)
        )
        vectors = ((str(r.id), dense_floats(r.vector)) for r in records)
        return {point_id: vector for point_id, vector in vectors if vector is not None}

    async def count(self, flt: Filter | None = None) -> int:
        result = await self._call(
            "count", lambda c: c.count(self._collection, count_filter=_qdrant_filter(flt), exact=True)
        )
        return result.count

    async def scroll(self, flt: Filter | None = None, *, limit: int = 10_000) -> list[Hit]:
        qflt = _qdrant_filter(flt)
        hits: list[Hit] = []
        offset: Any = None
        while len(hits) < limit:
            next_page = functools.partial(
                AsyncQdrantClient.scroll,
                collection_name=self._collection,
                scroll_filter=qflt,
                limit=min(SCROLL_PAGE, limit - len(hits)),
                offset=offset,
                with_payload=True,
                with_vectors=False,
            )
            records, offset = await self._call("scroll", next_page)
            hits.extend(Hit(id=str(r.id), score=0.0, payload=dict(r.payload or {})) for r in records)
            if offset is None or not records:
                break
        return hits

    async def search(
        self,
        vector: VectorLike,
        *,
        flt: Filter | None,
        limit: int,
        hnsw_ef: int | None = None,
        exact: bool = False,
        with_vectors: bool = False,
    ) -> list[Hit]:
        params = self._search_params(hnsw_ef, exact)
        query = as_floats(vector)
        using = DENSE_VECTOR if self._sparse is not None else None
        response = await self._call(
            "search",
            lambda c: c.query_points(
                self._collection,
                query=query,
                using=using,
                query_filter=_qdrant_filter(flt),
                search_params=params,
                limit=limit,
                with_payload=True,
                with_vectors=[DENSE_VECTOR] if with_vectors and using else with_vectors,
            ),
        )
        return [
            Hit(
                id=str(p.id),
                score=float(p.score),
                payload=dict(p.payload or {}),
                vector=dense_floats(p.vector) if with_vectors else None,
            )
            for p in response.points
        ]

    def _search_params(self, hnsw_ef: int | None, exact: bool) -> models.SearchParams | None:
        if self.is_local:  # local mode always searches exactly, and warns when given search params
            return None
        quantization = None
        if self._layout.quantized:  # exact search is the ground truth of recall: original vectors only
            quantization = (
                models.QuantizationSearchParams(ignore=True)
                if exact
                else models.QuantizationSearchParams(rescore=True, oversampling=self._layout.oversampling)
            )
        return models.SearchParams(hnsw_ef=hnsw_ef or self._hnsw_ef, exact=exact, quantization=quantization)

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
        if mode == "dense":
            return await super().query(
                mode=mode, vector=vector, sparse=sparse, flt=flt, limit=limit, hnsw_ef=hnsw_ef, exact=exact
            )
        check_sparse_query(mode, vector, sparse, has_sparse=self._sparse is not None, collection=self._collection)
        assert sparse is not None  # checked above
        qflt = _qdrant_filter(flt)
        terms = _qdrant_sparse(sparse)
        if mode == "sparse":
            call = functools.partial(
                AsyncQdrantClient.query_points,
                collection_name=self._collection,
                query=terms,
                using=SPARSE_VECTOR,
                query_filter=qflt,
                limit=limit,
                with_payload=True,
            )
        else:
            assert vector is not None
            candidates = max(hybrid.prefetch_limit, limit)
            fusion: Any = (
                models.RrfQuery(rrf=models.Rrf(k=hybrid.rrf_k))
                if hybrid.fusion == "rrf"
                else models.FusionQuery(fusion=models.Fusion.DBSF)
            )
            call = functools.partial(
                AsyncQdrantClient.query_points,
                collection_name=self._collection,
                prefetch=[
                    models.Prefetch(
                        query=as_floats(vector),
                        using=DENSE_VECTOR,
                        filter=qflt,
                        params=self._search_params(hnsw_ef, exact),
                        limit=candidates,
                    ),
                    models.Prefetch(query=terms, using=SPARSE_VECTOR, filter=qflt, limit=candidates),
                ],
                query=fusion,
                query_filter=qflt,
                limit=limit,
                with_payload=True,
            )
        response = await self._call(f"{mode} search", call)
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in response.points]

    async def build_index(self) -> None:
        """A server indexes by itself: wait (bounded) until it reports no optimization pending."""
        if self.is_local:
            return
        deadline = time.monotonic() + _INDEX_WAIT_SECONDS
        while time.monotonic() < deadline:
            info = await self._call("read collection", lambda c: c.get_collection(self._collection))
            if info.status == models.CollectionStatus.GREEN:
                return
            await asyncio.sleep(0.2)
        log.warning("collection %r still optimizing after %.0f s", self._collection, _INDEX_WAIT_SECONDS)

    # --- plumbing -------------------------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[AsyncQdrantClient], Awaitable[T]]) -> T:
        client = self._client
        if client is None:
            raise StoreUnavailableError(f"qdrant store {self._collection!r} is not open")
        return await self._guard(what, lambda: fn(client))

    async def _guard(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except VectorstreamError:
            raise
        except Exception as exc:
            if _is_unavailable(exc):
                raise StoreUnavailableError(f"qdrant at {self._where()}: {what} failed: {_describe(exc)}") from exc
            raise


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, ResponseHandlingException | ResourceExhaustedResponse | httpx.TransportError):
        return True
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is None or exc.status_code in _RETRIABLE_STATUS
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return exc.code() in _RETRIABLE_GRPC
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _LOCAL_UNAVAILABLE):
        return True
    return isinstance(exc, OSError)  # includes ConnectionError and TimeoutError


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ResponseHandlingException):  # its own str() is empty; the cause is in .source
        return f"{type(exc.source).__name__}: {exc.source}"
    return f"{type(exc).__name__}: {exc}"


def _qdrant_sparse(vector: SparseVector) -> models.SparseVector:
    return models.SparseVector(indices=list(vector.indices), values=list(vector.values))


# --- filter translation -------------------------------------------------------------------------------------


def _qdrant_filter(flt: Filter | None) -> models.Filter | None:
    if flt is None:
        return None
    return models.Filter(
        must=[_qdrant_condition(c) for c in flt.must] or None,
        should=[_qdrant_condition(c) for c in flt.should] or None,
        must_not=[_qdrant_condition(c) for c in flt.must_not] or None,
    )


def _qdrant_condition(cond: Condition) -> Any:
    if isinstance(cond, Filter):
        return _qdrant_filter(cond)
    if isinstance(cond, Match):
        return models.FieldCondition(key=cond.key, match=models.MatchValue(value=cond.value))
    if isinstance(cond, MatchAny):
        return models.FieldCondition(key=cond.key, match=models.MatchAny(any=match_any_values(cond.values)))
    if isinstance(cond, Range):
        return models.FieldCondition(
            key=cond.key, range=models.Range(gt=cond.gt, gte=cond.gte, lt=cond.lt, lte=cond.lte)
        )
    raise TypeError(f"not a filter condition: {cond!r}")
