"""The consistency checker agrees with the ingest service on a clean run and catches every kind of damage."""

import random

from pipeline.consistency import check_store, expected_state
from pipeline.ingest import IngestService
from pipeline.store.base import ChunkPoint, chunk_point_id
from tests.component.test_ingest_service import RecordingDeadLetters, long_text, rec, store, up  # noqa: F401


def history(seed=7):
    rnd = random.Random(seed)
    records = []
    for step in range(120):
        doc = f"d{rnd.randrange(15)}"
        version = rnd.randrange(1, 8)
        roll = rnd.random()
        if roll < 0.1:
            records.append(rec({"type": "delete", "tenant_id": "acme", "doc_id": doc, "version": version}))
        elif roll < 0.15:
            records.append(rec(key=f"acme/{doc}".encode(), value=None, raw=True))
        elif roll < 0.2:
            records.append(rec(key=b"acme/bad", value=b"{broken", raw=True))
        else:
            records.append(rec(up(doc, version, long_text(f"{doc} v{version} s{step}", rnd.randrange(2, 40)))))
    return records


async def test_clean_run_is_consistent_and_damage_is_found(settings, store, embedder):  # noqa: F811
    records = history()
    svc = IngestService(settings, store, embedder, RecordingDeadLetters())
    for i in range(0, len(records), 16):  # batch boundaries matter for collapse: use several
        await svc.handle(records[i:i + 16])
    expected, n, bad = expected_state(records, embedder.chunker(), settings)
    report = await check_store(store, expected, events=n, dead_letters=bad)
    assert report.ok, report.summary() + "\n" + "\n".join(report.examples)
    assert report.expected_chunks == report.stored_chunks > 0
    assert bad == len(svc.dead_letters.sent)

    live = [k for k, e in expected.items() if e.chunk_hashes]
    dead = [k for k, e in expected.items() if not e.chunk_hashes]
    t, d = live[0]
    await store.delete_chunks(t, d)  # missing
    t2, d2 = live[1]
    hits = await store.scroll(None)
    victim = next(h for h in hits if (h.payload["tenant_id"], h.payload["doc_id"]) == (t2, d2))
    vec = (await store.get_vectors([victim.id]))[victim.id]
    await store.upsert_chunks([ChunkPoint(victim.id, vec, {**victim.payload, "version": 0})])  # stale
    payload = {**victim.payload, "chunk_index": 99}
    await store.upsert_chunks([ChunkPoint(chunk_point_id(t2, d2, 99), vec, payload)])  # extra
    if dead:
        td, dd = dead[0]
        await store.upsert_chunks([ChunkPoint(chunk_point_id(td, dd, 0), vec,
                                              {**victim.payload, "tenant_id": td, "doc_id": dd, "chunk_index": 0})])
    report = await check_store(store, expected)
    assert not report.ok
    assert report.missing == len(expected[(t, d)].chunk_hashes)
    assert report.stale == 1
    assert report.extra == 1 + (1 if dead else 0)
