"""Wire contracts of vectorstream: pydantic v2 models for document events and dead letters.

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

__all__ = [
    "DEAD_LETTER_HEADERS",
    "AccessControl",
    "DeadLetterReason",
    "DocumentDelete",
    "DocumentEvent",
    "DocumentUpsert",
    "document_key",
    "parse_document_key",
]
