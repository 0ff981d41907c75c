"""The ``vectorstream`` command: ``worker`` runs the agents, ``demo`` runs the whole thing on the embedded defaults,
``schemas`` writes or checks the JSON Schema files, ``query``/``token``/``recall`` search, ``check`` audits the store.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vectorstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("worker", help="run the ingest agent against the Kafka and Qdrant named in settings")

    demo = sub.add_parser("demo", help="start an embedded broker and Qdrant Edge, index this project's docs")
    demo.add_argument(
        "--data-dir", default=".vectorstream/demo", help="where Qdrant Edge persists (default %(default)s)"
    )
    demo.add_argument("--tenant", default="demo")
    demo.add_argument("--source", default=".", help="folder whose Markdown files are the corpus (default: here)")

    schemas = sub.add_parser("schemas", help="write the JSON Schema files of the wire contracts")
    schemas.add_argument("--check", action="store_true", help="fail if the committed files are not current")

    query = sub.add_parser("query", help="ask a question over Kafka and print the hits as a table")
    query.add_argument("text", help="the question")
    query.add_argument("--tenant", required=True)
    query.add_argument("--token", help="a signed token (default: a development token minted from settings)")
    query.add_argument("--user", default="cli", help="user of the minted development token (default %(default)s)")
    query.add_argument("--group", action="append", help="a group of the minted development token (repeatable)")
    query.add_argument("--top-k", type=int, default=10)
    query.add_argument("--filter", help='metadata filter as JSON, e.g. \'{"must":[{"key":"lang","match":"en"}]}\'')
    query.add_argument("--ef", type=int, help="HNSW ef for this query (default: settings store.hnsw_ef)")
    query.add_argument("--exact", action="store_true", help="exact search instead of HNSW")
    query.add_argument("--no-text", action="store_true", help="titles only, no chunk text")
    query.add_argument("--timeout", type=float, default=30.0)

    token = sub.add_parser("token", help="mint a development query token (HS256 with the configured secret)")
    token.add_argument("--tenant", required=True)
    token.add_argument("--user", required=True)
    token.add_argument("--group", action="append", help="a group of the user (repeatable)")
    token.add_argument("--ttl", type=int, help="lifetime in seconds (default: settings query.dev_token_ttl_seconds)")
    token.add_argument("--private-key", help="sign with this PEM private key (RS256) instead of the HS256 secret")

    recall = sub.add_parser("recall", help="recall@k and latency of HNSW at several ef values against exact search")
    recall.add_argument(
        "--queries",
        help='JSON lines ("text" field) or plain lines of real question texts; default: sample stored vectors',
    )
    recall.add_argument("--tenant", action="append", help="tenant(s) to search (repeatable; required with --queries)")
    recall.add_argument("--user", help="also apply this user's access rule (with --group)")
    recall.add_argument("--group", action="append")
    recall.add_argument("-n", type=int, default=200, help="number of queries (default %(default)s)")
    recall.add_argument("-k", type=int, default=10)
    recall.add_argument("--ef", default="16,32,64,128,256,512", help="comma-separated ef values (default %(default)s)")
    recall.add_argument("--seed", type=int, default=0)

    sub.add_parser(
        "check",
        help="compare the newest version of every document in the documents topic with "
        "what the store holds; exit 1 on missing, stale, extra or duplicated chunks",
    )

    args = parser.parse_args(argv)
    if args.command == "worker":
        from agents.worker import run_worker

        return run_worker()
    if args.command == "demo":
        from agents.demo import run_demo

        return run_demo(data_dir=args.data_dir, tenant=args.tenant, source=args.source)
    if args.command == "query":
        import asyncio

        from agents.commands import run_query_command

        return asyncio.run(
            run_query_command(
                args.text,
                tenant=args.tenant,
                token=args.token,
                user=args.user,
                groups=args.group,
                top_k=args.top_k,
                filter_json=args.filter,
                hnsw_ef=args.ef,
                exact=args.exact,
                with_text=not args.no_text,
                wait=args.timeout,
            )
        )
    if args.command == "token":
        from pipeline.auth import mint_token
        from pipeline.settings import Settings

        print(
            mint_token(
                Settings().query,
                tenant=args.tenant,
                user=args.user,
                groups=args.group or [],
                ttl_seconds=args.ttl,
                private_key=args.private_key,
            )
        )
        return 0
    if args.command == "recall":
        from agents.commands import run_recall_command as recall_main

        return recall_main(args)
    if args.command == "check":
        from agents.commands import run_check_command

        return run_check_command()
    if args.command == "schemas":
        from schemas.generate import main as generate

        return generate(check=args.check)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
