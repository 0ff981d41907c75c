"""A replayed tombstone must not delete a newer version. Found by the pgvector 1 -> 2 -> 1 chaos scenario
(tests/chaos/test_pgvector_scale.py), where a rebalance replays the events after the last commit: the replayed
tombstone deleted the NEWER version, and the replayed newer upsert was then ignored as "not above the current
version", so the document's newest version was lost.

A tombstone carries no version of its own. The registry now records where in the log the event that produced a
document's state sits (DocState.source), and resolve() ignores a tombstone that sits before it in the same
partition: it was applied already.
"""

from __future__ import annotations

from tests.component.test_ingest_service import (  # noqa: F401 - service and store are fixtures
    chunks_of,
    rec,
    service,
    store,
    up,
)


async def test_replaying_a_tombstone_after_a_newer_upsert_keeps_the_newer_upsert(service, store):  # noqa: F811
    """The log says v1, tombstone, v2. The batch is applied, its commit is lost (a rebalance, a SIGKILL), and
    the events from the tombstone on are replayed: v2 must stay live."""
    batch = [rec(up("d", 1, "first version")), rec(key=b"acme/d", value=None, raw=True), rec(up("d", 2, "second"))]
    await service.handle(batch)
    assert {h.payload["version"] for h in await chunks_of(store, "d")} == {2}
    await service.handle(batch[1:])  # the replay from the tombstone on
    assert {h.payload["version"] for h in await chunks_of(store, "d")} == {2}
