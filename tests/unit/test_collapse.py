"""Within a batch only the newest event per document applies; against the registry versions only move forward."""

from pipeline.decode import Record, Tombstone
from pipeline.ingest import collapse, is_stale
from pipeline.store.base import DocState
from schemas.events import DocumentDelete, DocumentUpsert


def up(doc, v, t="acme"):
    return DocumentUpsert(type="upsert", tenant_id=t, doc_id=doc, version=v, text=f"{doc} v{v}")


def de(doc, v, t="acme"):
    return DocumentDelete(type="delete", tenant_id=t, doc_id=doc, version=v)


def batch(*events):
    return [(Record("t", 0, i, None, None), e) for i, e in enumerate(events)]


def winners(*events):
    return {op.key: op.event for op in collapse(batch(*events))}


def test_newest_version_wins_whatever_the_order():
    assert winners(up("a", 1), up("a", 3), up("a", 2))[("acme", "a")] == up("a", 3)


def test_delete_beats_upsert_of_same_version():
    assert winners(up("a", 2), de("a", 2))[("acme", "a")] == de("a", 2)
    assert winners(de("a", 2), up("a", 2))[("acme", "a")] == de("a", 2)


def test_newer_upsert_beats_older_delete():
    assert winners(de("a", 2), up("a", 3))[("acme", "a")] == up("a", 3)


def test_tombstone_beats_everything_before_it_and_remembers_the_version():
    ops = collapse(batch(up("a", 5), Tombstone("acme", "a")))
    assert isinstance(ops[0].event, Tombstone) and ops[0].version_hint == 5


def test_newer_upsert_after_tombstone_wins_but_not_an_older_one():
    assert winners(up("a", 5), Tombstone("acme", "a"), up("a", 6))[("acme", "a")] == up("a", 6)
    assert isinstance(winners(up("a", 5), Tombstone("acme", "a"), up("a", 4))[("acme", "a")], Tombstone)


def test_documents_and_tenants_are_independent():
    w = winners(up("a", 1), up("b", 1), up("a", 1, t="other"))
    assert set(w) == {("acme", "a"), ("acme", "b"), ("other", "a")}


def test_stale_rules():
    stored = DocState("acme", "a", version=5)
    ops = {op.key: op for op in collapse(batch(up("a", 4)))}
    assert is_stale(ops[("acme", "a")], stored)                       # older: ignored
    assert is_stale(collapse(batch(up("a", 5)))[0], stored)           # same: a replay
    assert not is_stale(collapse(batch(up("a", 6)))[0], stored)       # newer: applied
    assert not is_stale(collapse(batch(de("a", 5)))[0], stored)       # delete of same version wins
    deleted = DocState("acme", "a", version=5, deleted=True)
    assert is_stale(collapse(batch(de("a", 5)))[0], deleted)          # deleting twice is a replay
    assert is_stale(collapse(batch(up("a", 5)))[0], deleted)          # delete wins over same-version upsert
    assert not is_stale(collapse(batch(Tombstone("acme", "a")))[0], stored)
    assert not is_stale(collapse(batch(up("a", 0)))[0], None)
