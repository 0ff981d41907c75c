"""RELIABILITY.md's header says which Qdrant server the server scenarios ran on, or that none was configured."""

from __future__ import annotations

import socket

from tests.chaos.report import qdrant_server, render


def _render(server: str | None) -> str:
    return render(
        [], {}, command="c", started=0.0, seconds=60.0, load=(0.0, 0.0, 0.0), slow=False, commit="abc", server=server
    )


def test_the_report_names_the_server_or_says_there_was_none() -> None:
    assert "- Qdrant server (the server scenarios, over REST): Qdrant 1.19.0 at http://q:6333" in _render(
        "Qdrant 1.19.0 at http://q:6333"
    )
    assert "- Qdrant server: none (VECTORSTREAM_TEST_QDRANT_URL not set" in _render(None)


def test_no_url_means_no_server(monkeypatch) -> None:
    monkeypatch.delenv("VECTORSTREAM_TEST_QDRANT_URL", raising=False)
    assert qdrant_server() is None
    assert qdrant_server("  ") is None


def test_a_server_that_does_not_answer_is_reported_as_such() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    line = qdrant_server(f"http://127.0.0.1:{port}")
    assert line is not None and line.startswith(f"a Qdrant server at http://127.0.0.1:{port} that did not answer")
