"""The ``vectorstream`` command: ``worker`` runs the agents, ``demo`` runs the whole thing on the
embedded defaults, ``schemas`` writes or checks the JSON Schema files.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vectorstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("worker", help="run the ingest agent against the Kafka and Qdrant named in settings")

    demo = sub.add_parser("demo", help="start an embedded broker and Qdrant Edge, index this project's docs")
    demo.add_argument("--data-dir", default=".vectorstream/demo",
                      help="where Qdrant Edge persists (default %(default)s)")
    demo.add_argument("--tenant", default="demo")
    demo.add_argument("--source", default=".", help="folder whose Markdown files are the corpus (default: here)")

    schemas = sub.add_parser("schemas", help="write the JSON Schema files of the wire contracts")
    schemas.add_argument("--check", action="store_true", help="fail if the committed files are not current")

    args = parser.parse_args(argv)
    if args.command == "worker":
        from agents.worker import run_worker

        return run_worker()
    if args.command == "demo":
        from pipeline.demo import run_demo

        return run_demo(data_dir=args.data_dir, tenant=args.tenant, source=args.source)
    if args.command == "schemas":
        from schemas.generate import main as generate

        return generate(check=args.check)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
