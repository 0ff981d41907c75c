"""Wire contracts of vectorstream: pydantic v2 models for document events, dead letters, queries and replies.

JSON Schema files generated from these models live in ``schemas/json`` for producers in other languages.
"""

from schemas.dead_letter import DEAD_LETTER_HEADERS, DeadLetterReason
from schemas.events import (
    AccessControl,
    DocumentDelete,
    DocumentEvent,
    DocumentUpsert,
    document_key,
    parse_document_key,
)
from schemas.queries import (
    CORRELATION_HEADER,
    ErrorCode,
    QueryFailure,
    QueryFilter,
    QueryHit,
    QueryReply,
    QueryRequest,
    QueryResult,
    query_reply_adapter,
)

__all__ = [
    "CORRELATION_HEADER",
    "DEAD_LETTER_HEADERS",
    "AccessControl",
    "DeadLetterReason",
    "DocumentDelete",
    "DocumentEvent",
    "DocumentUpsert",
    "ErrorCode",
    "QueryFailure",
    "QueryFilter",
    "QueryHit",
    "QueryReply",
    "QueryRequest",
    "QueryResult",
    "document_key",
    "parse_document_key",
    "query_reply_adapter",
]
