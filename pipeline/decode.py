"""Turn raw Kafka records into document events, or into a rejection that says why: errors are values.

Each check raises the :class:`~pipeline.errors.BadRecordError` that names the fault (``DecodeError``,
``SchemaError``, ``ContentError``: the class fixes the stage, the error the reason), and
:func:`decode_record` turns it into a :class:`Rejected` at its boundary: nothing here raises for bad input,
and the ingest service sends rejections to the dead-letter topic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline.errors import BadRecordError, ContentError, DecodeError, SchemaError
from schemas.dead_letter import DeadLetterReason as R
from schemas.dead_letter import DeadLetterStage as S
from schemas.events import DocumentDelete, DocumentUpsert, document_event_adapter, parse_document_key


@dataclass(frozen=True)
class Record:
    """A consumed Kafka record, independent of the client library that fetched it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Tombstone:
    """A null-valued record: delete the keyed document whatever its version."""

    tenant_id: str
    doc_id: str


@dataclass(frozen=True)
class Rejected:
    """Why a record can never be processed: what its dead letter says."""

    reason: R
    stage: S
    message: str

    @classmethod
    def of(cls, error: BadRecordError) -> Rejected:
        return cls(error.reason, error.stage, error.message)


#: what a good record decodes to
Event = DocumentUpsert | DocumentDelete | Tombstone
Decoded = Event | Rejected

_PYDANTIC_REASONS: dict[str, R] = {
    "extra_forbidden": R.UNKNOWN_FIELD,
    "missing": R.MISSING_FIELD,
    "union_tag_invalid": R.UNKNOWN_EVENT_TYPE,
    "union_tag_not_found": R.MISSING_FIELD,
}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth_exceeds(obj: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _schema_reason(exc: ValidationError) -> tuple[R, str]:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    kind = first["type"]
    reason = _PYDANTIC_REASONS.get(kind)
    if reason is None:
        reason = R.WRONG_TYPE if kind.endswith("_type") or kind.endswith("_parsing") else R.INVALID_VALUE
    where = ".".join(str(p) for p in first["loc"]) or "event"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return reason, f"{where}: {first['msg']}{more}"


def decode_record(record: Record, *, max_bytes: int, max_depth: int) -> Decoded:
    """Decode one record. Never raises for bad input: returns :class:`Rejected` instead."""
    try:
        return _decode(record, max_bytes=max_bytes, max_depth=max_depth)
    except BadRecordError as exc:
        return Rejected.of(exc)


def _decode(record: Record, *, max_bytes: int, max_depth: int) -> Event:
    """Decode one record or raise the :class:`BadRecordError` that says why not."""
    key_text: str | None = None
    if record.key is not None:
        try:
            key_text = record.key.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(R.BAD_KEY, "record key is not valid UTF-8") from None

    if record.value is None:
        if key_text is None:
            raise DecodeError(R.BAD_KEY, "tombstone without a key: nothing to delete")
        try:
            tenant_id, doc_id = parse_document_key(key_text)
        except ValueError as exc:
            raise DecodeError(R.BAD_KEY, f"tombstone key is not '<tenant_id>/<doc_id>': {exc}") from None
        return Tombstone(tenant_id, doc_id)

    size = len(record.value)
    if size > max_bytes:
        raise DecodeError(R.OVERSIZE, f"message is {size} bytes, the limit is {max_bytes}")
    try:
        text = record.value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(R.INVALID_UTF8, f"value is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise DecodeError(R.TOO_DEEP, f"JSON nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, over-long integer literals, NaN/Infinity
        raise DecodeError(R.INVALID_JSON, f"value is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError(R.NOT_AN_OBJECT, f"a document event is a JSON object, got {type(obj).__name__}")
    if _depth_exceeds(obj, max_depth):
        raise DecodeError(R.TOO_DEEP, f"JSON nests deeper than {max_depth} levels")

    try:
        event = document_event_adapter.validate_python(obj)
    except ValidationError as exc:
        raise SchemaError(*_schema_reason(exc)) from None

    if key_text != event.key:
        raise SchemaError(
            R.KEY_MISMATCH,
            f"record key {key_text!r} does not match the event's '{event.key}' (key must be tenant_id/doc_id)",
        )
    if isinstance(event, DocumentUpsert) and not event.text.strip():
        raise ContentError(R.EMPTY_TEXT, "text is empty or whitespace: nothing to index")
    return event
