"""Ingest and query with BM25 sparse vectors, on a real Qdrant Edge store and the real model (no broker): the
modes and their default, the reply's mode, a rare identifier, skip-unchanged reuse with sparse vectors, and the
refusals (a dense-only collection asked for sparse or hybrid, fusion without hybrid)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from pydantic import SecretStr

from pipeline.auth import mint_token
from pipeline.decode import Record
from pipeline.ingest import IngestService
from pipeline.query import QueryService
from pipeline.sparse import settings_record
from pipeline.store.edge import EdgeStore
from schemas.queries import ErrorCode, QueryFailure, QueryResult

SECRET = "component-test-secret-0123456789abcdef"
RARE = "QX-7741-B"
TEXTS = {
    "pw": "To reset your password open the account settings and follow the e-mailed link.",
    "vpn": "Install the VPN client, import the company profile and sign in with your staff credentials.",
    "boot": f"If the appliance shows error {RARE} while booting, replace the power supply unit.",
    "disk": "When a disk fails the array rebuilds itself onto the spare; the status light blinks amber.",
    "fan": "A noisy fan usually means dust: clean the intake grille and check the fan speed in the console.",
}


class Sink:
    async def send(self, reply):
        pass


class NoDeadLetters:
    async def send(self, record, rejected):
        raise AssertionError(f"unexpected dead letter: {rejected}")


def records(version: int = 1, texts: dict[str, str] = TEXTS) -> list[Record]:
    out = []
    for i, (doc, text) in enumerate(texts.items()):
        event = {
            "type": "upsert",
            "tenant_id": "acme",
            "doc_id": doc,
            "version": version,
            "title": doc,
            "text": text,
            "access": {"public": True},
        }
        out.append(Record("docs", 0, i + 100 * version, f"acme/{doc}".encode(), json.dumps(event).encode()))
    return out


@pytest.fixture
def cfg(settings):
    q = settings.query.model_copy(update={"hs256_secret": SecretStr(SECRET), "recall_sample_rate": 0.0})
    return settings.model_copy(update={"query": q})


async def opened(tmp_path, cfg, embedder, *, sparse: bool) -> EdgeStore:
    store = EdgeStore(tmp_path / "edge", "chunks", flush_writes=False)
    await store.open(model=embedder.name, dim=embedder.dim, sparse=settings_record(cfg.sparse) if sparse else None)
    return store


async def ask(service, cfg, query, **extra):
    body = {
        "request_id": uuid.uuid4().hex,
        "tenant_id": "acme",
        "token": mint_token(cfg.query, tenant="acme", user="alice", groups=[]),
        "query": query,
        "reply_topic": f"{cfg.kafka.replies_topic}.acme",
        "deadline_ms": int(time.time() * 1000) + 30_000,
        "top_k": 2,
        **extra,
    }
    reply = await service.handle(body["request_id"].encode(), json.dumps(body).encode())
    assert reply is not None
    return reply.body


def docs(body) -> list[str]:
    assert isinstance(body, QueryResult), body
    return [h.doc_id for h in body.hits]


async def test_modes_default_and_reply_and_the_rare_identifier(tmp_path, cfg, embedder):
    store = await opened(tmp_path, cfg, embedder, sparse=True)
    service = QueryService(cfg, store, embedder, Sink())
    try:
        report = await IngestService(cfg, store, embedder, NoDeadLetters()).handle(records())
        assert report.indexed == len(TEXTS)
        await store.build_index()
        question = f"what is {RARE}"
        default = await ask(service, cfg, question)
        assert default.mode == "hybrid" and default.fusion == "rrf"  # the collection has sparse vectors
        assert "boot" in docs(default)
        sparse = await ask(service, cfg, question, mode="sparse")
        assert sparse.mode == "sparse" and sparse.fusion is None and docs(sparse) == ["boot"]
        dbsf = await ask(service, cfg, question, mode="hybrid", fusion="dbsf")
        assert dbsf.mode == "hybrid" and dbsf.fusion == "dbsf" and "boot" in docs(dbsf)
        dense = await ask(service, cfg, "how do I reset my password", mode="dense")
        assert dense.mode == "dense" and docs(dense)[0] == "pw"
        nothing = await ask(service, cfg, "the of and", mode="sparse")  # no term survives: no hit, no error
        assert docs(nothing) == []
        bad = await ask(service, cfg, question, mode="dense", fusion="dbsf")
        assert isinstance(bad, QueryFailure) and bad.error.code == ErrorCode.BAD_REQUEST
    finally:
        await service.close()
        await store.close()


async def test_reused_chunks_keep_their_sparse_vectors(tmp_path, cfg, embedder):
    store = await opened(tmp_path, cfg, embedder, sparse=True)
    service = QueryService(cfg, store, embedder, Sink())
    ingest = IngestService(cfg, store, embedder, NoDeadLetters())
    try:
        await ingest.handle(records(1))
        before = await ask(service, cfg, RARE, mode="sparse")
        # version 2, the same texts: every chunk reuses its stored dense vector, none is embedded again
        report = await ingest.handle(records(2))
        assert report.indexed == len(TEXTS)
        assert report.chunks_reused >= len(TEXTS) and report.chunks_embedded == 0
        after = await ask(service, cfg, RARE, mode="sparse")
        assert docs(after) == docs(before) == ["boot"]
        assert after.hits[0].score == pytest.approx(before.hits[0].score)
        # a changed text gets new terms: the old identifier is gone, the new one found
        changed = {**TEXTS, "boot": "If the appliance shows error ZZ-0000 while booting, call support."}
        await ingest.handle(records(3, changed))
        assert docs(await ask(service, cfg, RARE, mode="sparse")) == []
        assert docs(await ask(service, cfg, "ZZ-0000", mode="sparse")) == ["boot"]
    finally:
        await service.close()
        await store.close()


async def test_dense_only_collection_refuses_sparse_and_hybrid_and_serves_dense(tmp_path, cfg, embedder):
    store = await opened(tmp_path, cfg, embedder, sparse=False)
    service = QueryService(cfg, store, embedder, Sink())
    try:
        await IngestService(cfg, store, embedder, NoDeadLetters()).handle(records())
        default = await ask(service, cfg, "how do I reset my password")
        assert default.mode == "dense" and docs(default)[0] == "pw"
        for mode in ("sparse", "hybrid"):
            body = await ask(service, cfg, RARE, mode=mode)
            assert isinstance(body, QueryFailure), body
            assert body.error.code == ErrorCode.MODE_UNSUPPORTED and not body.error.retriable
            assert "dense" in body.error.message
    finally:
        await service.close()
        await store.close()
