"""The bodies of the ``vectorstream`` commands that print for a person: ``query``, ``recall`` and ``check``.

They call the library (``pipeline``) and format its answers; ``agents/cli.py`` parses the arguments.
"""

from __future__ import annotations

import argparse
import asyncio

from pipeline.client import QueryClient, QueryFailed
from pipeline.consistency import check_topic
from pipeline.kafka import KafkaConnectError
from pipeline.recall import run_recall
from pipeline.settings import Settings
from schemas.queries import QueryResult


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
    with_text: bool = True,
    wait: float = 30.0,
) -> int:
    """``vectorstream query``: ask one question over Kafka and print the hits as a table."""
    import json
    import sys

    from pipeline.auth import mint_token
    from pipeline.settings import Settings

    settings = Settings()
    k = settings.kafka
    if token is None:  # a development token for the tenant, signed with the configured secret
        token = mint_token(settings.query, tenant=tenant, user=user, groups=groups or [])
    flt = json.loads(filter_json) if filter_json else None
    try:
        async with QueryClient(
            k,  # bootstrap servers, TLS and SASL as configured
            queries_topic=k.queries_topic,
            replies_topic=k.replies_topic,
            tenant=tenant,
            token=token,
            startup_timeout=min(wait, 30.0),
        ) as client:
            try:
                result = await client.ask(
                    query, top_k=top_k, filter=flt, hnsw_ef=hnsw_ef, exact=exact, with_text=with_text, timeout=wait
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
    print(f"\n{len(result.hits)} hits for tenant {tenant!r} in {result.took_ms:.1f} ms ({result.model})")
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
