"""What the chaos scenarios share: a scenario's topics, store and worker processes on a real broker, seeded event
histories, offsets read from the broker, the consistency check, and the results file behind RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from pipeline.client import read_records
from pipeline.consistency import ConsistencyReport, check_store, check_topic, expected_state
from pipeline.decode import Record
from pipeline.kafka import admin_client, create_topics
from pipeline.kafka import consumer as kafka_consumer
from pipeline.kafka import producer as kafka_producer
from pipeline.settings import Settings
from pipeline.store import open_store
from schemas.dead_letter import DEAD_LETTER_HEADERS as H
from tests.integration.workers import ROOT, WorkerProcess

PARTITIONS = 3
#: where the scenarios append their counts (one JSON object a line); ``python -m tests.chaos.report`` sets it
RESULTS_ENV = "VECTORSTREAM_RELIABILITY_RESULTS"
DEFAULT_RESULTS = ROOT / ".vectorstream" / "reliability" / "results.jsonl"


# --- waiting -------------------------------------------------------------------------------------------------


async def eventually(
    predicate: Callable[[], Any],
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for the condition, not for one call
    what: str,
    workers: Sequence[WorkerProcess] = (),
    interval: float = 0.5,
) -> Any:
    """Poll ``predicate`` (sync, run in a thread, or async) until it returns something truthy; fail with the
    workers' log tails when ``timeout`` passes or a worker exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        for w in workers:
            if w.proc is not None and w.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {w.proc.returncode} while waiting for {what}:\n{w.log_tail()}"
                )
        if asyncio.iscoroutinefunction(predicate):
            value = await predicate()
        else:
            value = await asyncio.to_thread(predicate)  # sync predicates poll HTTP: keep the loop free
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {w.log_path}\n{w.log_tail()}" for w in workers)
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        await asyncio.sleep(interval)


def metric(worker: WorkerProcess, prefix: str) -> float:
    """The sum of a worker's samples whose name (with labels) starts with ``prefix``; 0 while it is not up."""
    return sum(v for k, v in (worker.metrics() or {}).items() if k.startswith(prefix))


async def wait_consuming(worker: WorkerProcess, timeout: float = 300) -> None:  # noqa: ASYNC109
    """Until the worker has been assigned partitions of the documents topic (its lag gauge has a series): from
    then on faust handles SIGTERM; before (loading the model, joining) the signal's default action ends it."""
    await eventually(
        lambda: any(k.startswith("vectorstream_consumer_lag_messages{") for k in worker.metrics() or {}),
        timeout=timeout,
        what="partitions assigned",
        workers=[worker],
    )


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- a scenario on a broker ----------------------------------------------------------------------------------


@dataclass
class Produced:
    """A record the test produced, where the broker put it."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int


class Scenario:
    """One scenario's documents topic, group, Qdrant Edge folder and fault file, and its worker processes."""

    def __init__(
        self, bootstrap: str, tmp: Path, name: str, settings: Settings, *, partitions: int = PARTITIONS
    ) -> None:
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.tmp = tmp
        run = uuid.uuid4().hex[:8]
        self.topic = f"chaos-{name}-{run}"
        self.dlq = f"{self.topic}.dlq"
        self.group = f"{self.topic}.group"
        self.queries = f"{self.topic}.queries"
        self.replies = f"{self.topic}.replies"
        self.store_path = tmp / "edge"
        self.fault_file = tmp / "store-fault"
        kafka = settings.kafka.model_copy(
            update={
                "bootstrap_servers": bootstrap,
                "documents_topic": self.topic,
                "dead_letter_topic": self.dlq,
                "group_id": self.group,
                "queries_topic": self.queries,
                "replies_topic": self.replies,
            }
        )
        #: the test process's view: the same topic and store, no fault file
        self.settings = settings.model_copy(
            update={
                "kafka": kafka,
                "store": settings.store.model_copy(update={"path": self.store_path}),
            }
        )
        self.workers: list[WorkerProcess] = []

    async def setup(self) -> Scenario:
        await create_topics(self.bootstrap, {self.topic: self.partitions})
        return self

    def worker(self, env: dict[str, str] | None = None, *, group: str | None = None) -> WorkerProcess:
        """A worker process (not started) on this scenario's topics and store, with the fault switch wired."""
        w = WorkerProcess(
            module="tests.support.faulty_worker",
            bootstrap=self.bootstrap,
            store_path=self.store_path,
            topic=self.topic,
            dlq=self.dlq,
            group=group or self.group,
            log_path=self.tmp / f"worker-{len(self.workers)}.log",
            extra_env={
                "VECTORSTREAM_KAFKA__QUERIES_TOPIC": self.queries,
                "VECTORSTREAM_KAFKA__REPLIES_TOPIC": self.replies,
                "VECTORSTREAM_TEST_FAULT_FILE": str(self.fault_file),
                "VECTORSTREAM_DATA_DIR": str(self.tmp / "data"),  # faust's folder, else under the repository
                "VECTORSTREAM_QUERY__DEV_MODE": "true",  # tests that need real keys configure their own
                "VECTORSTREAM_KAFKA__PARTITIONS": str(self.partitions),
                **(env or {}),
            },
        )
        self.workers.append(w)
        return w

    def stop_all(self) -> None:
        """SIGKILL whatever is still running (a failed test must not leave a worker behind)."""
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.kill()

    # --- producing ---------------------------------------------------------------------------------------

    async def produce(
        self, records: Iterable[tuple[bytes | None, bytes | None]], topic: str | None = None
    ) -> list[Produced]:
        """Produce raw (key, value) records in order and return where each one landed."""
        producer = kafka_producer(
            self.bootstrap,
            acks="all",
            linger_ms=5,
            max_request_size=8 * 1024 * 1024,
            request_timeout_ms=60_000,
        )
        await producer.start()
        try:
            futures = [(k, v, await producer.send(topic or self.topic, v, key=k)) for k, v in records]
            out = []
            for k, v, fut in futures:
                meta = await fut
                out.append(Produced(k, v, meta.partition, meta.offset))
            return out
        finally:
            await producer.stop()

    # --- offsets ----------------------------------------------------------------------------------------

    def _partitions(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in range(self.partitions)]

    async def end_offsets(self) -> dict[int, int]:
        consumer = kafka_consumer(self.bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            ends = await consumer.end_offsets(self._partitions())
        finally:
            await consumer.stop()
        return {tp.partition: off for tp, off in ends.items()}

    async def committed(self, group: str | None = None) -> dict[int, int]:
        """The group's committed offset per partition (0 where nothing was committed)."""
        admin = admin_client(self.bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group or self.group, partitions=self._partitions())
        finally:
            await admin.close()
        out = dict.fromkeys(range(self.partitions), 0)
        for tp, meta in offsets.items():
            if tp.topic == self.topic and meta.offset >= 0:
                out[tp.partition] = meta.offset
        return out

    async def caught_up(self, group: str | None = None) -> bool:
        """True when the group committed every record produced so far; False also while the broker is away."""
        try:
            return await self.committed(group) == await self.end_offsets()
        except (KafkaError, OSError, TimeoutError):
            return False

    async def wait_caught_up(
        self,
        workers: Sequence[WorkerProcess],
        *,
        timeout: float = 300,  # noqa: ASYNC109
        group: str | None = None,
    ) -> None:
        await eventually(
            functools.partial(self.caught_up, group),
            timeout=timeout,
            what=f"{self.topic} fully committed",
            workers=workers,
            interval=1.0,
        )

    # --- reading back ------------------------------------------------------------------------------------

    async def records(self) -> list[Record]:
        return await read_records(self.bootstrap, self.topic)

    async def dead_letters(self) -> list[Record]:
        """The dead-letter topic from its beginning (empty when no worker created it yet)."""
        try:
            return await read_records(self.bootstrap, self.dlq)
        except LookupError:
            return []

    async def check(self, embedder: Any) -> ConsistencyReport:
        """The consistency checker over the whole topic (the store must be closed by every worker)."""
        return await check_topic(self.settings, embedder.chunker(), model=embedder.name, dim=embedder.dim)

    async def check_prefix(self, embedder: Any, upto: dict[int, int]) -> ConsistencyReport:
        """The checker against only the records below ``upto[partition]`` (e.g. the committed offsets)."""
        records = [r for r in await self.records() if r.offset < upto.get(r.partition, 0)]
        expected, events, bad = expected_state(records, embedder.chunker(), self.settings)
        store = open_store(self.settings.store)
        await store.open(model=embedder.name, dim=embedder.dim)
        try:
            return await check_store(store, expected, events=events, dead_letters=bad)
        finally:
            await store.close()


def dead_letter_sources(dead: Iterable[Record]) -> dict[tuple[int, int], list[str]]:
    """(source partition, source offset) -> the reasons it was dead-lettered with (twice after a replay)."""
    out: dict[tuple[int, int], list[str]] = {}
    for r in dead:
        h = {k: v.decode() for k, v in r.headers}
        out.setdefault((int(h[H["source_partition"]]), int(h[H["source_offset"]])), []).append(h[H["reason"]])
    return out


# --- event histories -----------------------------------------------------------------------------------------


def doc_text(tenant: str, doc: str, version: int, sentences: int, rng: random.Random) -> str:
    """A document body: a stable opening per document (so updates reuse chunks) and a version-specific tail."""
    words = [
        "ledger",
        "harbour",
        "invoice",
        "glacier",
        "turbine",
        "orchid",
        "compiler",
        "saffron",
        "meadow",
        "quartz",
        "lantern",
        "protocol",
        "falcon",
        "granite",
        "cobalt",
        "violin",
        "nebula",
        "tundra",
    ]
    stable = [
        f"{doc} of {tenant} opens with clause {i} about the {words[(i + len(doc)) % len(words)]}."
        for i in range(sentences // 2)
    ]
    tail = [
        f"Revision {version} adds note {j}: the {rng.choice(words)} meets the {rng.choice(words)} "
        f"near marker {rng.randrange(10**6)}."
        for j in range(sentences - len(stable))
    ]
    return " ".join(stable + tail)


def upsert(tenant: str, doc: str, version: int, text: str, **access: Any) -> tuple[bytes, bytes]:
    event = {
        "type": "upsert",
        "tenant_id": tenant,
        "doc_id": doc,
        "version": version,
        "title": f"{doc} v{version}",
        "text": text,
        "metadata": {"v": version},
        "access": access or {"public": True},
    }
    return f"{tenant}/{doc}".encode(), json.dumps(event).encode()


def delete(tenant: str, doc: str, version: int) -> tuple[bytes, bytes]:
    event = {"type": "delete", "tenant_id": tenant, "doc_id": doc, "version": version}
    return f"{tenant}/{doc}".encode(), json.dumps(event).encode()


def tombstone(tenant: str, doc: str) -> tuple[bytes, None]:
    return f"{tenant}/{doc}".encode(), None


@dataclass
class History:
    """A seeded stream of document events with every kind of trouble the ingest rules must absorb."""

    records: list[tuple[bytes | None, bytes | None]] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    #: indexes into ``records`` of the ones that must be dead-lettered
    junk: list[int] = field(default_factory=list)

    def add(self, kind: str, record: tuple[bytes | None, bytes | None]) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if kind == "junk":
            self.junk.append(len(self.records))
        self.records.append(record)


def mixed_history(
    rng: random.Random, *, docs: int, events: int, tenants: Sequence[str] = ("acme", "globex"), max_sentences: int = 70
) -> History:
    """Upserts, updates, deletes, tombstones, re-creations, exact duplicates, late older versions and junk."""
    h = History()
    keys = [(rng.choice(tenants), f"doc-{i}") for i in range(docs)]
    top: dict[tuple[str, str], int] = {}
    sent: dict[tuple[str, str], list[tuple[bytes | None, bytes | None]]] = {}
    while len(h.records) < events:
        key = rng.choice(keys)
        tenant, doc = key
        version = top.get(key, 0)
        roll = rng.random()
        if roll < 0.55 or key not in top:
            version += rng.randint(1, 2)
            top[key] = version
            rec: tuple[bytes | None, bytes | None] = upsert(
                tenant, doc, version, doc_text(tenant, doc, version, rng.randint(3, max_sentences), rng)
            )
            kind = "upsert"
        elif roll < 0.67 and sent.get(key):
            rec, kind = rng.choice(sent[key]), "duplicate"
        elif roll < 0.77 and version > 1:
            old = rng.randint(1, version - 1)
            rec = upsert(tenant, doc, old, doc_text(tenant, doc, old, rng.randint(3, max_sentences), rng))
            kind = "late_older_version"
        elif roll < 0.86:
            version += rng.randint(0, 1)
            top[key] = version
            rec, kind = delete(tenant, doc, version), "delete"
        elif roll < 0.93:
            rec, kind = tombstone(tenant, doc), "tombstone"
        else:
            rec, kind = (f"{tenant}/{doc}".encode(), b'{"type": "upsert", "broken'), "junk"
        h.add(kind, rec)
        if kind in ("upsert", "delete", "tombstone"):
            sent.setdefault(key, []).append(rec)
    return h


# --- results for RELIABILITY.md ------------------------------------------------------------------------------


def results_path() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)


def record_result(
    scenario: str,
    *,
    events: int,
    report: ConsistencyReport | None = None,
    lost: int = 0,
    duplicated: int = 0,
    stale: int = 0,
    leaked: int = 0,
    notes: str = "",
    **details: Any,
) -> dict[str, Any]:
    """Append one run's counts (call it before asserting, so a failing run is recorded with its real counts).

    lost = chunks of a live document's newest version that the store lacks (the checker's missing) plus any
    given extra (e.g. bad records absent from the dead-letter topic); stale = chunks of an old version (stale)
    or of no live document (extra); duplicated = chunks stored twice plus any given extra.
    """
    row = {
        "scenario": scenario,
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "events": events,
        "lost": lost + (report.missing if report else 0),
        "duplicated": duplicated + (report.duplicated if report else 0),
        "stale": stale + ((report.stale + report.extra) if report else 0),
        "leaked": leaked,
        "checker": report.summary() if report else None,
        "notes": notes,
        "details": details,
    }
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def assert_consistent(report: ConsistencyReport) -> None:
    assert report.ok, report.summary() + "\n" + "\n".join(report.examples)
    assert report.expected_chunks == report.stored_chunks


@contextlib.contextmanager
def cleanup(scenario: Scenario):
    """Kill the scenario's leftover workers and lift its fault, whatever happens in the test."""
    try:
        yield scenario
    finally:
        scenario.stop_all()
        scenario.fault_file.unlink(missing_ok=True)
