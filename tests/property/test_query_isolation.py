"""Property: whatever the tenants, documents, access lists, callers, filters and search modes (dense, sparse,
hybrid with RRF or DBSF), a query never returns a chunk of another tenant or one its caller may not read, and
every readable chunk that matches the filter is found.

Runs the real QueryService (token verification, filter construction, search) against a real Qdrant Edge store
with BM25 sparse vectors; only the embedder is replaced, by a deterministic map from query text to a random
unit vector. Every chunk of every tenant shares the term "common", and every query asks for it, so the sparse
candidates of a query span all tenants and only the engine's filter keeps them apart.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from pipeline.auth import Principal, mint_token
from pipeline.chunking import Chunk
from pipeline.ingest import chunk_payload
from pipeline.query import QueryService
from pipeline.query_filter import caller_filter, search_filter
from pipeline.settings import Settings
from pipeline.sparse import SparseEncoder, TokenizerConfig
from pipeline.store.base import ChunkPoint, chunk_point_id
from pipeline.store.edge import EdgeStore
from schemas.events import DocumentUpsert
from schemas.queries import ErrorCode, QueryFailure, QueryResult

DIM = 8
SECRET = "property-test-secret-0123456789abcdefgh"
USERS = ["u0", "u1", "u2", "u3"]
GROUPS = ["g0", "g1", "g2"]
LANGS = ["en", "de", "fr"]
TAGS = ["a", "b", "c"]
_examples = itertools.count()
STATS = {"callers": 0, "nonempty": 0, "raw_missed": 0, "sparse_or_hybrid": 0}
SPARSE = SparseEncoder(TokenizerConfig())


def unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).normal(size=DIM)
    return (v / np.linalg.norm(v)).tolist()


class HashEmbedder:
    """Query text "q<seed> ..." -> a fixed random unit vector."""

    name = "hash"

    async def encode_query(self, texts):
        return np.array([unit(int(t.split()[0][1:])) for t in texts], dtype=np.float32)


class Sink:
    async def send(self, reply):
        pass


# --- strategies ----------------------------------------------------------------------------------------------

metadata = st.fixed_dictionaries(
    {},
    optional={
        "year": st.integers(2018, 2024),
        "lang": st.sampled_from(LANGS),
        "tags": st.lists(st.sampled_from(TAGS), unique=True, max_size=3),
        "draft": st.booleans(),
    },
)
documents = st.lists(
    st.fixed_dictionaries(
        {
            "tenant": st.integers(0, 2),
            "public": st.booleans(),
            "users": st.lists(st.sampled_from(USERS), unique=True, max_size=2),
            "groups": st.lists(st.sampled_from(GROUPS), unique=True, max_size=2),
            "meta": metadata,
            "chunks": st.integers(1, 2),
            "seed": st.integers(0, 2**31),
        }
    ),
    min_size=3,
    max_size=40,
)
condition = st.one_of(
    st.builds(lambda v: {"key": "year", "match": v}, st.integers(2018, 2024)),
    st.builds(lambda v: {"key": "lang", "match": v}, st.sampled_from(LANGS)),
    st.builds(lambda v: {"key": "tags", "match": v}, st.sampled_from(TAGS)),
    st.builds(lambda v: {"key": "draft", "match": v}, st.booleans()),
    st.builds(lambda v: {"key": "lang", "any": v}, st.lists(st.sampled_from(LANGS), unique=True, min_size=1)),
    st.builds(lambda v: {"key": "tags", "any": v}, st.lists(st.sampled_from(TAGS), unique=True, min_size=1)),
    st.builds(lambda v: {"key": "year", "any": v}, st.lists(st.integers(2018, 2024), unique=True, min_size=1)),
    st.builds(
        lambda lo, hi: {"key": "year", "range": {"gte": lo, "lt": hi}}, st.integers(2017, 2025), st.integers(2017, 2026)
    ),
    st.builds(lambda b: {"key": "year", "range": {"gt": b}}, st.integers(2017, 2024)),
)
filters = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "must": st.lists(condition, max_size=2),
            "should": st.lists(condition, max_size=3),
            "must_not": st.lists(condition, max_size=2),
        },
    ),
)
callers = st.fixed_dictionaries(
    {
        "tenant": st.integers(0, 2),
        # the tenant the request names: mostly the token's, sometimes another (-> tenant_mismatch)
        "claimed_tenant": st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2)),
        "user": st.sampled_from(USERS + ["nobody"]),
        "groups": st.lists(st.sampled_from(GROUPS + ["g-none"]), unique=True, max_size=3),
        "filter": filters,
        "seed": st.integers(0, 2**31),
        "exact": st.booleans(),
        "mode": st.sampled_from([None, "dense", "sparse", "hybrid"]),
        "fusion": st.sampled_from([None, "rrf", "dbsf"]),
    }
)


# --- the oracle ----------------------------------------------------------------------------------------------


def holds(cond: dict, meta: dict) -> bool:
    if cond["key"] not in meta:
        return False
    value = meta[cond["key"]]
    values = value if isinstance(value, list) else [value]
    if "match" in cond:
        return any(type(v) is type(cond["match"]) and v == cond["match"] for v in values)
    if "any" in cond:
        return any(type(v) is type(a) and v == a for v in values for a in cond["any"])
    r = cond["range"]
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return any(
        ("gt" not in r or v > r["gt"])
        and ("gte" not in r or v >= r["gte"])
        and ("lt" not in r or v < r["lt"])
        and ("lte" not in r or v <= r["lte"])
        for v in nums
    )


def passes(flt: dict | None, meta: dict) -> bool:
    if not flt:
        return True
    must, should, must_not = flt.get("must", []), flt.get("should", []), flt.get("must_not", [])
    return (
        all(holds(c, meta) for c in must)
        and (not should or any(holds(c, meta) for c in should))
        and not any(holds(c, meta) for c in must_not)
    )


def readable(doc: dict, tenant: int, user: str, groups: list[str]) -> bool:
    return doc["tenant"] == tenant and (doc["public"] or user in doc["users"] or bool(set(groups) & set(doc["groups"])))


# --- the test ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    loop = asyncio.new_event_loop()
    store = EdgeStore(tmp_path_factory.mktemp("isolation"), "isolation", flush_writes=False)
    loop.run_until_complete(store.open(model=HashEmbedder.name, dim=DIM, sparse=SPARSE.record()))
    base = Settings(_env_file=None)
    cfg = base.model_copy(
        update={"query": base.query.model_copy(update={"hs256_secret": SecretStr(SECRET), "recall_sample_rate": 0.0})}
    )
    service = QueryService(cfg, store, HashEmbedder(), Sink())
    yield loop, store, service, cfg
    # not vacuous: many callers could read something that their filter let through
    assert STATS["nonempty"] >= 20, STATS
    assert STATS["sparse_or_hybrid"] >= 20, STATS
    loop.run_until_complete(service.close())
    loop.run_until_complete(store.close())
    loop.close()


@settings(
    max_examples=70, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(docs=documents, caller_list=st.lists(callers, min_size=1, max_size=6))
def test_no_hit_crosses_tenant_or_permission_and_every_readable_match_is_found(world, docs, caller_list):
    loop, store, service, cfg = world
    run = f"x{next(_examples)}"
    tenants = [f"{run}-t{i}" for i in range(3)]
    points, owner = [], {}
    for i, d in enumerate(docs):
        doc_id = f"{run}-d{i}"  # unique across tenants, so a leaked hit is recognisable
        event = DocumentUpsert(
            type="upsert",
            tenant_id=tenants[d["tenant"]],
            doc_id=doc_id,
            version=1,
            title=doc_id,
            text="x",
            metadata=d["meta"],
            access={"public": d["public"], "users": d["users"], "groups": d["groups"]},
        )
        owner[doc_id] = d
        for c in range(d["chunks"]):
            chunk = Chunk(index=c, text=f"{doc_id}/{c} common", tokens=1, start_char=0, end_char=1)
            points.append(
                ChunkPoint(
                    chunk_point_id(event.tenant_id, doc_id, c),
                    unit(d["seed"] + c),
                    chunk_payload(event, chunk, HashEmbedder.name),
                    SPARSE.encode_document(chunk.text),
                )
            )

    async def scenario():
        await store.upsert_chunks(points)
        await store.build_index()
        for caller in caller_list:
            if caller["claimed_tenant"] is None:
                caller = {**caller, "claimed_tenant": caller["tenant"]}
            token = mint_token(
                cfg.query, tenant=tenants[caller["tenant"]], user=caller["user"], groups=caller["groups"]
            )
            body = {
                "request_id": uuid.uuid4().hex,
                "tenant_id": tenants[caller["claimed_tenant"]],
                "token": token,
                "query": f"q{caller['seed']} common",
                "top_k": cfg.query.max_top_k,
                "reply_topic": f"{cfg.kafka.replies_topic}.{tenants[caller['claimed_tenant']]}",
                "deadline_ms": int(time.time() * 1000) + 60_000,
                "search": {"exact": caller["exact"]},
            }
            if caller["filter"] is not None:
                body["filter"] = caller["filter"]
            if caller["mode"] is not None:
                body["mode"] = caller["mode"]
            if caller["fusion"] is not None and caller["mode"] in (None, "hybrid"):
                body["fusion"] = caller["fusion"]
            reply = await service.handle(body["request_id"].encode(), json.dumps(body).encode())
            # every reply goes to the verified tenant's own topic, never to the one a request names
            assert reply.topic == f"{cfg.kafka.replies_topic}.{tenants[caller['tenant']]}"
            if caller["claimed_tenant"] != caller["tenant"]:
                assert isinstance(reply.body, QueryFailure) and reply.body.error.code == ErrorCode.TENANT_MISMATCH
                continue
            assert isinstance(reply.body, QueryResult), reply.body
            # the reply says which mode served it: the one asked for, else hybrid (the collection has sparse vectors)
            assert reply.body.mode == (caller["mode"] or "hybrid")
            STATS["sparse_or_hybrid"] += reply.body.mode != "dense"
            got = {(h.doc_id, h.chunk_index) for h in reply.body.hits}
            # safety: no hit of another tenant (or of another example) or that the caller may not read
            for doc_id, _ in got:
                assert doc_id in owner, f"hit {doc_id} is not of this example's tenants"
                assert readable(owner[doc_id], caller["tenant"], caller["user"], caller["groups"]), doc_id
                assert passes(caller["filter"], owner[doc_id]["meta"]), doc_id
            # completeness: every readable chunk passing the filter is found (top_k exceeds them all)
            expected = {
                (f"{run}-d{i}", c)
                for i, d in enumerate(docs)
                for c in range(d["chunks"])
                if readable(d, caller["tenant"], caller["user"], caller["groups"])
                and passes(caller["filter"], d["meta"])
            }
            assert got == expected
            # the raw HNSW search with the same filter is safe too, whatever it misses
            principal = Principal(tenants[caller["tenant"]], caller["user"], tuple(caller["groups"]))
            flt = search_filter(principal, caller_filter(caller["filter"]))
            raw = await store.search(unit(caller["seed"]), flt=flt, limit=100, hnsw_ef=16)
            STATS["callers"] += 1
            STATS["nonempty"] += bool(expected)
            STATS["raw_missed"] += len(expected) - len(raw)
            assert {(h.payload["doc_id"], h.payload["chunk_index"]) for h in raw} <= expected

    loop.run_until_complete(scenario())
