"""The wire contracts are strict, and the committed JSON Schema files match the models."""

import json

import pytest
from pydantic import ValidationError

from schemas.events import AccessControl, DocumentUpsert, document_event_adapter, parse_document_key
from schemas.generate import OUT, render


def test_json_schema_files_are_current():
    rendered = render()
    assert rendered, "no schema rendered"
    for name, text in rendered.items():
        path = OUT / name
        assert path.exists(), f"{name} missing: run `vectorstream schemas`"
        assert path.read_text() == text, f"{name} is stale: run `vectorstream schemas` and commit it"


def test_json_schema_rejects_unknown_fields_like_the_model():
    schema = json.loads((OUT / "document-event.schema.json").read_text())
    upsert = schema["$defs"]["DocumentUpsert"]
    assert upsert["additionalProperties"] is False
    assert {"tenant_id", "doc_id", "version", "text", "type"} <= set(upsert["required"])


def test_strict_types_no_coercion():
    with pytest.raises(ValidationError):
        document_event_adapter.validate_python(
            {"type": "upsert", "tenant_id": "a", "doc_id": "b", "version": "3", "text": "x"}
        )


def test_metadata_is_flat_and_access_defaults_to_private():
    ev = DocumentUpsert(
        type="upsert",
        tenant_id="a",
        doc_id="b",
        version=1,
        text="x",
        metadata={"year": 2020, "tags": ["x", "y"], "score": 0.5, "draft": False, "lang": "en"},
    )
    assert ev.access == AccessControl(public=False, users=[], groups=[])
    assert ev.key == "a/b"


def test_key_roundtrip_allows_slashes_in_doc_ids():
    assert parse_document_key("acme/path/to/doc.md") == ("acme", "path/to/doc.md")
    with pytest.raises(ValueError):
        parse_document_key("acme")
    with pytest.raises(ValueError):
        parse_document_key("/doc")
