"""The consistency checker: the newest state of every (tenant, document) in the source topic against
what the vector store holds. Missing, stale, extra and duplicated chunks must all be zero after a run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pipeline.chunking import Chunker
from pipeline.decode import Event, Record, Rejected, decode_record
from pipeline.ingest import UpsertOp, doc_key_of, resolve
from pipeline.settings import Settings
from pipeline.store.base import CHUNK_INDEX, CONTENT_HASH, VERSION, VectorStore

DocKey = tuple[str, str]


@dataclass(frozen=True)
class ExpectedDoc:
    version: int
    #: content hash of each chunk, by index; empty when the document should not exist
    chunk_hashes: tuple[str, ...]


@dataclass
class ConsistencyReport:
    events: int = 0
    dead_letters: int = 0
    documents: int = 0
    expected_chunks: int = 0
    stored_chunks: int = 0
    missing: int = 0
    stale: int = 0
    extra: int = 0
    duplicated: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.stale or self.extra or self.duplicated)

    def summary(self) -> str:
        verdict = "consistent" if self.ok else "INCONSISTENT"
        return (
            f"{verdict}: {self.events} events ({self.dead_letters} dead letters), {self.documents} live documents, "
            f"{self.expected_chunks} chunks expected, {self.stored_chunks} stored; missing {self.missing}, "
            f"stale {self.stale}, extra {self.extra}, duplicated {self.duplicated}"
        )


def expected_state(
    records: Iterable[Record], chunker: Chunker, settings: Settings
) -> tuple[dict[DocKey, ExpectedDoc], int, int]:
    """Replay the topic with the ingest rules (same decoder, same ``resolve``): the newest state per document.

    Records must come in offset order per partition; one document's records all sit in one partition.
    Returns (expected documents, events, dead letters).
    """
    cfg = settings.ingest
    events: list[tuple[Record, Event]] = []
    n = bad = 0
    for record in records:
        n += 1
        decoded = decode_record(record, max_bytes=cfg.max_message_bytes, max_depth=cfg.max_json_depth)
        if isinstance(decoded, Rejected):
            bad += 1
        else:
            events.append((record, decoded))
    expected: dict[DocKey, ExpectedDoc] = {}
    for op in resolve(events, {}):
        if isinstance(op, UpsertOp):
            ev = op.event
            chunks = chunker.split(chunker.document_text(ev.title, ev.text))
            expected[op.key] = ExpectedDoc(ev.version, tuple(c.content_hash for c in chunks))
        else:
            expected[op.key] = ExpectedDoc(op.version, ())
    return expected, n, bad


async def check_store(
    store: VectorStore,
    expected: dict[DocKey, ExpectedDoc],
    *,
    events: int = 0,
    dead_letters: int = 0,
    max_examples: int = 10,
) -> ConsistencyReport:
    """Compare every stored chunk with the expected state."""
    report = ConsistencyReport(events=events, dead_letters=dead_letters)
    stored = await store.scroll(None, limit=10_000_000)
    report.stored_chunks = len(stored)
    seen: Counter[tuple[DocKey, int]] = Counter()
    present: dict[DocKey, set[int]] = {}

    def note(kind: str, text: str) -> None:
        if len(report.examples) < max_examples:
            report.examples.append(f"{kind}: {text}")

    for hit in stored:
        p = hit.payload
        key = doc_key_of(p)
        idx = int(p.get(CHUNK_INDEX, -1))
        if key is None:
            report.extra += 1
            note("extra", f"point {hit.id} names no tenant and document")
            continue
        seen[(key, idx)] += 1
        exp = expected.get(key)
        if exp is None or idx >= len(exp.chunk_hashes) or idx < 0:
            report.extra += 1
            note("extra", f"{key} chunk {idx} (version {p.get(VERSION)})")
            continue
        if p.get(VERSION) != exp.version or p.get(CONTENT_HASH) != exp.chunk_hashes[idx]:
            report.stale += 1
            note("stale", f"{key} chunk {idx}: version {p.get(VERSION)}, expected {exp.version}")
        present.setdefault(key, set()).add(idx)
    report.duplicated = sum(c - 1 for c in seen.values() if c > 1)
    for key, exp in expected.items():
        if not exp.chunk_hashes:
            continue
        report.documents += 1
        report.expected_chunks += len(exp.chunk_hashes)
        have = present.get(key, set())
        missing = len(exp.chunk_hashes) - len(have)
        if missing:
            report.missing += missing
            note("missing", f"{key}: {missing} of {len(exp.chunk_hashes)} chunks of version {exp.version}")
    return report


async def check_topic(
    settings: Settings, chunker: Chunker, *, model: str, dim: int, progress: Callable[[str], None] | None = None
) -> ConsistencyReport:
    """Read the documents topic from its beginning to its end offsets and check the store named in ``settings``
    against it. The store must not be open elsewhere (Qdrant Edge and qdrant-client local mode lock their folder)."""
    from pipeline.client import read_records
    from pipeline.store import open_store

    say = progress or (lambda _: None)
    k = settings.kafka
    say(f"reading {k.documents_topic} on {k.bootstrap_servers} from the beginning")
    records = await read_records(k, k.documents_topic)
    say(f"replaying {len(records)} records with the ingest rules")
    expected, events, bad = expected_state(records, chunker, settings)
    store = open_store(settings.store)
    await store.open(model=model, dim=dim)
    try:
        say(f"comparing {len(expected)} documents with the {settings.store.backend} store")
        return await check_store(store, expected, events=events, dead_letters=bad)
    finally:
        await store.close()
