"""The vector-store package: the port (``base``), its two adapters, and ``open_store`` to pick one by settings.

It also holds the registry layout both adapters share: how a DocState and the collection's {model, dim} are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigurationError, ModelMismatchError
from pipeline.store.base import (
    ACL_GROUPS,
    ACL_PUBLIC,
    ACL_USERS,
    CHUNK_INDEX,
    CONTENT_HASH,
    DOC,
    META_PREFIX,
    MODEL,
    RESERVED_FIELDS,
    TENANT,
    TEXT,
    TITLE,
    VERSION,
    ChunkPoint,
    Condition,
    DocState,
    Filter,
    Hit,
    HnswParams,
    Match,
    MatchAny,
    Range,
    StoreInfo,
    VectorLayout,
    VectorStore,
    chunk_point_id,
    doc_point_id,
)

if TYPE_CHECKING:
    from pipeline.settings import Settings, StoreSettings

__all__ = [
    "ACL_GROUPS",
    "ACL_PUBLIC",
    "ACL_USERS",
    "CHUNK_INDEX",
    "CONTENT_HASH",
    "DOC",
    "META_PREFIX",
    "MODEL",
    "RESERVED_FIELDS",
    "TENANT",
    "TEXT",
    "TITLE",
    "VERSION",
    "ChunkPoint",
    "Condition",
    "DocState",
    "Filter",
    "Hit",
    "HnswParams",
    "Match",
    "MatchAny",
    "Range",
    "StoreInfo",
    "VectorLayout",
    "VectorStore",
    "chunk_point_id",
    "doc_point_id",
    "open_store",
]


def layout_from_settings(settings: StoreSettings) -> VectorLayout:
    return VectorLayout(
        quantization=settings.quantization,
        oversampling=settings.quantization_oversampling,
        vectors_on_disk=settings.vectors_on_disk,
        hnsw_on_disk=settings.hnsw_on_disk,
        max_segment_size_kb=settings.max_segment_size_kb,
    )


def open_store(settings: Settings | StoreSettings) -> VectorStore:
    """Build the adapter that ``settings.store.backend`` names; the caller still has to ``await open(...)``."""
    store_settings = getattr(settings, "store", settings)
    store: VectorStore
    if store_settings.backend == "edge":
        from pipeline.store.edge import EdgeStore

        store = EdgeStore.from_settings(store_settings)
    elif store_settings.backend == "qdrant":
        from pipeline.store.qdrant import QdrantStore

        store = QdrantStore.from_settings(store_settings)
    else:
        raise ConfigurationError(f"unknown store backend {store_settings.backend!r}: use 'edge' or 'qdrant'")
    if store_settings.fault_file is not None:  # chaos testing only
        from pipeline.store.faulty import FaultyStore

        store = FaultyStore(store, store_settings.fault_file)
    return store


# --- the registry layout, shared by the adapters ------------------------------------------------------------
# The registry is a second collection, ``<collection>__registry``: one point per document (id doc_point_id,
# a one-dimensional dummy vector) whose payload is the DocState, and one meta point recording {model, dim}.

REGISTRY_SUFFIX = "__registry"
#: a fixed id no doc_point_id (uuid5 in another namespace) can take
META_POINT_ID = "00000000-0000-0000-0000-00000000000a"
REGISTRY_VECTOR = [1.0]
_KIND = "kind"


def registry_name(collection: str) -> str:
    return f"{collection}{REGISTRY_SUFFIX}"


def doc_state_payload(state: DocState) -> dict[str, Any]:
    return {
        _KIND: "doc",
        TENANT: state.tenant_id,
        DOC: state.doc_id,
        VERSION: int(state.version),
        "deleted": bool(state.deleted),
        "chunk_count": int(state.chunk_count),
        "chunk_hashes": list(state.chunk_hashes),
    }


def doc_state_from_payload(payload: Mapping[str, Any]) -> DocState:
    return DocState(
        tenant_id=str(payload[TENANT]),
        doc_id=str(payload[DOC]),
        version=int(payload[VERSION]),
        deleted=bool(payload.get("deleted", False)),
        chunk_count=int(payload.get("chunk_count", 0)),
        chunk_hashes=tuple(str(h) for h in payload.get("chunk_hashes") or ()),
    )


def meta_payload(model: str, dim: int) -> dict[str, Any]:
    return {_KIND: "meta", "model": model, "dim": int(dim)}


def check_meta(stored: Mapping[str, Any] | None, *, model: str, dim: int, collection: str, remedy: str) -> None:
    """Raise ModelMismatchError when the collection's recorded {model, dim} differs from the one asked for."""
    if stored is None:
        return
    stored_model, stored_dim = stored.get("model"), stored.get("dim")
    if stored_model == model and stored_dim == dim:
        return
    raise ModelMismatchError(
        f"collection {collection!r} holds vectors of model {stored_model!r} (dim {stored_dim}), "
        f"but this process embeds with model {model!r} (dim {dim}); vectors of two models cannot be mixed. "
        f"Either set VECTORSTREAM_STORE__COLLECTION to another collection name, or {remedy} "
        f"and re-ingest the documents with the new model."
    )
