"""``vectorstream demo``: the whole pipeline on the embedded defaults, on a real corpus.

Starts Tansu (an embedded Kafka-compatible broker) and a worker on Qdrant Edge, publishes this project's
own Markdown docs (or ``--source`` folders and files in any format ``publish`` reads) as events of a demo
tenant, shows ingest progress, asks a few questions and summarizes what was indexed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from schemas.events import AccessControl, DocumentDelete, DocumentUpsert

_SKIP_DIRS = {".git", ".vectorstream", "node_modules", ".venv", "venv", "__pycache__", ".pytest_cache"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80] or "section"


def markdown_sections(root: Path) -> Iterator[tuple[str, str, str]]:
    """(doc_id, title, text) for each second-level section of each Markdown file under ``root``."""
    for path in sorted(root.rglob("*.md")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts = re.split(r"(?m)^(?=## )", text)
        for i, part in enumerate(parts):
            if not part.strip():
                continue
            first = part.strip().splitlines()[0].lstrip("#").strip()
            yield f"{rel.as_posix()}:{i}-{_slug(first)}", f"{rel.as_posix()}: {first}"[:200], part


def module_docstrings() -> Iterator[tuple[str, str, str]]:
    """Docstrings of the installed package's modules: a corpus that exists even outside a clone."""
    import importlib
    import pkgutil

    import agents
    import pipeline
    import schemas

    for pkg in (pipeline, agents, schemas):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            try:
                mod = importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - an optional dependency missing is no reason to stop a demo
                continue
            if mod.__doc__ and mod.__doc__.strip():
                yield f"module/{info.name}", info.name, mod.__doc__


def demo_corpus(source: Path, tenant: str, version: int) -> list[DocumentUpsert]:
    """This project's docs: its Markdown files cut at second-level headings, and its modules' docstrings."""
    docs = list(markdown_sections(source)) + list(module_docstrings())
    events = []
    for doc_id, title, text in docs:
        # operations docs are readable by the ops group only, the rest by everyone in the tenant
        ops_only = "deploy" in doc_id or "RELIABILITY" in doc_id
        access = AccessControl(public=not ops_only, groups=["ops"] if ops_only else [])
        kind = "module" if doc_id.startswith("module/") else "markdown"
        events.append(
            DocumentUpsert(
                type="upsert",
                tenant_id=tenant,
                doc_id=doc_id[:256],
                version=version,
                title=title,
                text=text,
                metadata={"kind": kind},
                access=access,
            )
        )
    return events


def source_corpus(
    sources: list[str], tenant: str, version: int
) -> tuple[list[DocumentUpsert | DocumentDelete], list[str]]:
    """The documents of ``--source`` folders and files (any format ``vectorstream publish`` reads), readable by
    everyone in ``tenant``, all at ``version``; and the problems met (files not read, bad JSONL lines).
    JSONL events keep their own tenant and version; no publish manifest is kept for a demo."""
    from pipeline.sources import EVENT_SUFFIXES, TEXT_FORMATS, read_document, read_event_lines, walk_folder

    events: list[DocumentUpsert | DocumentDelete] = []
    problems: list[str] = []
    for given in sources:
        path = Path(given).expanduser()
        if path.is_file() and path.suffix.lower() in EVENT_SUFFIXES:
            lines, bad = read_event_lines(path, given)
            events.extend(event for _, event in lines)
            problems.extend(str(p) for p in bad)
            continue
        root = path.resolve()
        if path.is_dir():
            files = [(f, PurePosixPath(f.relative_to(root).as_posix())) for f in walk_folder(root)]
        elif path.is_file():
            files = [(root, PurePosixPath(root.name))]
        else:
            problems.append(f"{given}: no such file or folder")
            continue
        for file, rel in files:
            if file.suffix.lower() not in TEXT_FORMATS:
                continue
            try:
                doc = read_document(file, rel)
                events.append(
                    DocumentUpsert(
                        type="upsert",
                        tenant_id=tenant,
                        doc_id=doc.doc_id,
                        version=version,
                        title=doc.title,
                        text=doc.text,
                        metadata={"path": doc.rel_path[:1024], "format": doc.format},
                        access=AccessControl(public=True),
                    )
                )
            except (ValueError, OSError) as exc:
                problems.append(f"{file}: {exc}")
    return events, problems


def quiet_model_loading() -> None:
    """Silence the model's loading chatter ("Loading weights" bars, transformers' and sentence-transformers'
    info logs) in this process and the processes it starts: it tells a newcomer nothing. ``-v`` keeps it."""
    import logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "sentence_transformers", "huggingface_hub", "nncf", "openvino"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events_done(metrics_port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "vectorstream_events":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


async def _publish(bootstrap: str, topic: str, events: list[DocumentUpsert | DocumentDelete]) -> None:
    from pipeline.client import DocumentPublisher

    async with DocumentPublisher(bootstrap, topic) as pub:
        await pub.publish_many(events)


def run_demo(data_dir: str, tenant: str, sources: list[str] | None = None, verbose: bool = False) -> int:
    """Index ``sources`` (default: this project's docs) on an embedded broker and Qdrant Edge, ask, summarize."""
    from tqdm import tqdm

    from pipeline.embedded_broker import Tansu

    if not verbose:
        quiet_model_loading()
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    version = int(time.time())
    events: list[DocumentUpsert | DocumentDelete]
    if sources:
        events, problems = source_corpus(sources, tenant, version)
        for problem in problems:
            print(f"not indexed: {problem}")
        where = ", ".join(sources)
    else:
        events = list(demo_corpus(Path(".").resolve(), tenant, version))
        where = str(Path(".").resolve())
    if not events:
        print(f"vectorstream demo: nothing to index in {where}")
        return 1
    print(f"vectorstream demo: {len(events)} documents from {where} for tenant {tenant!r}")

    metrics_port = _free_port()
    with Tansu() as broker:
        env = {
            **os.environ,
            "VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "VECTORSTREAM_KAFKA__GROUP_ID": "vectorstream-demo",
            # Tansu holds a group join for about half the session timeout: keep it short on one machine
            "VECTORSTREAM_KAFKA__SESSION_TIMEOUT_SECONDS": "3",
            "VECTORSTREAM_KAFKA__HEARTBEAT_INTERVAL_SECONDS": "1",
            "VECTORSTREAM_STORE__BACKEND": "edge",
            "VECTORSTREAM_STORE__PATH": str(data / "qdrant-edge"),
            "VECTORSTREAM_METRICS__PORT": str(metrics_port),
            "VECTORSTREAM_METRICS__HOST": "127.0.0.1",
            # a laptop demo: query tokens are signed with the development secret (never outside a laptop)
            "VECTORSTREAM_QUERY__DEV_MODE": "true",
        }
        log_path = data / "worker.log"
        print(f"broker: Tansu at {broker.bootstrap_servers}; worker log: {log_path}")
        with open(log_path, "w") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "agents.cli", "worker"], env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            from pipeline.settings import Settings

            settings = Settings(_env_file=None)
            topic = settings.kafka.documents_topic
            # the worker creates the topics once its model and store are ready: wait for its /metrics
            with tqdm(total=len(events), unit="doc", desc="ingest", file=sys.stdout) as bar:
                bar.set_postfix_str("starting worker")
                published = False
                started = time.monotonic()
                while True:
                    if worker.poll() is not None:
                        print(f"worker exited with {worker.returncode}; see {log_path}")
                        return 1
                    done = _events_done(metrics_port)
                    if done is not None and not published:
                        asyncio.run(_publish(broker.bootstrap_servers, topic, events))
                        published = True
                        bar.set_postfix_str("consumer group joining")
                    if done is not None and done > bar.n:
                        bar.set_postfix_str("")
                        bar.update(int(min(done, len(events)) - bar.n))
                    if done is not None and done >= len(events):
                        break
                    if time.monotonic() - started > 600:
                        print(f"gave up waiting after 600 s; see {log_path}")
                        return 1
                    time.sleep(0.5)
            # ask the indexed corpus a few questions through the queries topic, while the worker still runs
            questions = DEMO_QUESTIONS if not sources else _title_questions(events, tenant)
            asyncio.run(_ask(broker.bootstrap_servers, settings, tenant, questions))
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
    code = asyncio.run(_summarize(data, tenant, len(events), questions[0] if questions else None))
    print(
        "\nkeep it running and bring your own documents (in two terminals):\n"
        f"  vectorstream up{'' if data_dir == '.vectorstream/demo' else f' --data-dir {data_dir}'}\n"
        f"  vectorstream publish ~/my-notes --tenant {tenant}  &&  vectorstream ask --tenant {tenant}"
    )
    return code


#: questions the demo asks of this project's own docs (the last one is answered from ops-only documents)
DEMO_QUESTIONS = (
    "How are offsets committed after a write?",
    "What happens to a record that cannot be decoded?",
    "Which alerts does Prometheus raise?",
)


def _title_questions(events: list[DocumentUpsert | DocumentDelete], tenant: str) -> tuple[str, ...]:
    """For a corpus of one's own: ask for the titles of (up to) three of its documents."""
    titles = [e.title for e in events if isinstance(e, DocumentUpsert) and e.tenant_id == tenant and e.title]
    step = max(len(titles) // 3, 1)
    return tuple(titles[::step][:3])


async def _ask(bootstrap: str, settings: Any, tenant: str, questions: tuple[str, ...]) -> None:
    """Ask ``questions`` over Kafka as user "demo-user" of group "ops" and print each answer as a table."""
    from agents.commands import hits_table, query_client
    from pipeline.auth import mint_token
    from pipeline.client import QueryFailed

    k = settings.kafka
    # the demo's worker runs in dev mode: sign with the secret it checks (a configured one wins over dev mode)
    query = settings.query.model_copy(update={"dev_mode": True})
    token = mint_token(query, tenant=tenant, user="demo-user", groups=["ops"])
    print(
        f"\nasking {len(questions)} questions through topic {k.queries_topic!r} "
        f"as user 'demo-user' (group 'ops') of tenant {tenant!r}"
    )
    here = settings.model_copy(update={"kafka": k.model_copy(update={"bootstrap_servers": bootstrap})})
    async with query_client(here, tenant=tenant, token=token, startup_timeout=60) as client:
        for question in questions:
            print(f"\nQ: {question}")
            try:
                result = await client.ask(question, top_k=3, timeout=60)
            except (QueryFailed, TimeoutError) as exc:
                print(f"   no answer: {exc!r}")
                continue
            print(hits_table(result, width=110))
            print(f"   ({result.took_ms:.0f} ms in the worker)")


async def _summarize(data: Path, tenant: str, n_events: int, question: str | None) -> int:
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings
    from pipeline.store import open_store
    from pipeline.store.base import DOC, TENANT, Filter, Match

    os.environ["VECTORSTREAM_STORE__PATH"] = str(data / "qdrant-edge")
    settings = Settings(_env_file=None)
    embedder = Embedder(settings)
    store = open_store(settings.store)
    info = await store.open(model=embedder.name, dim=embedder.dim)
    try:
        tenant_filter = Filter(must=(Match(TENANT, tenant),))
        chunks = await store.count(tenant_filter)
        hits = await store.scroll(tenant_filter, limit=100_000)
        docs = {h.payload[DOC] for h in hits}
        print()
        print(
            f"indexed: {len(docs)} documents of tenant {tenant!r} as {chunks} chunks "
            f"({info.model}, {info.dim} dimensions, cosine, HNSW)"
        )
        print(f"where:   Qdrant Edge shard at {data / 'qdrant-edge'} (collection {settings.store.collection!r})")
        print(f"events:  {n_events} published; re-running the demo re-publishes them with a newer version,")
        print("         and unchanged chunks reuse their stored vectors")
        if question is None:
            return 0
        vec = (await embedder.encode([question]))[0]
        top = await store.search(vec, flt=tenant_filter, limit=3)
        print(f"\nask: {question}")
        for hit in top:
            print(f"  {hit.score:.3f}  {hit.payload[DOC]}")
    finally:
        await store.close()
        embedder.close()
    return 0
