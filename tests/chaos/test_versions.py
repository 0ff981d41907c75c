"""Duplicates and out-of-order versions of the same documents on a real broker: the newest wins, a full replay by a
new consumer group changes nothing, and ``vectorstream check`` agrees (exit 0), then catches damage (exit 1)."""

from __future__ import annotations

import asyncio
import random

from agents.cli import main as cli
from pipeline.store import open_store
from pipeline.store.base import DOC, TENANT, VERSION, Filter, Match
from tests.chaos.harness import (
    Scenario,
    assert_consistent,
    cleanup,
    delete,
    doc_text,
    record_result,
    upsert,
    wait_consuming,
)


def shuffled_versions(rng: random.Random, docs: int) -> tuple[list[tuple[bytes, bytes]], dict[tuple[str, str], int]]:
    """Each document gets versions 1..n, each sent 1-3 times, sometimes a delete at one of them, all in random
    order; documents interleave at random. Returns the records and, per document, the version that must be
    live (0: deleted), decided without the ingest code: the highest version wins and a delete wins a tie."""
    per_doc: list[list[tuple[bytes, bytes]]] = []
    newest: dict[tuple[str, str], int] = {}
    for d in range(docs):
        tenant, doc = ("acme", "globex")[d % 2], f"doc-{d}"
        versions = range(1, rng.randint(2, 6) + 1)
        events = [
            upsert(tenant, doc, v, doc_text(tenant, doc, v, 3 + 7 * v, random.Random(f"{doc}/{v}")))
            for v in versions
            for _ in range(rng.randint(1, 3))
        ]
        deleted_at = rng.choice(list(versions)) if rng.random() < 0.3 else 0
        if deleted_at:
            events.append(delete(tenant, doc, deleted_at))
        rng.shuffle(events)
        per_doc.append(events)
        newest[(tenant, doc)] = 0 if deleted_at >= max(versions) else max(versions)
    records = []
    while any(per_doc):
        records.append(rng.choice([e for e in per_doc if e]).pop(0))
    return records, newest


async def live_versions(settings, embedder) -> dict[tuple[str, str], set[int]]:
    store = open_store(settings.store)
    await store.open(model=embedder.name, dim=embedder.dim)
    try:
        hits = await store.scroll(None, limit=1_000_000)
    finally:
        await store.close()
    out: dict[tuple[str, str], set[int]] = {}
    for h in hits:
        out.setdefault((h.payload[TENANT], h.payload[DOC]), set()).add(h.payload[VERSION])
    return out


async def test_duplicates_and_out_of_order_versions_newest_wins(
    apache_kafka, tmp_path, settings, embedder, capsys, monkeypatch
):
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, "versions", settings).setup()
    records, newest = shuffled_versions(random.Random(17), docs=24)
    with cleanup(sc):
        await sc.produce(records)
        # small batches, so that late older versions and duplicates meet the registry, not just each other
        w = sc.worker({"VECTORSTREAM_INGEST__MAX_BATCH_EVENTS": "4"}).start()
        await sc.wait_caught_up([w])
        first = {o: w.events(o) for o in ("indexed", "deleted", "ignored_stale", "dead_lettered")}
        assert await asyncio.to_thread(w.terminate) == 0
        stored = await live_versions(sc.settings, embedder)
        report = await sc.check(embedder)

        # a new consumer group replays the whole topic over the same store: every event is recognised as applied
        replay_group = f"{sc.group}.replay"
        r = sc.worker(group=replay_group).start()
        await sc.wait_caught_up([r], group=replay_group)
        await wait_consuming(r)
        replay = {o: r.events(o) for o in ("indexed", "deleted", "ignored_stale", "dead_lettered")}
        assert await asyncio.to_thread(r.terminate) == 0
    after_replay = await sc.check(embedder)
    wrong = {
        k: (sorted(stored.get(k, ())), v) for k, v in newest.items() if stored.get(k, set()) != ({v} if v else set())
    }
    record_result(
        "duplicates-out-of-order",
        events=len(records),
        report=report,
        lost=0,
        notes=f"{len(newest)} documents, versions sent 1-3 times in random order, some deleted at a "
        f"version; {len(wrong)} documents not at the newest version; full replay by a new group: "
        f"{replay['indexed']:.0f} re-indexed, {replay['ignored_stale']:.0f} ignored",
        first=first,
        replay=replay,
    )
    assert not wrong, f"(stored versions, expected) per document: {wrong}"
    assert_consistent(report)
    assert first["dead_lettered"] == 0 and first["indexed"] + first["deleted"] < len(records)
    assert replay == {"indexed": 0, "deleted": 0, "ignored_stale": len(records), "dead_lettered": 0}, replay
    assert_consistent(after_replay)
    assert after_replay.stored_chunks == report.stored_chunks

    # the command line: consistent -> exit 0; a document's chunks removed behind its back -> exit 1
    for name, value in {
        "KAFKA__BOOTSTRAP_SERVERS": sc.bootstrap,
        "KAFKA__DOCUMENTS_TOPIC": sc.topic,
        "STORE__PATH": str(sc.store_path),
    }.items():
        monkeypatch.setenv(f"VECTORSTREAM_{name}", value)
    capsys.readouterr()
    assert await asyncio.to_thread(cli, ["check"]) == 0
    assert capsys.readouterr().out.startswith("consistent:")
    tenant, doc = next(k for k, v in newest.items() if v)
    store = open_store(sc.settings.store)
    await store.open(model=embedder.name, dim=embedder.dim)
    try:
        gone = await store.count(Filter(must=(Match(TENANT, tenant), Match(DOC, doc))))
        await store.delete_chunks(tenant, doc)
    finally:
        await store.close()
    assert await asyncio.to_thread(cli, ["check"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("INCONSISTENT:") and f"missing {gone}," in out, out
