"""Reading files into document events (pipeline/sources.py): ids, formats, JSONL validation and versions."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from pipeline.sources import PublishPlan, doc_id_for, html_to_text, plan_publish, read_event_lines
from schemas.events import AccessControl, DocumentDelete, DocumentUpsert

PUBLIC = AccessControl(public=True)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def _plan(
    paths: list[Path], now_ms: int, *, delete_missing: bool = False, max_event_bytes: int | None = None
) -> PublishPlan:
    return plan_publish(
        paths,
        tenant="t",
        access=PUBLIC,
        bootstrap_servers="b:9092",
        topic="docs",
        now_ms=now_ms,
        delete_missing=delete_missing,
        max_event_bytes=max_event_bytes,
    )


def test_doc_ids_are_relative_paths_with_unsafe_characters_encoded_injectively() -> None:
    assert doc_id_for(PurePosixPath("notes/todo.md")) == "notes/todo.md"
    assert doc_id_for(PurePosixPath("my notes.md")) == "my+20notes.md"
    assert doc_id_for(PurePosixPath("a+b.md")) == "a+2Bb.md" != doc_id_for(PurePosixPath("a b.md"))
    assert doc_id_for(PurePosixPath("_index.md")) == "+5Findex.md"  # ids start with a letter or digit
    assert doc_id_for(PurePosixPath("café.txt")) == "caf+C3+A9.txt"
    assert doc_id_for(PurePosixPath("x.md"), "notes/") == "notes/x.md"
    with pytest.raises(ValueError, match="256"):
        doc_id_for(PurePosixPath("a" * 300))


def test_html_text_is_the_visible_text_one_block_a_line() -> None:
    title, text = html_to_text(
        "<html><head><title> The  page </title><style>p{}</style></head><body><nav>menu</nav>"
        "<p>First <b>bold</b> para.</p><p>Second</p><script>x()</script></body></html>"
    )
    assert title == "The page"
    assert text == "First bold para.\nSecond"


def test_jsonl_problems_carry_their_line_numbers(tmp_path: Path) -> None:
    good = {"type": "delete", "tenant_id": "t", "doc_id": "d", "version": 3}
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(good) + "\n\n[1,\n" + json.dumps({**good, "version": -1}) + "\n")
    events, problems = read_event_lines(path, "e.jsonl")
    assert [(n, type(e)) for n, e in events] == [(1, DocumentDelete)]
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [(3, "not JSON"), (4, "not a document event")]
    assert str(problems[1]).startswith("e.jsonl:4: not a document event: version: ")


def test_versions_move_forward_and_unchanged_documents_keep_theirs(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.md").write_text("# A\n\nalpha")
    (folder / "b.txt").write_text("beta")
    first = _plan([folder], now_ms=1000)
    assert sorted((i.kind, i.event.doc_id, i.event.version) for i in first.items) == [
        ("new", "a.md", 1000),
        ("new", "b.txt", 1000),
    ]
    first.commit()

    (folder / "a.md").write_text("# A\n\nalpha, edited")
    # the clock went back: the new version is still above the old one
    second = _plan([folder], now_ms=500)
    got = {i.event.doc_id: (i.kind, i.event.version) for i in second.items}
    assert got == {"a.md": ("changed", 1001), "b.txt": ("unchanged", 1000)}
    second.commit()

    (folder / "b.txt").unlink()
    assert {i.event.doc_id for i in _plan([folder], now_ms=2000).items} == {"a.md"}  # no delete unless asked
    third = _plan([folder], now_ms=2000, delete_missing=True)
    deletes = [i for i in third.items if isinstance(i.event, DocumentDelete)]
    assert [(i.kind, i.event.doc_id, i.event.version) for i in deletes] == [("deleted", "b.txt", 2000)]
    third.commit()
    # a delete already sent is sent again at its own version (a no-op for the worker unless it was lost)
    fourth = _plan([folder], now_ms=3000, delete_missing=True)
    assert [(i.kind, i.event.version) for i in fourth.items if isinstance(i.event, DocumentDelete)] == [
        ("unchanged", 2000)
    ]
    # and a file that comes back is new again, above its delete
    (folder / "b.txt").write_text("beta is back")
    fifth = _plan([folder], now_ms=10, delete_missing=True)
    assert {i.event.doc_id: (i.kind, i.event.version) for i in fifth.items}["b.txt"] == ("new", 2001)


def test_access_change_is_a_change_and_problems_do_not_count_as_missing(tmp_path: Path) -> None:
    folder = tmp_path / "n"
    folder.mkdir()
    (folder / "a.md").write_text("alpha")
    (folder / "bin.txt").write_text("text")
    _plan([folder], now_ms=1000).commit()
    (folder / "bin.txt").write_bytes(b"\x00\x01binary")
    plan = plan_publish(
        [folder],
        tenant="t",
        access=AccessControl(groups=["ops"]),
        bootstrap_servers="b:9092",
        topic="docs",
        now_ms=2000,
        delete_missing=True,
    )
    assert [(i.kind, i.event.doc_id) for i in plan.items] == [("changed", "a.md")]
    assert isinstance(plan.items[0].event, DocumentUpsert) and plan.items[0].event.access.groups == ["ops"]
    assert [str(p) for p in plan.problems] == [f"{folder / 'bin.txt'}: looks binary (NUL bytes)"]


def test_a_document_too_large_for_the_worker_is_a_problem_not_a_dead_letter(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("word " * 5000)
    plan = _plan([big], now_ms=1, max_event_bytes=10_000)
    assert plan.items == []
    assert "above the worker's limit of 10000" in str(plan.problems[0])
