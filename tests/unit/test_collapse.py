"""Version rules: a batch's events per document are resolved in order against the stored state."""

from pipeline.decode import Record, Tombstone
from pipeline.ingest import resolve
from pipeline.store.base import DocState
from schemas.events import DocumentDelete, DocumentUpsert

K = ("acme", "a")


def up(doc, v, t="acme"):
    return DocumentUpsert(type="upsert", tenant_id=t, doc_id=doc, version=v, text=f"{doc} v{v}")


def de(doc, v, t="acme"):
    return DocumentDelete(type="delete", tenant_id=t, doc_id=doc, version=v)


def net(*events, stored=None):
    batch = [(Record("t", 0, i, None, None), e) for i, e in enumerate(events)]
    return {op.key: op for op in resolve(batch, stored or {})}


def test_newest_version_wins_whatever_the_order():
    assert net(up("a", 1), up("a", 3), up("a", 2))[K].event == up("a", 3)


def test_delete_beats_upsert_of_same_version_in_either_order():
    assert net(up("a", 2), de("a", 2))[K].is_delete
    assert net(de("a", 2), up("a", 2))[K].is_delete


def test_newer_upsert_beats_older_delete():
    op = net(de("a", 2), up("a", 3))[K]
    assert not op.is_delete and op.version == 3


def test_tombstone_deletes_and_keeps_the_version():
    op = net(up("a", 5), Tombstone("acme", "a"))[K]
    assert op.is_delete and op.version == 5
    op = net(Tombstone("acme", "a"), stored={K: DocState("acme", "a", 9)})[K]
    assert op.is_delete and op.version == 9


def test_upsert_after_tombstone_applies_only_if_newer_than_the_store():
    # the bug the consistency checker found: a stale upsert after a tombstone must not undo the tombstone
    stored = {K: DocState("acme", "a", 7)}
    assert net(Tombstone("acme", "a"), up("a", 4), stored=stored)[K].is_delete
    assert net(Tombstone("acme", "a"), up("a", 7), stored=stored)[K].is_delete
    op = net(Tombstone("acme", "a"), up("a", 8), stored=stored)[K]
    assert not op.is_delete and op.version == 8


def test_documents_and_tenants_are_independent():
    assert set(net(up("a", 1), up("b", 1), up("a", 1, t="other"))) == {K, ("acme", "b"), ("other", "a")}


def test_stale_and_replayed_events_produce_no_op():
    stored = {K: DocState("acme", "a", 5)}
    assert net(up("a", 4), stored=stored) == {}  # older: ignored
    assert net(up("a", 5), stored=stored) == {}  # same: a replay
    assert net(up("a", 6), stored=stored)[K].version == 6  # newer: applied
    assert net(de("a", 5), stored=stored)[K].is_delete  # delete of the same version wins
    deleted = {K: DocState("acme", "a", 5, deleted=True)}
    assert net(de("a", 5), stored=deleted) == {}  # deleting twice is a replay
    assert net(up("a", 5), stored=deleted) == {}  # delete wins over same-version upsert
    assert net(Tombstone("acme", "a"), stored=deleted) == {}
    assert net(up("a", 0))[K].version == 0


def _at(offset, timestamp_ms=1000, partition=0, topic="t"):
    return Record(topic, partition, offset, None, None, timestamp_ms=timestamp_ms)


def test_a_replayed_tombstone_does_not_delete_the_newer_version_written_after_it():
    # the log: v1 @10, tombstone @11, v2 @12; applied, commit lost, replayed from @11 on
    stored = {K: DocState("acme", "a", 2, source=("t", 0, 12, 1000))}
    batch = [(_at(11), Tombstone("acme", "a")), (_at(12), up("a", 2))]
    assert resolve(batch, stored) == []  # both already applied: nothing changes


def test_a_tombstone_after_the_stored_state_deletes():
    stored = {K: DocState("acme", "a", 2, source=("t", 0, 12, 1000))}
    (op,) = resolve([(_at(13), Tombstone("acme", "a"))], stored)
    assert op.is_delete and op.version == 2


def test_a_tombstone_of_a_recreated_topic_deletes_although_its_offset_is_lower():
    # offsets restarted (the topic was deleted and created again): the tombstone is younger than the state
    stored = {K: DocState("acme", "a", 2, source=("t", 0, 500, 1000))}
    (op,) = resolve([(_at(3, timestamp_ms=2000), Tombstone("acme", "a"))], stored)
    assert op.is_delete


def test_a_tombstone_from_another_partition_or_a_state_without_a_source_deletes():
    moved = {K: DocState("acme", "a", 2, source=("t", 1, 12, 1000))}  # the topic was repartitioned
    assert resolve([(_at(11), Tombstone("acme", "a"))], moved)[0].is_delete
    unknown = {K: DocState("acme", "a", 2)}  # written before states recorded their source
    assert resolve([(_at(11), Tombstone("acme", "a"))], unknown)[0].is_delete


def test_the_state_of_a_batch_records_where_its_event_sits():
    from pipeline.ingest import source_of

    assert source_of(_at(11, timestamp_ms=1234, partition=3)) == ("t", 3, 11, 1234)
    assert source_of(_at(11, timestamp_ms=None)) == ("t", 0, 11, -1)
