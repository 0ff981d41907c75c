"""What the Qdrant adapters share that is not part of the port: settings read into the port's parameter
objects, the filter that selects one document's chunks, vectors in and out as plain float lists, match-any
values as Qdrant takes them, and the scroll page size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.store.base import (
    DENSE_VECTOR,
    DOC,
    TENANT,
    VERSION,
    Condition,
    Filter,
    HnswParams,
    Match,
    Range,
    VectorLayout,
    VectorLike,
)

if TYPE_CHECKING:
    from pipeline.settings import StoreSettings

#: points per scroll request
SCROLL_PAGE = 1_000


def layout_from_settings(settings: StoreSettings) -> VectorLayout:
    return VectorLayout(
        quantization=settings.quantization,
        oversampling=settings.quantization_oversampling,
        vectors_on_disk=settings.vectors_on_disk,
        hnsw_on_disk=settings.hnsw_on_disk,
        max_segment_size_kb=settings.max_segment_size_kb,
    )


def hnsw_from_settings(settings: StoreSettings) -> HnswParams:
    return HnswParams(
        m=settings.hnsw_m,
        ef_construct=settings.hnsw_ef_construct,
        full_scan_threshold_kb=settings.full_scan_threshold_kb,
    )


def doc_chunks_filter(tenant_id: str, doc_id: str, *, below_version: int | None = None) -> Filter:
    """The chunks of one document: all of them, or those whose version is below ``below_version``."""
    must: list[Condition] = [Match(TENANT, tenant_id), Match(DOC, doc_id)]
    if below_version is not None:
        must.append(Range(VERSION, lt=below_version))
    return Filter(must=tuple(must))


def as_floats(vector: VectorLike) -> list[float]:
    """A vector as the list of Python floats the clients send (numpy arrays included)."""
    tolist = getattr(vector, "tolist", None)  # numpy arrays
    return [float(x) for x in (tolist() if tolist is not None else vector)]


def dense_floats(vector: object) -> list[float] | None:
    """The dense vector a client returned for a point as floats: the unnamed one of a dense-only collection,
    or the one named DENSE_VECTOR of a collection with sparse vectors; None when there is none, or it is a
    multi-vector."""
    if isinstance(vector, dict):
        vector = vector.get(DENSE_VECTOR)
    if not isinstance(vector, list) or (vector and isinstance(vector[0], list)):
        return None
    return [float(x) for x in vector]


def match_any_values(values: tuple[str | int, ...]) -> list[str] | list[int]:
    """``values`` as Qdrant's match-any takes them: all keywords or all integers, never a mix."""
    strings = [v for v in values if isinstance(v, str)]
    if len(strings) == len(values):
        return strings
    integers = [v for v in values if isinstance(v, int)]
    if len(integers) == len(values):
        return integers
    raise ValueError(f"a match-any condition takes only strings or only integers, not both: {values!r}")


def check_sparse_query(mode: str, vector: object, sparse: object, *, has_sparse: bool, collection: str) -> None:
    """What both Qdrant adapters check before a sparse or hybrid search: the collection has sparse vectors
    (ModeUnsupportedError, the caller's error reply, otherwise) and the call carries the vectors the mode needs."""
    from pipeline.errors import ModeUnsupportedError

    if not has_sparse:
        raise ModeUnsupportedError(
            f"collection {collection!r} has no sparse vectors (it is dense-only or was made before them): "
            f"it serves mode 'dense' only, not {mode!r}"
        )
    if sparse is None or (mode == "hybrid" and vector is None):
        raise ValueError(f"a {mode} search needs {'both vectors' if mode == 'hybrid' else 'a sparse vector'}")
