"""A fault-injecting wrapper around a real vector store, switched by a file: a toxiproxy for chaos tests.

While its fault file exists, every call fails or slows down as the file says; without it, calls pass through.
Test-side only: ``tests/support/faulty_worker.py`` runs a real worker with its store wrapped in it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StoreUnavailableError
from pipeline.store.base import (
    ChunkPoint,
    DocState,
    Filter,
    Hit,
    HybridParams,
    SearchMode,
    SparseVector,
    StoreInfo,
    VectorLike,
    VectorStore,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    """What the fault file asks for: ``down`` (fail) or ``slow`` (pass through), after ``delay`` seconds."""

    mode: str
    delay: float = 0.0


def read_fault(path: Path) -> Fault | None:
    """The fault the file describes, or None when it does not exist.

    The file holds one line: empty or ``down [delay]`` makes every call raise StoreUnavailableError after
    ``delay`` seconds (a refused connection, or a timeout); ``slow <delay>`` delays every call, which then runs.
    An unreadable line counts as ``down``: a chaos switch should never fail open by accident.
    """
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return Fault("down")
    words = text.split()
    mode = words[0].lower() if words else "down"
    try:
        delay = max(0.0, float(words[1])) if len(words) > 1 else 0.0
    except ValueError:
        delay = 0.0
    return Fault(mode if mode in ("down", "slow") else "down", delay)


class FaultyStore(VectorStore):
    """Delegates every call to ``inner``, first consulting the fault file (``close`` always passes through,
    so a process can still release the store's folder during an outage)."""

    def __init__(self, inner: VectorStore, fault_file: Path) -> None:
        self.inner = inner
        self.fault_file = Path(fault_file)
        self.faults = 0

    async def _gate(self, what: str) -> None:
        fault = read_fault(self.fault_file)
        if fault is None:
            return
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.mode == "down":
            self.faults += 1
            raise StoreUnavailableError(f"injected outage ({self.fault_file} exists): {what} refused")

    async def open(self, *, model: str, dim: int, sparse: dict[str, Any] | None = None) -> StoreInfo:
        await self._gate("open")
        return await self.inner.open(model=model, dim=dim, sparse=sparse)

    @property
    def sparse_record(self) -> dict[str, Any] | None:
        return self.inner.sparse_record

    async def close(self) -> None:
        await self.inner.close()

    async def get_doc_states(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], DocState]:
        await self._gate("get_doc_states")
        return await self.inner.get_doc_states(keys)

    async def put_doc_states(self, states: Sequence[DocState]) -> None:
        await self._gate("put_doc_states")
        await self.inner.put_doc_states(states)

    async def upsert_chunks(self, points: Sequence[ChunkPoint]) -> None:
        await self._gate("upsert_chunks")
        await self.inner.upsert_chunks(points)

    async def delete_chunks(self, tenant_id: str, doc_id: str, *, below_version: int | None = None) -> None:
        await self._gate("delete_chunks")
        await self.inner.delete_chunks(tenant_id, doc_id, below_version=below_version)

    async def write_batch(
        self,
        *,
        points: Sequence[ChunkPoint] = (),
        leftovers: Sequence[tuple[str, str, int]] = (),
        deletes: Sequence[tuple[str, str]] = (),
        states: Sequence[DocState] = (),
        upsert_batch_points: int = 512,
    ) -> None:
        # forwarded whole, so a transactional store (pgvector) still writes the batch as one transaction
        await self._gate("write_batch")
        await self.inner.write_batch(
            points=points,
            leftovers=leftovers,
            deletes=deletes,
            states=states,
            upsert_batch_points=upsert_batch_points,
        )

    async def get_vectors(self, ids: Sequence[str]) -> dict[str, list[float]]:
        await self._gate("get_vectors")
        return await self.inner.get_vectors(ids)

    async def count(self, flt: Filter | None = None) -> int:
        await self._gate("count")
        return await self.inner.count(flt)

    async def scroll(self, flt: Filter | None = None, *, limit: int = 10_000) -> list[Hit]:
        await self._gate("scroll")
        return await self.inner.scroll(flt, limit=limit)

    async def search(
        self,
        vector: Sequence[float],
        *,
        flt: Filter | None,
        limit: int,
        hnsw_ef: int | None = None,
        exact: bool = False,
        with_vectors: bool = False,
    ) -> list[Hit]:
        await self._gate("search")
        return await self.inner.search(
            vector, flt=flt, limit=limit, hnsw_ef=hnsw_ef, exact=exact, with_vectors=with_vectors
        )

    async def query(
        self,
        *,
        mode: SearchMode,
        vector: VectorLike | None,
        sparse: SparseVector | None,
        flt: Filter | None,
        limit: int,
        hybrid: HybridParams = HybridParams(),
        hnsw_ef: int | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        await self._gate("search")
        return await self.inner.query(
            mode=mode, vector=vector, sparse=sparse, flt=flt, limit=limit, hybrid=hybrid, hnsw_ef=hnsw_ef, exact=exact
        )

    async def build_index(self) -> None:
        await self._gate("build_index")
        await self.inner.build_index()
