"""Generate the JSON Schema files in ``schemas/json`` from the pydantic models, or check they are current.

Producers in other languages validate against these files; a test fails when they drift from the models.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.events import document_event_adapter
from schemas.queries import QueryRequest, query_reply_adapter

OUT = Path(__file__).parent / "json"


def render() -> dict[str, str]:
    """File name -> JSON text for every contract."""
    docs = {
        "document-event.schema.json": document_event_adapter.json_schema(),
        "query-request.schema.json": QueryRequest.model_json_schema(),
        "query-reply.schema.json": query_reply_adapter.json_schema(),
    }
    out = {}
    for name, schema in docs.items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main(check: bool = False) -> int:
    stale = []
    for name, text in render().items():
        path = OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale JSON Schema files: {', '.join(stale)}; run `vectorstream schemas` and commit them")
        return 1
    return 0
