"""Query requests and replies: what callers publish to the queries topic and read back from a reply topic.

Requests are strict (unknown fields are rejected); replies are read tolerantly so old clients survive new fields.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    field_validator,
    model_validator,
)

from schemas.events import MetaKey, MetaValue, TenantId

#: the reply record carries the request id in this header (and as its key)
CORRELATION_HEADER = "vs-correlation-id"
#: the wire bound of top_k; the server's own cap (settings ``query.max_top_k``) is lower
MAX_TOP_K = 1000
MAX_QUERY_CHARS = 4000
MAX_TOKEN_CHARS = 8192
MAX_FILTER_CONDITIONS = 16
MAX_ANY_VALUES = 100

RequestId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]
#: Kafka's own topic name rule
TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._\-]{1,249}$")]
#: a filter key is checked by the server (pipeline.query_filter), so that naming a reserved field gets the
#: specific error ``forbidden_filter_field`` rather than a generic schema violation
FilterKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
MatchValue = Union[bool, StrictInt, Annotated[str, StringConstraints(max_length=1024)]]
Number = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


# --- the caller's filter language ----------------------------------------------------------------------------


class MatchCondition(_Strict):
    """``metadata[key] == match`` (a list-valued field: the list contains ``match``)."""

    key: FilterKey
    match: MatchValue


class AnyCondition(_Strict):
    """``metadata[key]`` equals (or the list contains) any of ``any``."""

    key: FilterKey
    any: Annotated[
        list[Union[StrictInt, Annotated[str, StringConstraints(max_length=1024)]]],
        Field(min_length=1, max_length=MAX_ANY_VALUES),
    ]


class Bounds(_Strict):
    gt: Number | None = None
    gte: Number | None = None
    lt: Number | None = None
    lte: Number | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> Bounds:
        if self.gt is None and self.gte is None and self.lt is None and self.lte is None:
            raise ValueError("a range needs at least one of gt, gte, lt, lte")
        return self


class RangeCondition(_Strict):
    """``metadata[key]`` is a number within the bounds."""

    key: FilterKey
    range: Bounds


FilterCondition = Union[MatchCondition, AnyCondition, RangeCondition]
Conditions = Annotated[list[FilterCondition], Field(max_length=MAX_FILTER_CONDITIONS)]


class QueryFilter(_Strict):
    """A filter over the documents' metadata: every ``must``, at least one ``should`` (when any), no ``must_not``.

    The tenant and access rules are not part of it: the server adds them to every search.
    """

    must: Conditions = []
    should: Conditions = []
    must_not: Conditions = []


class SearchParams(_Strict):
    #: HNSW beam width at query time; the server's default applies when absent, and a cap bounds it
    hnsw_ef: Annotated[int, Field(ge=1, le=4096)] | None = None
    #: exact (brute-force) search over the caller's readable chunks instead of HNSW
    exact: bool = False


#: how a query searches: ``dense`` (the embedding), ``sparse`` (BM25 over the chunks' terms) or ``hybrid``
#: (both, fused inside the vector store)
SearchMode = Literal["dense", "sparse", "hybrid"]
#: how hybrid fuses its two candidate lists: reciprocal rank fusion, or distribution-based score fusion
FusionMethod = Literal["rrf", "dbsf"]


class QueryRequest(_Strict):
    """A question. The tenant and the caller's principals come from ``token``, checked against ``tenant_id``."""

    request_id: RequestId
    tenant_id: TenantId
    #: a signed token (JWT) naming the tenant, the user and the user's groups; missing -> ``unauthenticated``
    token: Annotated[str, StringConstraints(max_length=MAX_TOKEN_CHARS)] | None = None
    query: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS)]
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] = 10
    filter: QueryFilter | None = None
    search: SearchParams | None = None
    #: absent: ``hybrid`` when the collection has sparse vectors, else ``dense``. A mode the collection or the
    #: store cannot serve is answered ``mode_unsupported``, never served in another mode
    mode: SearchMode | None = None
    #: the fusion of a hybrid query; absent: ``rrf``. Only with mode hybrid (or absent)
    fusion: FusionMethod | None = None
    #: what each hit carries besides doc id, chunk index, score and title
    with_text: bool = True
    with_metadata: bool = True
    #: where the reply goes: the tenant's own reply topic, ``<replies topic prefix>.<tenant_id>``
    #: (see :func:`reply_topic_for`); the server writes nowhere else
    reply_topic: TopicName
    #: epoch milliseconds; a request that arrives after it is dropped without a reply
    deadline_ms: Annotated[int, Field(ge=0, le=2**53)]

    @field_validator("query")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        if not value.strip():
            raise ValueError("must contain some text")
        return value

    @model_validator(mode="after")
    def _fusion_needs_hybrid(self) -> QueryRequest:
        if self.fusion is not None and self.mode in ("dense", "sparse"):
            raise ValueError(f"fusion {self.fusion!r} applies to mode 'hybrid' only, not {self.mode!r}")
        return self


# --- replies ---------------------------------------------------------------------------------------------------


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHENTICATED = "unauthenticated"
    TOKEN_EXPIRED = "token_expired"
    TENANT_MISMATCH = "tenant_mismatch"
    FORBIDDEN_FILTER_FIELD = "forbidden_filter_field"
    TOP_K_TOO_LARGE = "top_k_too_large"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    #: the request asked for a search mode (sparse, hybrid) the collection or the store does not have
    MODE_UNSUPPORTED = "mode_unsupported"


#: codes a caller may retry as they are (with a fresh deadline)
RETRIABLE_CODES = frozenset({ErrorCode.OVERLOADED, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.UNAVAILABLE})


class QueryHit(_Tolerant):
    doc_id: str
    chunk_index: int
    #: cosine similarity (dense), the BM25 score (sparse), or the fused score (hybrid: RRF or DBSF)
    score: float
    title: str = ""
    text: str | None = None
    metadata: dict[MetaKey, MetaValue] | None = None


class QueryResult(_Tolerant):
    status: Literal["ok"] = "ok"
    request_id: str
    hits: list[QueryHit]
    #: from the request's arrival at the server to the reply being ready
    took_ms: float
    model: str
    #: the mode that served the request (replies of servers before hybrid search carry none)
    mode: SearchMode | None = None
    #: the fusion of a hybrid reply
    fusion: FusionMethod | None = None


class QueryError(_Tolerant):
    code: ErrorCode
    message: str
    retriable: bool = False


class QueryFailure(_Tolerant):
    status: Literal["error"] = "error"
    #: the request's id, or its record key when the request could not be read
    request_id: str
    error: QueryError
    took_ms: float = 0.0


QueryReply = Annotated[Union[QueryResult, QueryFailure], Field(discriminator="status")]
query_reply_adapter: TypeAdapter[QueryResult | QueryFailure] = TypeAdapter(QueryReply)


def reply_topic_for(prefix: str, tenant_id: str) -> str:
    """The reply topic of ``tenant_id``: one per tenant, so that a Kafka ACL can give each tenant its own.

    Tenant ids may contain ``.``, so a tenant has exactly this topic and no topics under it (``<prefix>.a.b``
    is tenant ``a.b``'s, not one of tenant ``a``'s)."""
    return f"{prefix}.{tenant_id}"


def failure(request_id: str, code: ErrorCode, message: str, took_ms: float = 0.0) -> QueryFailure:
    return QueryFailure(
        request_id=request_id,
        error=QueryError(code=code, message=message[:2000], retriable=code in RETRIABLE_CODES),
        took_ms=took_ms,
    )
