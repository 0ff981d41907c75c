"""The document registry both Qdrant adapters keep: one point per document holding its DocState, and one
meta point recording the collection's {model, dim} and, when it has sparse vectors, the tokenizer record; how
those payloads look and how a mismatch is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.errors import ModelMismatchError, TokenizerMismatchError
from pipeline.store.base import DOC, TENANT, VERSION, DocState, doc_point_id

log = logging.getLogger(__name__)

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
        "source": list(state.source) if state.source is not None else None,
    }


def source_from_json(value: Any) -> tuple[str, int, int, int] | None:
    """A DocState's ``source`` read back from its stored form (a 4-list); None when absent or malformed."""
    if isinstance(value, list | tuple) and len(value) == 4:
        try:
            return (str(value[0]), int(value[1]), int(value[2]), int(value[3]))
        except (TypeError, ValueError):
            return None
    return None


def doc_state_from_payload(payload: Mapping[str, Any]) -> DocState:
    return DocState(
        tenant_id=str(payload[TENANT]),
        doc_id=str(payload[DOC]),
        version=int(payload[VERSION]),
        deleted=bool(payload.get("deleted", False)),
        chunk_count=int(payload.get("chunk_count", 0)),
        chunk_hashes=tuple(str(h) for h in payload.get("chunk_hashes") or ()),
        source=source_from_json(payload.get("source")),
    )


def doc_state_ids(keys: Sequence[tuple[str, str]]) -> list[str]:
    """The registry point ids of (tenant_id, doc_id) ``keys``, each once, in order."""
    return list(dict.fromkeys(doc_point_id(t, d) for t, d in keys))


def doc_states_by_key(
    keys: Sequence[tuple[str, str]], payloads: Iterable[Mapping[str, Any]]
) -> dict[tuple[str, str], DocState]:
    """The DocStates read back for ``keys`` (registry payloads in any order); a key without one is left out."""
    found = {(s.tenant_id, s.doc_id): s for s in map(doc_state_from_payload, payloads)}
    return {key: found[key] for key in keys if key in found}


def meta_payload(model: str, dim: int, sparse: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The meta point: {model, dim}, and ``sparse`` (the tokenizer record) when the collection has sparse
    vectors; a collection whose meta has no ``sparse`` (all made before them) is dense-only."""
    payload: dict[str, Any] = {_KIND: "meta", "model": model, "dim": int(dim)}
    if sparse is not None:
        payload["sparse"] = dict(sparse)
    return payload


def resolve_sparse(
    stored: Mapping[str, Any] | None, requested: Mapping[str, Any] | None, *, collection: str, remedy: str
) -> dict[str, Any] | None:
    """The tokenizer record the open collection has (None: dense-only), given its stored meta (None: a new
    collection, which gets ``requested``) and this process's record. Raises TokenizerMismatchError when both
    exist and differ: a query tokenized one way never matches chunks tokenized another way."""
    if stored is None:
        return dict(requested) if requested is not None else None
    have = stored.get("sparse")
    if not isinstance(have, Mapping):
        if requested is not None:
            log.warning(
                "collection %r has no sparse vectors (it is dense-only or was made before them): serving dense "
                "search only. README, 'Hybrid search', says how to rebuild it with sparse vectors",
                collection,
            )
        return None
    if requested is not None and not _same_record(have, requested):
        differ = sorted(k for k in set(have) | set(requested) if not _same_value(have.get(k), requested.get(k)))
        raise TokenizerMismatchError(
            f"collection {collection!r} holds sparse vectors made with tokenizer settings "
            f"{ {k: have.get(k) for k in differ} }, but this process is configured with "
            f"{ {k: requested.get(k) for k in differ} }; a query tokenized one way never matches chunks "
            f"tokenized another. Either set VECTORSTREAM_SPARSE__* back to the collection's values, set "
            f"VECTORSTREAM_STORE__COLLECTION to another collection name, or {remedy} and re-ingest the documents."
        )
    return dict(have)


def _same_record(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return set(a) == set(b) and all(_same_value(a[k], b[k]) for k in a)


def _same_value(a: Any, b: Any) -> bool:
    # a stored payload may give 100.0 back as 100: numbers compare as numbers
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool | str):
        return float(a) == float(b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


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
