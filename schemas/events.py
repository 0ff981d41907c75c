"""Document events: what producers publish to the documents topic (upsert, delete, or a tombstone).

Strict contracts: unknown fields are rejected, ids have size and charset limits, metadata is flat.
The record key is ``"<tenant_id>/<doc_id>"`` so one document's events stay in one partition, in order.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, field_validator

#: a tenant id never contains "/", which separates it from the document id in the record key
TenantId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
DocId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/+\-]{0,255}$")]
PrincipalId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@+\-]{0,127}$")]
MetaKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
MetaString = Annotated[str, StringConstraints(max_length=1024)]
MetaValue = Union[
    bool,
    Annotated[int, Field(ge=-(2**53), le=2**53)],
    Annotated[float, Field(allow_inf_nan=False)],
    MetaString,
    Annotated[list[MetaString], Field(max_length=100)],
]
#: versions grow per document; JSON-safe integer range so every producer language can write them
Version = Annotated[int, Field(ge=0, le=2**53)]

MAX_TEXT_CHARS = 2_000_000
MAX_TITLE_CHARS = 1_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AccessControl(_Strict):
    """Who may read the document: everyone in the tenant (``public``), or listed users and groups."""

    public: bool = False
    users: Annotated[list[PrincipalId], Field(max_length=1000)] = []
    groups: Annotated[list[PrincipalId], Field(max_length=1000)] = []


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class DocumentUpsert(_Strict):
    """Create or replace a document. A version not above the stored one is ignored."""

    type: Literal["upsert"]
    tenant_id: TenantId
    doc_id: DocId
    version: Version
    title: Annotated[str, StringConstraints(max_length=MAX_TITLE_CHARS)] = ""
    text: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
    metadata: Annotated[dict[MetaKey, MetaValue], Field(max_length=64)] = {}
    access: AccessControl = AccessControl()

    @field_validator("title", "text")
    @classmethod
    def _reject_nul(cls, value: str) -> str:
        return _no_nul(value)

    @property
    def key(self) -> str:
        return document_key(self.tenant_id, self.doc_id)


class DocumentDelete(_Strict):
    """Delete a document and every chunk of it; wins over upserts of the same or older versions."""

    type: Literal["delete"]
    tenant_id: TenantId
    doc_id: DocId
    version: Version

    @property
    def key(self) -> str:
        return document_key(self.tenant_id, self.doc_id)


DocumentEvent = Annotated[DocumentUpsert | DocumentDelete, Field(discriminator="type")]
document_event_adapter: TypeAdapter[DocumentUpsert | DocumentDelete] = TypeAdapter(DocumentEvent)

_tenant_adapter: TypeAdapter[str] = TypeAdapter(TenantId)
_doc_adapter: TypeAdapter[str] = TypeAdapter(DocId)


def document_key(tenant_id: str, doc_id: str) -> str:
    """The Kafka record key of a document's events."""
    return f"{tenant_id}/{doc_id}"


def parse_document_key(key: str) -> tuple[str, str]:
    """Split and validate a record key; raises ``ValueError`` when it is not ``tenant/doc``."""
    tenant_id, sep, doc_id = key.partition("/")
    if not sep:
        raise ValueError("record key must be '<tenant_id>/<doc_id>'")
    return _tenant_adapter.validate_python(tenant_id), _doc_adapter.validate_python(doc_id)
