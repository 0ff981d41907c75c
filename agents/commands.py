"""The bodies of the ``vectorstream`` commands that print for a person: ``publish``, ``query``, ``ask``, ``recall``
and ``check``.

They call the library (``pipeline``) and format its answers; ``agents/cli.py`` parses the arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.client import QueryClient, QueryFailed
from pipeline.consistency import check_topic
from pipeline.kafka import KafkaConnectError
from pipeline.recall import run_recall
from pipeline.settings import KafkaSettings, Settings
from schemas.queries import FusionMethod, QueryResult, SearchMode


def hits_table(result: QueryResult, *, width: int | None = None) -> str:
    """The hits of a result as a plain-text table: rank, score, document, chunk, title and the start of the text.

    ``width`` defaults to the terminal's (at least 100 columns)."""
    if width is None:
        import shutil

        width = max(shutil.get_terminal_size((120, 20)).columns, 100)
    head = ("#", "score", "doc_id", "chunk", "title", "text")
    rows = [head]
    for i, hit in enumerate(result.hits, 1):
        title, text = " ".join(hit.title.split()), " ".join((hit.text or "").split())
        if title and text.startswith(title):  # a chunk's text starts with its document's title
            text = text[len(title) :].lstrip(" .:|-")
        rows.append((str(i), f"{hit.score:.3f}", hit.doc_id, str(hit.chunk_index), title, text))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    widths[2] = min(widths[2], 30)
    widths[4] = min(widths[4], 28)
    rest = max(width - sum(widths) - 2 * 5, 16)
    lines = []
    for r in rows:
        cells = [
            r[0].rjust(widths[0]),
            r[1].rjust(widths[1]),
            _clip(r[2], widths[2]).ljust(widths[2]),
            r[3].rjust(widths[3]),
            _clip(r[4], widths[4]).ljust(widths[4]),
            _clip(r[5], rest),
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * min(width, max(len(line) for line in lines)))
    if not result.hits:
        lines.append("(no readable chunk matches)")
    return "\n".join(lines)


def dev_token(
    settings: Settings, *, tenant: str, user: str, groups: Sequence[str] = (), ttl_seconds: float | None = None
) -> str:
    """A development token for the commands that ask (query, ask, up's probe, token): signed with the configured
    HS256 secret, or with the development secret when none is configured. Minting it is harmless: a worker
    accepts the development secret only with ``query.dev_mode`` on (``vectorstream up`` and the demo)."""
    from pipeline.auth import mint_token

    query = settings.query
    if not query.hs256_key():
        query = query.model_copy(update={"dev_mode": True})
    return mint_token(query, tenant=tenant, user=user, groups=list(groups), ttl_seconds=ttl_seconds)


def query_client(settings: Settings, *, tenant: str, token: str, startup_timeout: float = 30.0) -> QueryClient:
    """The query client of every command (query, ask, up, the demo), on the topics of ``settings``."""
    k = settings.kafka
    return QueryClient(
        k,  # bootstrap servers, TLS and SASL as configured
        queries_topic=k.queries_topic,
        replies_topic=k.replies_topic,
        tenant=tenant,
        token=token,
        startup_timeout=startup_timeout,
    )


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(n - 1, 0)] + "…"


async def run_query_command(
    query: str,
    *,
    tenant: str,
    token: str | None = None,
    user: str = "cli",
    groups: list[str] | None = None,
    top_k: int = 10,
    filter_json: str | None = None,
    hnsw_ef: int | None = None,
    exact: bool = False,
    mode: SearchMode | None = None,
    fusion: FusionMethod | None = None,
    with_text: bool = True,
    wait: float = 30.0,
) -> int:
    """``vectorstream query``: ask one question over Kafka and print the hits as a table."""
    import json

    settings = Settings()
    k = settings.kafka
    if token is None:  # a development token for the tenant, signed with the configured secret
        token = dev_token(settings, tenant=tenant, user=user, groups=groups or [])
    flt = json.loads(filter_json) if filter_json else None
    try:
        async with query_client(settings, tenant=tenant, token=token, startup_timeout=min(wait, 30.0)) as client:
            try:
                result = await client.ask(
                    query,
                    top_k=top_k,
                    filter=flt,
                    hnsw_ef=hnsw_ef,
                    exact=exact,
                    mode=mode,
                    fusion=fusion,
                    with_text=with_text,
                    timeout=wait,
                )
            except QueryFailed as exc:
                print(f"error {exc.code.value}: {exc.reply.error.message}", file=sys.stderr)
                return 1
            except TimeoutError:
                print(f"no reply within {wait:.0f} s (is a worker running on {k.bootstrap_servers}?)", file=sys.stderr)
                return 1
    except KafkaConnectError as exc:
        print(f"cannot connect to Kafka: {exc}", file=sys.stderr)
        return 2
    print(hits_table(result))
    served = f"{result.mode or 'dense'}{f' {result.fusion}' if result.fusion else ''}"
    print(f"\n{len(result.hits)} hits for tenant {tenant!r} in {result.took_ms:.1f} ms ({result.model}, {served})")
    return 0


def run_recall_command(args: argparse.Namespace) -> int:
    """``vectorstream recall``: parse the ef list and run the sweep."""
    efs = tuple(int(x) for x in str(args.ef).split(",") if x.strip())
    return asyncio.run(
        run_recall(
            queries=args.queries,
            n=args.n,
            k=args.k,
            efs=efs,
            tenants=args.tenant or (),
            user=args.user,
            groups=args.group or (),
            seed=args.seed,
        )
    )


def run_check_command(settings: Settings | None = None) -> int:
    """``vectorstream check``: print the consistency summary; exit 1 when inconsistent, 2 when it cannot check."""
    import asyncio
    import sys

    from pipeline.embedding import Embedder
    from pipeline.errors import StoreUnavailableError, VectorstreamError

    settings = settings or Settings()

    def say(text: str) -> None:
        print(f"... {text}", file=sys.stderr, flush=True)

    say("loading the model's tokenizer (chunks are cut exactly as the worker cuts them)")
    embedder = Embedder(settings)
    try:
        report = asyncio.run(
            check_topic(settings, embedder.chunker(), model=embedder.name, dim=embedder.dim, progress=say)
        )
    except LookupError as exc:
        print(f"cannot check: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailableError as exc:
        print(f"cannot check: {exc} (is a worker still using this Qdrant Edge folder? stop it first)", file=sys.stderr)
        return 2
    except VectorstreamError as exc:
        print(f"cannot check: {exc}", file=sys.stderr)
        return 2
    finally:
        embedder.close()
    print(report.summary())
    for example in report.examples:
        print(f"  {example}")
    return 0 if report.ok else 1


def _quiet_kafka_client_logs() -> None:
    """aiokafka logs every failed connection attempt; the commands say once what is wrong, in their words."""
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


# --- publish ------------------------------------------------------------------------------------------------


def run_publish_command(
    paths: Sequence[str],
    *,
    tenant: str,
    users: Sequence[str] = (),
    groups: Sequence[str] = (),
    public: bool | None = None,
    prefix: str = "",
    delete_missing: bool = False,
    strict: bool = False,
    settings: Settings | None = None,
) -> int:
    """``vectorstream publish``: read, validate and version everything first, then send it with a progress bar.

    Exit 0 when everything given was published; 1 when something was not (each problem is printed with its
    file and line); 2 when nothing could be sent (Kafka unreachable). By default the good documents and lines
    are published and the bad ones named; with ``strict`` nothing is sent when anything is bad."""
    from pydantic import TypeAdapter, ValidationError

    from pipeline.sources import plan_publish, summarize
    from schemas.events import AccessControl, TenantId

    _quiet_kafka_client_logs()
    settings = settings or Settings()
    k = settings.kafka
    try:
        # readable by everyone in the tenant unless users or groups are named (then by them, or --public)
        access = AccessControl(
            public=public if public is not None else not (users or groups), users=list(users), groups=list(groups)
        )
        TypeAdapter(TenantId).validate_python(tenant)
    except ValidationError as exc:
        print(f"bad --tenant, --user or --group: {_first_error(exc)}", file=sys.stderr)
        return 2
    try:
        plan = plan_publish(
            [Path(p) for p in paths],
            tenant=tenant,
            access=access,
            bootstrap_servers=k.bootstrap_servers,
            topic=k.documents_topic,
            prefix=prefix,
            delete_missing=delete_missing,
            max_event_bytes=settings.ingest.max_message_bytes,
        )
    except ValueError as exc:
        print(f"cannot publish: {exc}", file=sys.stderr)
        return 2
    if strict and plan.problems:
        for line in summarize(plan, 0, strict=True):
            print(line)
        return 1
    sent = 0
    if plan.items:
        try:
            sent = asyncio.run(_send(k, k.documents_topic, plan.events))
        except Exception as exc:  # noqa: BLE001 - any failure to deliver: say so, record nothing as published
            print(
                f"cannot publish to Kafka at {k.bootstrap_servers} (topic {k.documents_topic!r}): {exc!r}\n"
                "is `vectorstream up` (or your Kafka) running? nothing was recorded as published",
                file=sys.stderr,
            )
            return 2
        plan.commit()
    for line in summarize(plan, sent):
        print(line)
    if sent:
        print(f"to {k.documents_topic!r} on {k.bootstrap_servers} for tenant {tenant!r}; ask with: vectorstream ask")
    return 1 if plan.problems else 0


def _first_error(exc: Any) -> str:
    err = exc.errors(include_url=False)[0]
    return f"{err.get('input')!r}: {err['msg']}"


async def _send(kafka: KafkaSettings, topic: str, events: Sequence[object]) -> int:
    """Send ``events`` and wait until the broker confirmed each one; the progress bar counts confirmations."""
    from tqdm import tqdm

    from pipeline.client import DocumentPublisher

    pub = DocumentPublisher(kafka, topic, request_timeout_ms=30_000)  # TLS and SASL as configured
    try:
        await pub.__aenter__()
    except BaseException:
        with contextlib.suppress(Exception):  # a producer that failed to start still holds a connection
            await pub.__aexit__(None, None, None)
        raise
    try:
        with tqdm(total=len(events), unit="doc", desc="publish", disable=None) as bar:
            futures = []
            for event in events:
                fut = await pub.send(event)  # type: ignore[arg-type]
                fut.add_done_callback(lambda _f: bar.update(1))
                futures.append(fut)
            await pub.flush()
            await asyncio.gather(*futures)  # raises the first delivery error
    finally:
        await pub.__aexit__(None, None, None)
    return len(futures)


# --- ask ----------------------------------------------------------------------------------------------------


def run_ask_command(
    questions: Sequence[str],
    *,
    tenant: str,
    user: str,
    groups: Sequence[str] = (),
    top_k: int = 5,
    with_text: bool = True,
    wait: float = 30.0,
    settings: Settings | None = None,
) -> int:
    """``vectorstream ask``: questions in, hits tables out, over the queries topic with a development token.

    With ``questions`` it asks those and exits (1 if any got no answer); without, it prompts (when stdin is a
    terminal) or reads one question per line from stdin, until end of input, ``exit`` or Ctrl-C."""

    _quiet_kafka_client_logs()
    settings = settings or Settings()
    k = settings.kafka
    token = dev_token(settings, tenant=tenant, user=user, groups=list(groups))
    interactive = not questions and sys.stdin.isatty()
    # one loop, run only while a question is out: the prompt's input() blocks this thread between questions
    # (so Ctrl-C there is a plain KeyboardInterrupt), and aiokafka clients must be made inside their loop
    loop = asyncio.new_event_loop()
    client: QueryClient | None = None

    async def connect() -> QueryClient:
        opened = query_client(settings, tenant=tenant, token=token, startup_timeout=min(wait, 30.0))
        try:
            return await opened.__aenter__()
        except BaseException:
            with contextlib.suppress(Exception):
                await opened.__aexit__(None, None, None)
            raise

    try:
        try:
            client = loop.run_until_complete(connect())
        except (TimeoutError, OSError, Exception) as exc:  # noqa: BLE001 - say what is wrong, not a traceback
            print(f"cannot reach a worker on {k.bootstrap_servers}: {exc} (is `vectorstream up` running?)")
            return 2
        who = f"user {user!r}" + (f" (groups {', '.join(groups)})" if groups else "")
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401 - line editing and history for input()
            print(f"asking tenant {tenant!r} as {who} on {k.bootstrap_servers}; empty line or Ctrl-D to quit")
        failures = 0
        for question in _questions(questions, interactive):
            started = time.monotonic()
            try:
                result = loop.run_until_complete(client.ask(question, top_k=top_k, with_text=with_text, timeout=wait))
            except QueryFailed as exc:
                print(f"error {exc.code.value}: {exc.reply.error.message}")
                failures += 1
                continue
            except TimeoutError:
                print(f"no reply within {wait:.0f} s (is a worker running on {k.bootstrap_servers}?)")
                failures += 1
                continue
            round_trip = (time.monotonic() - started) * 1000
            if not interactive:
                print(f"Q: {question}")
            print(hits_table(result))
            print(
                f"{len(result.hits)} hits in {result.took_ms:.1f} ms in the worker "
                f"({round_trip:.0f} ms round trip, {result.model})\n",
                flush=True,
            )
        return 1 if failures and not interactive else 0
    except KeyboardInterrupt:
        print()
        return 0
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                loop.run_until_complete(client.__aexit__(None, None, None))
        loop.close()


def _questions(given: Sequence[str], interactive: bool) -> Sequence[str] | _Prompt:
    if given:
        return given
    return _Prompt(interactive)


class _Prompt:
    """Questions typed at a prompt (or read from piped stdin), one a line; stops at EOF, a blank or ``exit``."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive

    def __iter__(self) -> _Prompt:
        return self

    def __next__(self) -> str:
        while True:
            try:
                line = input("ask> ") if self.interactive else sys.stdin.readline()
            except EOFError:  # Ctrl-D at the prompt: end the prompt's line
                print()
                raise StopIteration from None
            if not self.interactive and not line:
                raise StopIteration
            question = line.strip()
            if question.lower() in {"exit", "quit", ":q"} or (self.interactive and not question):
                raise StopIteration
            if question:
                return question
