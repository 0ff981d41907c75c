"""Qdrant Edge searches run on a pool of their own: a search is answered while the write thread is busy
(an fsync, an index build), and many searches at once from several threads give the same hits as one by one."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np

from pipeline.store.base import TENANT, ChunkPoint, Filter, Match, chunk_point_id
from pipeline.store.edge import EdgeStore
from tests.contract.test_store_contract import HNSW

DIM = 16


async def _store(tmp_path: Path, threads: int) -> EdgeStore:
    store = EdgeStore(tmp_path / "edge", "chunks", hnsw=HNSW, search_threads=threads)
    await store.open(model="m", dim=DIM)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    await store.upsert_chunks(
        [
            ChunkPoint(chunk_point_id(f"t{i % 3}", f"d{i}", 0), x[i].tolist(), {TENANT: f"t{i % 3}", "doc_id": f"d{i}"})
            for i in range(len(x))
        ]
    )
    await store.build_index()
    return store


async def test_a_search_does_not_wait_behind_the_write_thread(tmp_path: Path) -> None:
    store = await _store(tmp_path, threads=2)
    gate = threading.Event()
    # the write thread is busy (standing in for a long fsync or index build) until the gate opens
    busy = asyncio.ensure_future(store._run(gate.wait, 30))  # noqa: SLF001 - the write thread itself
    try:
        flt = Filter(must=(Match(TENANT, "t1"),))
        hits = await asyncio.wait_for(store.search(np.ones(DIM), flt=flt, limit=5), timeout=10)
        assert len(hits) == 5 and {h.payload[TENANT] for h in hits} == {"t1"}
        assert not busy.done()  # it was answered while the write was still running
    finally:
        gate.set()
        await busy
        await store.close()


async def test_concurrent_searches_give_the_same_hits_as_one_by_one(tmp_path: Path) -> None:
    store = await _store(tmp_path, threads=4)
    rng = np.random.default_rng(9)
    queries = [(rng.normal(size=DIM), f"t{i % 3}") for i in range(60)]

    async def ask(v: np.ndarray, tenant: str) -> list[str]:
        hits = await store.search(v, flt=Filter(must=(Match(TENANT, tenant),)), limit=10, hnsw_ef=64)
        return [h.id for h in hits]

    try:
        alone = [await ask(v, t) for v, t in queries]
        together = await asyncio.gather(*(ask(v, t) for v, t in queries))
        assert together == alone
    finally:
        await store.close()
