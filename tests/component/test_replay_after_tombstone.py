"""A known hole in the ingest rules, found by the pgvector 1 -> 2 -> 1 chaos scenario (tests/chaos/
test_pgvector_scale.py), where a rebalance replays the events after the last commit: a replayed tombstone
deletes a NEWER version, and the replayed newer upsert is then ignored as "not above the current version".

A tombstone carries no version: resolve() gives it the stored one. On a replay the stored state can come from
a later event of the same partition, so the tombstone no longer means what it meant at its log position. The
fix needs the registry to remember which event (partition, offset) produced a document's state, so that a
replayed event at or below it is recognised as a replay; that changes DocState, the registry layout and
resolve(), which belong to the ingest and store modules.
"""

from __future__ import annotations

import pytest

from tests.component.test_ingest_service import (  # noqa: F401 - service and store are fixtures
    chunks_of,
    rec,
    service,
    store,
    up,
)


@pytest.mark.xfail(strict=True, reason="a replayed tombstone deletes a newer version (see the module docstring)")
async def test_replaying_a_tombstone_after_a_newer_upsert_keeps_the_newer_upsert(service, store):  # noqa: F811
    """The log says v1, tombstone, v2. The batch is applied, its commit is lost (a rebalance, a SIGKILL), and
    the events from the tombstone on are replayed: v2 must stay live."""
    batch = [rec(up("d", 1, "first version")), rec(key=b"acme/d", value=None, raw=True), rec(up("d", 2, "second"))]
    await service.handle(batch)
    assert {h.payload["version"] for h in await chunks_of(store, "d")} == {2}
    await service.handle(batch[1:])  # the replay from the tombstone on
    assert {h.payload["version"] for h in await chunks_of(store, "d")} == {2}
