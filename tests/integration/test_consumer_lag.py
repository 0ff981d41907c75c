"""The consumer-lag gauge of real workers on Apache Kafka: it is the log-end offset minus the group's committed
offset, and after a rebalance each worker reports only the partitions it owns."""

from __future__ import annotations

import re
import uuid

import pytest

from pipeline.client import DocumentPublisher
from schemas.events import DocumentUpsert
from tests.integration.workers import WorkerProcess
from tests.support.faulty_worker import FAULT_FILE_ENV

pytestmark = pytest.mark.integration

LAG = "vectorstream_consumer_lag_messages"
PARTITIONS = {0, 1, 2}  # WorkerProcess creates its topics with 3 partitions
HELD_BACK = 9


def lag_by_partition(worker: WorkerProcess) -> dict[int, float]:
    out: dict[int, float] = {}
    for name, value in (worker.metrics() or {}).items():
        found = re.fullmatch(LAG + r"\{partition=(\d+)\}", name)
        if found:
            out[int(found.group(1))] = value
    return out


def event(i: int) -> DocumentUpsert:
    return DocumentUpsert(
        type="upsert",
        tenant_id="acme",
        doc_id=f"lag-{i}",
        version=1,
        title=f"Lag {i}",
        text=f"Document {i} about consumer lag, committed offsets and log-end offsets.",
        access={"public": True},
    )


async def test_lag_is_end_minus_committed_and_follows_the_assignment(apache_kafka, tmp_path):
    broker = apache_kafka.bootstrap_servers
    run = uuid.uuid4().hex[:8]
    topic, dlq, group = f"lag-{run}", f"lag-{run}.dlq", f"g-lag-{run}"
    fault_file = tmp_path / "store-down"

    def worker(name: str, **env: str) -> WorkerProcess:
        return WorkerProcess(
            bootstrap=broker,
            store_path=tmp_path / f"edge-{name}",
            topic=topic,
            dlq=dlq,
            group=group,
            log_path=tmp_path / f"{name}.log",
            extra_env=env,
            module="tests.support.faulty_worker",
        )

    first = worker("first", **{FAULT_FILE_ENV: str(fault_file)}).start()
    second: WorkerProcess | None = None
    try:
        first.wait_for(lambda: set(lag_by_partition(first)) == PARTITIONS, 300, "lag of every partition")
        assert sum(lag_by_partition(first).values()) == 0  # an empty topic, never committed: nothing to replay

        # the store refuses every call: the events are consumed but never committed, so the lag is all of them
        fault_file.write_text("down")
        async with DocumentPublisher(broker, topic) as pub:
            await pub.publish_many(event(i) for i in range(HELD_BACK))
        first.wait_for(lambda: sum(lag_by_partition(first).values()) == HELD_BACK, 120, "lag of the held-back events")
        assert first.events("indexed") == 0

        fault_file.unlink()  # the store is back: everything is indexed and committed
        first.wait_for(lambda: sum(lag_by_partition(first).values()) == 0, 120, "lag back to 0 after the commit")
        assert first.events("indexed") == HELD_BACK

        # a second worker joins: each reports only the partitions it owns, the first forgets the ones it gave up
        second = worker("second", **{FAULT_FILE_ENV: str(tmp_path / "never")}).start()

        def split() -> bool:
            mine, theirs = set(lag_by_partition(first)), set(lag_by_partition(second))
            return bool(mine) and bool(theirs) and not mine & theirs and mine | theirs == PARTITIONS

        second.wait_for(split, 300, "the partitions split between the two workers' lag gauges")
        # committed offsets are the broker's: the partitions the second worker took over are caught up, not new
        assert sum(lag_by_partition(first).values()) + sum(lag_by_partition(second).values()) == 0

        assert second.terminate() == 0
        first.wait_for(lambda: set(lag_by_partition(first)) == PARTITIONS, 120, "every partition back on the first")
        assert sum(lag_by_partition(first).values()) == 0
        assert first.terminate() == 0
    finally:
        for w in (first, second):
            if w is not None and w.proc is not None and w.proc.poll() is None:
                w.kill()
