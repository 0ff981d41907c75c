"""``python -m tests.support.faulty_worker``: the real ``vectorstream worker`` with its store wrapped in
:class:`~tests.support.faulty_store.FaultyStore`, switched by the file ``VECTORSTREAM_TEST_FAULT_FILE`` names,
and a test-side counter of the records it handled per partition (how a scale-out test sees who consumed what).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import Counter

from agents.worker import run_worker
from pipeline.decode import Record
from pipeline.ingest import BatchReport, IngestService
from tests.support.faulty_store import FaultyStore

FAULT_FILE_ENV = "VECTORSTREAM_TEST_FAULT_FILE"


def _count_partitions() -> None:
    """Registered only in the worker process (never where this module is merely imported, e.g. by a test that
    checks every registered metric is on the dashboard): on the worker's /metrics beside the product's, records
    whose batch handle() finished (written or dead-lettered, so about to be acked), by partition; partitions
    are few, so the label is bounded."""
    handled = Counter(
        "vectorstream_test_records_handled_total", "Records this worker's ingest finished, by partition", ["partition"]
    )
    handle = IngestService.handle

    async def counted(self: IngestService, records: Sequence[Record]) -> BatchReport:
        report = await handle(self, records)
        for record in records:
            handled.labels(partition=str(record.partition)).inc()
        return report

    IngestService.handle = counted  # type: ignore[method-assign]


def main() -> int:
    fault_file = os.environ.get(FAULT_FILE_ENV)
    if not fault_file:
        print(f"{FAULT_FILE_ENV} must name the fault file", file=sys.stderr)
        return 2
    _count_partitions()
    return run_worker(wrap_store=lambda store: FaultyStore(store, Path(fault_file)))


if __name__ == "__main__":
    sys.exit(main())
