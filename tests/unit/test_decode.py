"""Every kind of bad record maps to a dead-letter reason; good records decode to events."""

import json

import pytest

from pipeline.decode import Record, Rejected, Tombstone, decode_record
from pipeline.errors import EmbeddingError, SchemaError
from schemas.dead_letter import DeadLetterReason as R
from schemas.dead_letter import DeadLetterStage as S
from schemas.events import DocumentDelete, DocumentUpsert

GOOD = {"type": "upsert", "tenant_id": "acme", "doc_id": "d1", "version": 1, "text": "hello"}


def rec(value, key=b"acme/d1"):
    if isinstance(value, dict):
        value = json.dumps(value).encode()
    return Record("docs", 0, 7, key, value)


def dec(value, key=b"acme/d1", **kw):
    kw.setdefault("max_bytes", 10_000)
    kw.setdefault("max_depth", 8)
    return decode_record(rec(value, key), **kw)


def test_good_upsert_decodes():
    ev = dec(GOOD)
    assert isinstance(ev, DocumentUpsert)
    assert (ev.tenant_id, ev.doc_id, ev.version, ev.text) == ("acme", "d1", 1, "hello")


def test_delete_decodes():
    ev = dec({"type": "delete", "tenant_id": "acme", "doc_id": "d1", "version": 9})
    assert isinstance(ev, DocumentDelete) and ev.version == 9


def test_tombstone_is_a_delete_of_the_keyed_document():
    assert dec(None, key=b"acme/some/doc") == Tombstone("acme", "some/doc")


BAD = [
    ("oversize", b"x" * 20_000, b"acme/d1", R.OVERSIZE),
    ("invalid utf-8", b"\xff\xfe\x00", b"acme/d1", R.INVALID_UTF8),
    ("not json", b"{type: upsert", b"acme/d1", R.INVALID_JSON),
    (
        "NaN literal",
        b'{"type":"upsert","tenant_id":"acme","doc_id":"d1","version":NaN,"text":"x"}',
        b"acme/d1",
        R.INVALID_JSON,
    ),
    ("huge integer literal", b'{"version": ' + b"9" * 5000 + b"}", b"acme/d1", R.INVALID_JSON),
    ("deeply nested", b'{"a":' * 40 + b"1" + b"}" * 40, b"acme/d1", R.TOO_DEEP),
    ("array", b"[1,2,3]", b"acme/d1", R.NOT_AN_OBJECT),
    ("string", b'"hello"', b"acme/d1", R.NOT_AN_OBJECT),
    ("unknown type", {**GOOD, "type": "merge"}, b"acme/d1", R.UNKNOWN_EVENT_TYPE),
    ("no type", {k: v for k, v in GOOD.items() if k != "type"}, b"acme/d1", R.MISSING_FIELD),
    ("unknown field", {**GOOD, "colour": "red"}, b"acme/d1", R.UNKNOWN_FIELD),
    ("missing text", {k: v for k, v in GOOD.items() if k != "text"}, b"acme/d1", R.MISSING_FIELD),
    ("version as string", {**GOOD, "version": "1"}, b"acme/d1", R.WRONG_TYPE),
    ("version negative", {**GOOD, "version": -1}, b"acme/d1", R.INVALID_VALUE),
    ("version too big", {**GOOD, "version": 2**60}, b"acme/d1", R.INVALID_VALUE),
    ("text as number", {**GOOD, "text": 5}, b"acme/d1", R.WRONG_TYPE),
    ("tenant charset", {**GOOD, "tenant_id": "ac/me"}, b"ac/me/d1", R.INVALID_VALUE),
    ("tenant too long", {**GOOD, "tenant_id": "a" * 65}, b"a" * 65 + b"/d1", R.INVALID_VALUE),
    ("nested metadata", {**GOOD, "metadata": {"a": {"b": 1}}}, b"acme/d1", R.WRONG_TYPE),
    ("NUL in text", {**GOOD, "text": "a\x00b"}, b"acme/d1", R.INVALID_VALUE),
    ("empty text", {**GOOD, "text": ""}, b"acme/d1", R.EMPTY_TEXT),
    ("whitespace text", {**GOOD, "text": " \n\t "}, b"acme/d1", R.EMPTY_TEXT),
    ("key mismatch", GOOD, b"acme/other", R.KEY_MISMATCH),
    ("no key", GOOD, None, R.KEY_MISMATCH),
    ("key not utf-8", GOOD, b"\xff", R.BAD_KEY),
    ("tombstone bad key", None, b"no-slash", R.BAD_KEY),
    ("tombstone without key", None, None, R.BAD_KEY),
]


@pytest.mark.parametrize(("value", "key", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_record_is_rejected_with_its_reason(value, key, reason):
    out = dec(value, key=key)
    assert isinstance(out, Rejected), out
    assert out.reason == reason
    assert out.message  # says why, in words


def test_rejection_names_the_field():
    out = dec({**GOOD, "version": "x"})
    assert isinstance(out, Rejected) and "version" in out.message


def test_nesting_deeper_than_the_parser_can_recurse_is_too_deep_not_a_crash():
    out = dec(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", max_bytes=1_000_000)
    assert isinstance(out, Rejected) and out.reason == R.TOO_DEEP


_STAGE_OF = {
    **dict.fromkeys([R.OVERSIZE, R.INVALID_UTF8, R.INVALID_JSON, R.TOO_DEEP, R.NOT_AN_OBJECT, R.BAD_KEY], S.DECODE),
    **dict.fromkeys(
        [
            R.UNKNOWN_EVENT_TYPE,
            R.UNKNOWN_FIELD,
            R.MISSING_FIELD,
            R.WRONG_TYPE,
            R.INVALID_VALUE,
            R.KEY_MISMATCH,
        ],
        S.VALIDATE,
    ),
    R.EMPTY_TEXT: S.CHUNK,
}


@pytest.mark.parametrize(("value", "key", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_record_is_rejected_at_the_stage_its_fault_belongs_to(value, key, reason):
    # the dead letter's vs-stage header: bytes and keys at decode, the event contract at validate, content at chunk
    assert dec(value, key=key).stage == _STAGE_OF[reason]


def test_rejected_is_made_from_the_error_that_names_the_fault():
    err = SchemaError(R.KEY_MISMATCH, "record key 'a/b' does not match")
    assert not err.retriable and err.reason == R.KEY_MISMATCH
    assert Rejected.of(err) == Rejected(R.KEY_MISMATCH, S.VALIDATE, "record key 'a/b' does not match")
    assert Rejected.of(EmbeddingError(R.EMBEDDING_FAILED, "x")).stage == S.EMBED
