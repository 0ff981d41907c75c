"""The vector-store port: the only interface the ingest and query logic use to reach Qdrant.

Adapters (Qdrant Edge in-process, Qdrant server / local mode through qdrant-client) implement it; the
contract suite in ``tests/contract`` runs the same scenarios against each and asserts the same results.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, Union

import numpy as np
from numpy.typing import NDArray

from pipeline.errors import ModeUnsupportedError

#: what the port accepts as a vector: a sequence of floats or a numpy array (what the embedder returns)
VectorLike: TypeAlias = Union[Sequence[float], NDArray[np.floating[Any]]]

# --- ids --------------------------------------------------------------------------------------------------

_NAMESPACE = uuid.UUID("6f1c1e1e-5b1a-4f0e-9d59-7a3c2b9f1d10")


def chunk_point_id(tenant_id: str, doc_id: str, chunk_index: int) -> str:
    """Deterministic id of a chunk: a replay overwrites instead of duplicating."""
    return str(uuid.uuid5(_NAMESPACE, f"chunk\x1f{tenant_id}\x1f{doc_id}\x1f{chunk_index}"))


def doc_point_id(tenant_id: str, doc_id: str) -> str:
    """Deterministic id of a document's state record in the registry."""
    return str(uuid.uuid5(_NAMESPACE, f"doc\x1f{tenant_id}\x1f{doc_id}"))


# --- payload layout (one place, so adapters, ingest and query agree) ----------------------------------------

TENANT = "tenant_id"
DOC = "doc_id"
VERSION = "version"
CHUNK_INDEX = "chunk_index"
TITLE = "title"
TEXT = "text"
CONTENT_HASH = "content_hash"
MODEL = "model"
ACL_PUBLIC = "acl_public"
ACL_USERS = "acl_users"
ACL_GROUPS = "acl_groups"
#: caller metadata lives under this prefix: metadata {"lang": "en"} is payload key "meta.lang"
META_PREFIX = "meta"
#: fields a caller's filter may never name
RESERVED_FIELDS = frozenset({TENANT, DOC, VERSION, ACL_PUBLIC, ACL_USERS, ACL_GROUPS, MODEL, CONTENT_HASH})


# --- a store-neutral filter language; adapters translate it -----------------------------------------------


@dataclass(frozen=True)
class Match:
    """``key == value`` (for a list-valued payload: the list contains value)."""

    key: str
    value: str | int | bool


@dataclass(frozen=True)
class MatchAny:
    """``key`` equals (or the list contains) any of ``values``."""

    key: str
    values: tuple[str | int, ...]


@dataclass(frozen=True)
class Range:
    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class Filter:
    must: tuple[Condition, ...] = ()
    should: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()


Condition = Union[Match, MatchAny, Range, Filter]


# --- records ------------------------------------------------------------------------------------------------

#: how a query searches: the dense vector, the BM25 sparse vector, or both fused in the engine
SearchMode = Literal["dense", "sparse", "hybrid"]
#: how hybrid fuses its two candidate lists: reciprocal rank fusion or distribution-based score fusion
FusionMethod = Literal["rrf", "dbsf"]
#: the names of the two vectors of a collection with sparse vectors (a dense-only one has one unnamed vector)
DENSE_VECTOR = "dense"
SPARSE_VECTOR = "bm25"


@dataclass(frozen=True)
class SparseVector:
    """Term ids (ascending, distinct) and their weights: a BM25 vector of :mod:`pipeline.sparse`."""

    indices: tuple[int, ...]
    values: tuple[float, ...]

    def __bool__(self) -> bool:
        return bool(self.indices)


@dataclass(frozen=True)
class HybridParams:
    """How a sparse or hybrid search runs: the fusion, RRF's ``k``, and how many candidates each prefetch
    (dense, sparse) hands to the fusion (at least the search's limit)."""

    fusion: FusionMethod = "rrf"
    rrf_k: int = 60
    prefetch_limit: int = 100


@dataclass(frozen=True)
class ChunkPoint:
    id: str
    vector: VectorLike
    payload: dict[str, Any]
    #: the chunk's BM25 vector; written only to a collection that has sparse vectors (None: none)
    sparse: SparseVector | None = None


@dataclass(frozen=True)
class DocState:
    """What the registry remembers of a document: versions only move forward, deletes leave a tombstone."""

    tenant_id: str
    doc_id: str
    version: int
    deleted: bool = False
    chunk_count: int = 0
    #: content hash of each chunk, by index: lets an update reuse unchanged chunks' vectors
    chunk_hashes: tuple[str, ...] = ()
    #: where in the log the event that produced this state sits: (topic, partition, offset, timestamp_ms or -1);
    #: None for states written before it was recorded. A replayed tombstone is recognised by it (see resolve)
    source: tuple[str, int, int, int] | None = None


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any]
    vector: Sequence[float] | None = None


@dataclass(frozen=True)
class HnswParams:
    m: int = 16
    ef_construct: int = 128
    full_scan_threshold_kb: int = 10  # the Qdrant server refuses less (pipeline.settings.QDRANT_SERVER_LIMITS)


@dataclass(frozen=True)
class VectorLayout:
    """How vectors and the graph are kept: what makes a million chunks fit one machine.

    ``quantization="int8"`` keeps a scalar-quantized copy of every vector (a quarter of the size) that the
    search walks, then rescores ``oversampling`` x ``limit`` candidates with the original vectors; with
    ``vectors_on_disk`` those originals are memory-mapped instead of held in RAM.

    ``max_segment_size_kb`` caps how large (in KB of vectors) the optimizer lets one segment grow by merging.
    Every index build rebuilds the graph of the segment it merges into, so without a cap each build covers
    the whole store and takes longer as the store grows; with it a build never covers more than the cap.
    """

    quantization: str = "none"
    oversampling: float = 2.0
    vectors_on_disk: bool = False
    hnsw_on_disk: bool = False
    max_segment_size_kb: int | None = None

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


@dataclass(frozen=True)
class StoreInfo:
    model: str
    dim: int
    chunk_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class VectorStore(abc.ABC):
    """All methods confirm before they return (writes are ``wait=True``).

    Failures to reach the store raise :class:`pipeline.errors.StoreUnavailableError` (retriable);
    a collection built by another model raises :class:`pipeline.errors.ModelMismatchError`.
    """

    @abc.abstractmethod
    async def open(self, *, model: str, dim: int, sparse: dict[str, Any] | None = None) -> StoreInfo:
        """Create the chunk collection (HNSW, payload indexes) and the registry if missing, then check that
        the collection was built by ``model`` with vectors of size ``dim``.

        ``sparse`` is the tokenizer record of this process's BM25 vectors. A new collection gets sparse
        vectors when it is given; an existing one with sparse vectors refuses a different record
        (TokenizerMismatchError) and keeps its own when given None; one without them (dense-only, or made
        before sparse vectors existed) stays dense-only. :attr:`sparse_record` tells which."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def get_doc_states(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], DocState]: ...

    @abc.abstractmethod
    async def put_doc_states(self, states: Sequence[DocState]) -> None: ...

    @abc.abstractmethod
    async def upsert_chunks(self, points: Sequence[ChunkPoint]) -> None: ...

    @abc.abstractmethod
    async def delete_chunks(self, tenant_id: str, doc_id: str, *, below_version: int | None = None) -> None:
        """Remove a document's chunks: all of them, or only those whose version is below ``below_version``."""

    @abc.abstractmethod
    async def get_vectors(self, ids: Sequence[str]) -> dict[str, list[float]]: ...

    @abc.abstractmethod
    async def count(self, flt: Filter | None = None) -> int:
        """Exact number of chunk points matching ``flt``."""

    @abc.abstractmethod
    async def scroll(self, flt: Filter | None = None, *, limit: int = 10_000) -> list[Hit]:
        """Chunk points (payload, no vector) matching ``flt``; score is 0."""

    @abc.abstractmethod
    async def search(
        self,
        vector: VectorLike,
        *,
        flt: Filter | None,
        limit: int,
        hnsw_ef: int | None = None,
        exact: bool = False,
        with_vectors: bool = False,
    ) -> list[Hit]: ...

    @property
    def sparse_record(self) -> dict[str, Any] | None:
        """The tokenizer record of the open collection's sparse vectors (:meth:`pipeline.sparse.TokenizerConfig
        .record`), or None when the collection has none (a dense-only or pre-hybrid collection, pgvector)."""
        return None

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
        """One search in ``mode``, in ONE engine call: dense is :meth:`search`; sparse searches the BM25
        vectors (IDF computed by the engine); hybrid prefetches dense and sparse candidates, each under
        ``flt``, and fuses them in the engine. Raises ModeUnsupportedError where the store cannot serve the
        mode; this default serves dense only."""
        if mode == "dense":
            if vector is None:
                raise ValueError("a dense search needs a vector")
            return await self.search(vector, flt=flt, limit=limit, hnsw_ef=hnsw_ef, exact=exact)
        raise ModeUnsupportedError(f"{type(self).__name__} serves dense search only, not {mode!r}")

    @abc.abstractmethod
    async def build_index(self) -> None:
        """Make sure the HNSW index covers what was written (Edge optimizes; a server does it itself)."""

    async def write_batch(
        self,
        *,
        points: Sequence[ChunkPoint] = (),
        leftovers: Sequence[tuple[str, str, int]] = (),
        deletes: Sequence[tuple[str, str]] = (),
        states: Sequence[DocState] = (),
        upsert_batch_points: int = 512,
    ) -> None:
        """A batch's writes: new chunks (``upsert_batch_points`` a request), then the removal of each
        (tenant, doc, below_version) leftover, then deleted documents' chunks, then the registry records
        (rule 5's order: a crash in between leaves the old or the new version searchable). Adapters with
        transactions (pgvector) make it all-or-nothing."""
        for i in range(0, len(points), max(1, upsert_batch_points)):
            await self.upsert_chunks(points[i : i + upsert_batch_points])
        for tenant_id, doc_id, below in leftovers:
            await self.delete_chunks(tenant_id, doc_id, below_version=below)
        for tenant_id, doc_id in deletes:
            await self.delete_chunks(tenant_id, doc_id)
        await self.put_doc_states(states)
