"""Dead letters: a record that can never be processed is republished, byte for byte, to the dead-letter
topic with headers that say where it came from, at which stage it failed, and why.
"""

from __future__ import annotations

from enum import StrEnum


class DeadLetterReason(StrEnum):
    """Bounded set of reasons: safe as a metric label."""

    OVERSIZE = "oversize"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    TOO_DEEP = "too_deep"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    BAD_KEY = "bad_key"
    KEY_MISMATCH = "key_mismatch"
    EMPTY_TEXT = "empty_text"
    EMBEDDING_FAILED = "embedding_failed"


class DeadLetterStage(StrEnum):
    DECODE = "decode"
    VALIDATE = "validate"
    CHUNK = "chunk"
    EMBED = "embed"


#: header names on every dead letter (values are UTF-8 strings)
DEAD_LETTER_HEADERS = {
    "source_topic": "vs-source-topic",
    "source_partition": "vs-source-partition",
    "source_offset": "vs-source-offset",
    "source_timestamp_ms": "vs-source-timestamp-ms",
    "stage": "vs-stage",
    "reason": "vs-error-reason",
    "error": "vs-error-message",
}
