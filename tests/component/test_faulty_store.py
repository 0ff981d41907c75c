"""The chaos switch around a real Qdrant Edge store: the fault file turns calls into outages or delays. The
wrapper is test-side: the product has no setting that switches it on."""

import time

import pytest

from pipeline.errors import StoreUnavailableError
from pipeline.ingest import IngestService
from pipeline.store import open_store
from tests.component.test_ingest_service import RecordingDeadLetters, long_text, rec, up
from tests.support.faulty_store import Fault, FaultyStore, read_fault


def test_reading_the_fault_file(tmp_path):
    f = tmp_path / "fault"
    assert read_fault(f) is None
    for text, fault in [
        ("", Fault("down")),
        ("down", Fault("down")),
        ("down 0.5", Fault("down", 0.5)),
        ("slow 2.5\n", Fault("slow", 2.5)),
        ("SLOW 1", Fault("slow", 1.0)),
        ("gibberish", Fault("down")),
        ("slow -3", Fault("slow", 0.0)),
        ("slow x", Fault("slow")),
    ]:
        f.write_text(text)
        assert read_fault(f) == fault, text


@pytest.fixture
async def faulty(tmp_path, settings, embedder):
    store = FaultyStore(open_store(settings.store.model_copy(update={"path": tmp_path / "edge"})), tmp_path / "fault")
    await store.open(model=embedder.name, dim=embedder.dim)
    yield store
    await store.close()


def test_the_product_cannot_switch_faults_on(tmp_path, settings):
    from pipeline.settings import StoreSettings

    assert not any("fault" in name for name in StoreSettings.model_fields)  # no production switch for chaos
    store = open_store(settings.store.model_copy(update={"path": tmp_path / "edge"}))
    assert not isinstance(store, FaultyStore)


async def test_down_slow_and_back(faulty, tmp_path):
    fault = tmp_path / "fault"
    assert await faulty.count() == 0
    fault.write_text("down")
    with pytest.raises(StoreUnavailableError, match="injected outage"):
        await faulty.count()
    fault.write_text("down 0.3")
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        await faulty.get_doc_states([("acme", "d")])
    assert time.monotonic() - started >= 0.3
    fault.write_text("slow 0.3")
    started = time.monotonic()
    assert await faulty.count() == 0
    assert time.monotonic() - started >= 0.3
    fault.unlink()
    assert await faulty.count() == 0
    assert faulty.faults == 2


async def test_an_outage_pauses_ingest_and_dead_letters_nothing(faulty, tmp_path, settings, embedder):
    fault = tmp_path / "fault"
    fault.write_text("down")
    sleeps = []

    async def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 5:
            fault.unlink()  # the store comes back during the fifth wait

    dead = RecordingDeadLetters()
    svc = IngestService(settings, faulty, embedder, dead, sleep=sleep)
    report = await svc.handle([rec(up("d1", 1, long_text("outage", 3))), rec(up("d2", 1, "short"))])
    assert report.retries == 5 and report.indexed == 2
    assert dead.sent == []
    assert await faulty.count() > 0
