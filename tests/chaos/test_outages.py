"""Dependencies going away under a running worker: the vector store (a fault file in front of the real store) and
the broker (Apache Kafka restarted). Consumption pauses, nothing is dead-lettered, and the same worker catches up."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.chaos.harness import (
    Scenario,
    assert_consistent,
    cleanup,
    eventually,
    metric,
    mixed_history,
    record_result,
    upsert,
    wait_consuming,
)


def docs(prefix: str, n: int, rng: random.Random) -> list[tuple[bytes, bytes]]:
    return [
        upsert(
            "acme",
            f"{prefix}-{i}",
            1,
            " ".join(
                f"Part {j} of {prefix} {i} records fact {rng.randrange(10**6)}." for j in range(rng.randint(4, 50))
            ),
        )
        for i in range(n)
    ]


async def test_store_outage_pauses_consumption_then_catches_up(apache_kafka, tmp_path, settings, embedder):
    rng = random.Random(11)
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, "outage", settings).setup()
    before, during = docs("before", 12, rng), docs("during", 30, rng)
    with cleanup(sc):
        w = sc.worker({"VECTORSTREAM_INGEST__RETRY_MAX_SECONDS": "2"}).start()
        await sc.produce(before)
        await sc.wait_caught_up([w])
        indexed = w.events("indexed")
        committed = await sc.committed()

        sc.fault_file.write_text("down 0.05")  # every store call is refused after 50 ms
        await sc.produce(during)
        await eventually(
            lambda: (
                metric(w, "vectorstream_ingest_paused") == 1
                and metric(w, "vectorstream_ingest_retries_total{reason=store_unavailable}") >= 5
            ),
            timeout=120,
            what="ingest paused, retrying",
            workers=[w],
        )
        await eventually(
            lambda: metric(w, "vectorstream_consumer_lag_messages") >= len(during),
            timeout=60,
            what="the lag gauge showing the held-back events",
            workers=[w],
        )
        held = {
            "paused": metric(w, "vectorstream_ingest_paused"),
            "retries": metric(w, "vectorstream_ingest_retries_total"),
            "dead_letters": metric(w, "vectorstream_dead_letters_total"),
            "indexed": w.events("indexed") - indexed,
            "lag": metric(w, "vectorstream_consumer_lag_messages"),
            "committed_moved": await sc.committed() != committed,
        }

        sc.fault_file.unlink()  # the store is back
        await sc.wait_caught_up([w])
        await eventually(lambda: metric(w, "vectorstream_ingest_paused") == 0, timeout=30, what="unpaused", workers=[w])
        after = {"dead_letters": metric(w, "vectorstream_dead_letters_total"), "indexed": w.events("indexed") - indexed}
        code = await asyncio.to_thread(w.terminate)
    report = await sc.check(embedder)
    record_result(
        "store-outage",
        events=len(before) + len(during),
        report=report,
        notes=f"fault file 'down' under a running worker: paused with {held['retries']:.0f} retries, "
        f"{held['dead_letters']:.0f} dead letters, lag {held['lag']:.0f}; caught up after",
        held=held,
        after=after,
    )
    assert held["paused"] == 1 and held["dead_letters"] == 0 and held["indexed"] == 0, held
    assert not held["committed_moved"], "nothing may be committed while the store refuses writes"
    assert after == {"dead_letters": 0, "indexed": len(during)}, after
    assert code == 0
    assert_consistent(report)


async def restart_broker_mid_ingest(apache_kafka, tmp_path, settings, embedder, *, hard: bool, scenario: str) -> None:
    rng = random.Random(5 + hard)
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, scenario, settings).setup()
    history = mixed_history(rng, docs=30, events=160)
    half = len(history.records) // 2
    with cleanup(sc):
        w = sc.worker({"VECTORSTREAM_INGEST__MAX_BATCH_EVENTS": "8"}).start()
        await sc.produce(history.records[:half])
        await eventually(lambda: w.events() >= 16, timeout=300, what="ingest under way", workers=[w])
        at_restart = w.events()
        pid = w.proc.pid
        await asyncio.to_thread(apache_kafka.restart, hard=hard)
        # the broker is back (ready, coordinator loaded); more events arrive while the worker reconnects
        await sc.produce(history.records[half:])
        await sc.wait_caught_up([w], timeout=420)
        after_restart = w.events() - at_restart
        same_process = w.proc.pid == pid and w.proc.poll() is None
        code = await asyncio.to_thread(w.terminate)
    report = await sc.check(embedder)
    record_result(
        scenario,
        events=len(history.records),
        report=report,
        notes=f"Apache Kafka {'SIGKILLed' if hard else 'stopped'} and restarted with {at_restart:.0f} of "
        f"{len(history.records)} events done; the same worker did {after_restart:.0f} more",
        same_process=same_process,
    )
    assert same_process and after_restart > 0
    assert code == 0, w.log_tail()
    assert_consistent(report)


async def test_broker_restart_mid_ingest_worker_recovers_by_itself(apache_kafka, tmp_path, settings, embedder):
    await restart_broker_mid_ingest(apache_kafka, tmp_path, settings, embedder, hard=False, scenario="broker-restart")


@pytest.mark.slow
async def test_broker_killed_mid_ingest_worker_recovers_by_itself(apache_kafka, tmp_path, settings, embedder):
    await restart_broker_mid_ingest(apache_kafka, tmp_path, settings, embedder, hard=True, scenario="broker-kill")


@pytest.mark.slow
async def test_sigterm_during_store_outage_gives_the_batch_back(apache_kafka, tmp_path, settings, embedder):
    """A worker asked to stop while its batch waits for the store should give the batch back and leave."""
    rng = random.Random(13)
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, "outage-sigterm", settings).setup()
    batch = docs("stuck", 10, rng)
    with cleanup(sc):
        w = sc.worker({"VECTORSTREAM_INGEST__RETRY_MAX_SECONDS": "1"}).start()
        await wait_consuming(w)
        sc.fault_file.write_text("down")
        await sc.produce(batch)
        await eventually(lambda: metric(w, "vectorstream_ingest_paused") == 1, timeout=120, what="paused", workers=[w])
        started = time.monotonic()
        try:
            code = await asyncio.to_thread(w.terminate, 30)
        except AssertionError:
            code = None  # it ignored SIGTERM for 30 s and was SIGKILLed
        took = time.monotonic() - started
        committed = await sc.committed()
        sc.fault_file.unlink()
        second = sc.worker().start()
        await sc.wait_caught_up([second])
        await wait_consuming(second)
        assert await asyncio.to_thread(second.terminate) == 0
    report = await sc.check(embedder)
    record_result(
        "sigterm-during-outage",
        events=len(batch),
        report=report,
        notes="SIGTERM while the batch waited for the store: "
        + (f"exit {code} after {took:.1f} s" if code is not None else f"ignored, SIGKILLed after {took:.0f} s")
        + f" (committed {sum(committed.values())} of {len(batch)}); a restart after the outage "
        "indexed the batch",
        exit_code=code,
        seconds=took,
    )
    assert sum(committed.values()) == 0, "nothing was written, so nothing may be committed"
    assert_consistent(report)
    assert code == 0 and took < 30, f"SIGTERM during an outage: exit {code} after {took:.1f} s"
