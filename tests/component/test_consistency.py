"""The consistency checker agrees with the ingest service on a clean run and catches every kind of damage."""

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipeline.consistency import check_store, expected_state
from pipeline.ingest import IngestService
from pipeline.store import open_store
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
        await svc.handle(records[i : i + 16])
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
        await store.upsert_chunks(
            [
                ChunkPoint(
                    chunk_point_id(td, dd, 0), vec, {**victim.payload, "tenant_id": td, "doc_id": dd, "chunk_index": 0}
                )
            ]
        )
    report = await check_store(store, expected)
    assert not report.ok
    assert report.missing == len(expected[(t, d)].chunk_hashes)
    assert report.stale == 1
    assert report.extra == 1 + (1 if dead else 0)


# --- property: any history, cut into any batches, ends consistent -------------------------------------------


_event = st.tuples(
    st.sampled_from(["upsert", "upsert", "upsert", "delete", "tombstone", "junk"]),
    st.integers(min_value=0, max_value=5),  # document
    st.integers(min_value=0, max_value=6),  # version
    st.integers(min_value=1, max_value=30),  # length in sentences
)


@hsettings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(_event, min_size=1, max_size=40), cuts=st.lists(st.integers(1, 12), min_size=1, max_size=6))
async def test_property_duplicates_and_out_of_order_versions_end_consistent(history, cuts, settings, embedder):
    records = []
    for kind, doc, version, length in history:
        d = f"p{doc}"
        if kind == "upsert":
            records.append(rec(up(d, version, long_text(f"{d} v{version}", length))))
        elif kind == "delete":
            records.append(rec({"type": "delete", "tenant_id": "acme", "doc_id": d, "version": version}))
        elif kind == "tombstone":
            records.append(rec(key=f"acme/{d}".encode(), value=None, raw=True))
        else:
            records.append(rec(key=f"acme/{d}".encode(), value=b"\x00junk", raw=True))
    with tempfile.TemporaryDirectory() as folder:  # every example starts from an empty store
        s = settings.model_copy(update={"store": settings.store.model_copy(update={"path": Path(folder)})})
        st_ = open_store(s.store)
        await st_.open(model=embedder.name, dim=embedder.dim)
        try:
            svc = IngestService(settings, st_, embedder, RecordingDeadLetters())
            i = 0
            for cut in cuts * 40:  # batch boundaries drawn by hypothesis
                if i >= len(records):
                    break
                await svc.handle(records[i : i + cut])
                i += cut
            expected, n, bad = expected_state(records, embedder.chunker(), settings)
            report = await check_store(st_, expected, events=n, dead_letters=bad)
        finally:
            await st_.close()
    assert report.ok, report.summary() + "\n" + "\n".join(report.examples)
