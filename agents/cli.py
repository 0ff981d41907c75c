"""The ``vectorstream`` command: ``worker`` runs the agents, ``demo`` runs the whole thing on the embedded defaults,
``up`` keeps a local one running, ``publish`` sends files as document events, ``ask``/``query``/``token``/``recall``
search, ``schemas`` writes or checks the JSON Schema files, ``check`` audits the store.
"""

from __future__ import annotations

import argparse
import sys

#: the local data folder of `demo` and `up` (one index: what the demo indexed, `up` serves)
DATA_DIR = ".vectorstream/demo"
#: the tenant of `demo`, `publish` and `ask` unless told otherwise, so they meet without flags
TENANT = "demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vectorstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("worker", help="run the ingest agent against the Kafka and Qdrant named in settings")

    demo = sub.add_parser("demo", help="start an embedded broker and Qdrant Edge, index this project's docs")
    demo.add_argument(
        "--data-dir", default=DATA_DIR, help="where Qdrant Edge persists (default %(default)s, shared with `up`)"
    )
    demo.add_argument("--tenant", default=TENANT, help="tenant of the demo's documents (default %(default)s)")
    demo.add_argument(
        "--source",
        action="append",
        help="a folder or file to index instead of this project's docs (repeatable): Markdown, text, "
        "reStructuredText, HTML, or JSONL document events",
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="show the model's loading output too")

    up = sub.add_parser(
        "up",
        help="run an embedded broker and a worker on Qdrant Edge until Ctrl-C, for publish/ask in other terminals",
    )
    up.add_argument(
        "--data-dir", default=DATA_DIR, help="where the index persists across restarts (default %(default)s)"
    )
    up.add_argument("--tenant", default=TENANT, help="tenant shown in the printed examples (default %(default)s)")
    up.add_argument("-v", "--verbose", action="store_true", help="the worker's log on this terminal")

    publish = sub.add_parser(
        "publish",
        help="publish folders and files (Markdown, text, reStructuredText, HTML) or JSONL events as document events",
        description="Publish documents as events. Folders: every .md/.markdown/.txt/.text/.rst/.html/.htm file "
        "(hidden ones skipped), doc id = path relative to the folder, version from a manifest kept in "
        "$XDG_STATE_HOME/vectorstream/publish. Files ending .jsonl/.ndjson: one document event per line, "
        "validated before anything is sent. By default the good documents and lines are published and the bad "
        "ones named (exit 1); with --strict nothing is sent when any is bad.",
    )
    publish.add_argument("paths", nargs="+", metavar="PATH", help="folders, files, or JSONL files of events")
    publish.add_argument("--tenant", default=TENANT, help="tenant of the documents from files (default %(default)s)")
    publish.add_argument("--user", action="append", default=[], help="a user who may read them (repeatable)")
    publish.add_argument("--group", action="append", default=[], help="a group that may read them (repeatable)")
    publish.add_argument(
        "--public",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="readable by everyone in the tenant (default: yes, unless --user or --group is given)",
    )
    publish.add_argument("--prefix", default="", help="put before every document id (e.g. 'notes/')")
    publish.add_argument(
        "--delete-missing",
        action="store_true",
        help="delete the documents of a folder whose files are gone since its last publish",
    )
    publish.add_argument("--strict", action="store_true", help="send nothing when any file or line is bad")

    ask = sub.add_parser("ask", help="ask questions at a prompt and see the hits (over Kafka, a development token)")
    ask.add_argument("questions", nargs="*", metavar="QUESTION", help="ask these and exit (default: a prompt)")
    ask.add_argument("--tenant", default=TENANT, help="default %(default)s")
    ask.add_argument("--user", default="me", help="user of the development token (default %(default)s)")
    ask.add_argument("--group", action="append", default=[], help="a group of the user (repeatable)")
    ask.add_argument("--top-k", type=int, default=5)
    ask.add_argument("--no-text", action="store_true", help="titles only, no chunk text")
    ask.add_argument("--timeout", type=float, default=30.0)

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
    query.add_argument(
        "--mode",
        choices=("dense", "sparse", "hybrid"),
        help="dense (embedding), sparse (BM25) or hybrid (both, fused in the store); default: hybrid where the "
        "collection has sparse vectors, else dense",
    )
    query.add_argument("--fusion", choices=("rrf", "dbsf"), help="how hybrid fuses the two (default rrf)")
    query.add_argument("--no-text", action="store_true", help="titles only, no chunk text")
    query.add_argument("--timeout", type=float, default=30.0)

    token = sub.add_parser(
        "token",
        help=(
            "mint a query token: HS256 with the configured secret (else the development secret, which only a "
            "worker in query.dev_mode accepts), or RS256 with --private-key"
        ),
    )
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

        return run_demo(data_dir=args.data_dir, tenant=args.tenant, sources=args.source, verbose=args.verbose)
    if args.command == "up":
        from agents.up import run_up

        return run_up(data_dir=args.data_dir, tenant=args.tenant, verbose=args.verbose)
    if args.command == "publish":
        from agents.commands import run_publish_command

        return run_publish_command(
            args.paths,
            tenant=args.tenant,
            users=args.user,
            groups=args.group,
            public=args.public,
            prefix=args.prefix,
            delete_missing=args.delete_missing,
            strict=args.strict,
        )
    if args.command == "ask":
        from agents.commands import run_ask_command

        return run_ask_command(
            args.questions,
            tenant=args.tenant,
            user=args.user,
            groups=args.group,
            top_k=args.top_k,
            with_text=not args.no_text,
            wait=args.timeout,
        )
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
                mode=args.mode,
                fusion=args.fusion,
                with_text=not args.no_text,
                wait=args.timeout,
            )
        )
    if args.command == "token":
        from agents.commands import dev_token
        from pipeline.auth import mint_token
        from pipeline.settings import Settings

        settings = Settings()
        if args.private_key:
            minted = mint_token(
                settings.query,
                tenant=args.tenant,
                user=args.user,
                groups=args.group or [],
                ttl_seconds=args.ttl,
                private_key=args.private_key,
            )
        else:
            minted = dev_token(
                settings, tenant=args.tenant, user=args.user, groups=args.group or [], ttl_seconds=args.ttl
            )
        print(minted)
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
