"""Several workers on one shared PostgreSQL + pgvector store, on Apache Kafka with four partitions: scaled
1 -> 2 -> 1 during ingest, one of two SIGKILLed and not restarted, and the database restarted mid-ingest.

Who consumed which partition comes from each worker's ``vectorstream_test_records_handled_total{partition}``
(tests/support/faulty_worker.py counts the records whose batch its ingest finished), read from its /metrics.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys

from pydantic import SecretStr

from tests.chaos.harness import (
    Produced,
    Scenario,
    assert_consistent,
    cleanup,
    dead_letter_sources,
    eventually,
    metric,
    mixed_history,
    record_result,
    wait_consuming,
)
from tests.integration.workers import ROOT, WorkerProcess
from tests.support.postgres import PostgresServer

PARTITIONS = 4
#: small documents and small batches: many batches and commits per partition in a short run
WORKER_ENV = {"VECTORSTREAM_INGEST__MAX_BATCH_EVENTS": "16", "VECTORSTREAM_STORE__TIMEOUT_SECONDS": "2"}


def on_pgvector(sc: Scenario, postgres: PostgresServer) -> dict[str, str]:
    """Point the scenario (checker and workers) at a fresh database on the session's PostgreSQL."""
    url = postgres.app_url(postgres.create_database())
    sc.settings = sc.settings.model_copy(
        update={
            "store": sc.settings.store.model_copy(
                update={"backend": "pgvector", "postgres_url": SecretStr(url), "collection": "chunks"}
            )
        }
    )
    return {
        **WORKER_ENV,
        "VECTORSTREAM_STORE__BACKEND": "pgvector",
        "VECTORSTREAM_STORE__POSTGRES_URL": url,
        "VECTORSTREAM_STORE__COLLECTION": "chunks",
    }


def handled(worker: WorkerProcess) -> dict[int, float]:
    """Records per partition this worker has finished so far (empty while its /metrics is not up)."""
    prefix = "vectorstream_test_records_handled_total{partition="
    return {int(k[len(prefix) : -1]): v for k, v in (worker.metrics() or {}).items() if k.startswith(prefix)}


def junk_lost(produced: list[Produced], junk: list[int], dead: dict[tuple[int, int], list[str]]) -> int:
    return sum((produced[i].partition, produced[i].offset) not in dead for i in junk)


def good_dead_lettered(produced: list[Produced], junk: list[int], dead: dict[tuple[int, int], list[str]]) -> int:
    bad = {(produced[i].partition, produced[i].offset) for i in junk}
    return sum(1 for source in dead if source not in bad)


async def test_two_workers_on_pgvector_scaled_one_two_one_each_partition_consumed_by_both(
    apache_kafka, postgres, tmp_path, settings, embedder
):
    rng = random.Random(41)
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, "pgscale", settings, partitions=PARTITIONS).setup()
    env = on_pgvector(sc, postgres)
    history = mixed_history(rng, docs=80, events=520, max_sentences=8)
    third = len(history.records) // 3
    parts = [history.records[:third], history.records[third : 2 * third], history.records[2 * third :]]
    everything = set(range(PARTITIONS))
    produced: list[Produced] = []
    with cleanup(sc):
        first = sc.worker(env).start()
        await wait_consuming(first)
        produced += await sc.produce(parts[0])
        await eventually(
            lambda: set(handled(first)) == everything, timeout=300, what="one worker consuming all", workers=[first]
        )
        second = sc.worker(env).start()  # 1 -> 2 while the second part trickles in and is being ingested
        rest = parts[1] + parts[2]
        trickled = 0
        while trickled < len(parts[1]) and not any(
            k.startswith("vectorstream_consumer_lag_messages{") for k in second.metrics() or {}
        ):
            produced += await sc.produce(rest[trickled : trickled + 3])
            trickled += 3
            await asyncio.sleep(1.0)
        await wait_consuming(second)
        joined_at = {"first": handled(first), "trickled": trickled}
        # with both workers in the group: the rest of the second part, and at least 40 records whatever the
        # trickle used up while the second worker started (a slow machine)
        cut = max(len(parts[1]), trickled + 40)
        produced += await sc.produce(rest[trickled:cut])
        await eventually(
            lambda: sum(handled(second).values()) >= 1,
            timeout=300,
            what="the second worker consuming",
            workers=[first, second],
        )
        both = {"first": handled(first), "second": handled(second)}
        produced += await sc.produce(rest[cut:])
        first_share = handled(first)
        assert await asyncio.to_thread(first.terminate) == 0  # 2 -> 1 with the last part in flight
        await eventually(
            lambda: set(handled(second)) == everything,
            timeout=300,
            what="the remaining worker consuming every partition",
            workers=[second],
        )
        await sc.wait_caught_up([second])
        ends, committed = await sc.end_offsets(), await sc.committed()
        second_share = handled(second)
        assert await asyncio.to_thread(second.terminate) == 0
    report = await sc.check(embedder)
    dead = dead_letter_sources(await sc.dead_letters())
    lost = junk_lost(produced, history.junk, dead)
    by_both = sorted(p for p in everything if first_share.get(p) and second_share.get(p))
    # the product's own command, on the same topic and database
    check = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agents.cli", "check"],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS": sc.bootstrap,
            "VECTORSTREAM_KAFKA__DOCUMENTS_TOPIC": sc.topic,
            **env,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    record_result(
        "pgvector-scale-1-2-1",
        events=len(produced),
        report=report,
        lost=lost,
        notes=f"two workers on one pgvector store, {PARTITIONS} partitions, scaled 1 -> 2 -> 1 during ingest; "
        f"partitions consumed by both workers: {by_both}; records handled per partition: first {first_share}, "
        f"second {second_share} (while both ran: {both}; second joined after {joined_at}); history: "
        + ", ".join(f"{n} {k}" for k, n in sorted(history.kinds.items())),
        first=first_share,
        second=second_share,
        ends=ends,
        committed=committed,
    )
    assert committed == ends and all(ends.values())
    assert by_both == sorted(everything), (first_share, second_share)
    assert all(both["second"].values()) and both["second"], both
    assert_consistent(report)
    assert lost == 0 and report.dead_letters == len(history.junk)
    assert check.returncode == 0, check.stdout + check.stderr
    assert report.summary() in check.stdout, check.stdout  # the same verdict and counts as the in-process check


async def test_one_of_two_workers_sigkilled_the_other_takes_over(apache_kafka, postgres, tmp_path, settings, embedder):
    rng = random.Random(43)
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, "pgkill", settings, partitions=PARTITIONS).setup()
    env = on_pgvector(sc, postgres)
    history = mixed_history(rng, docs=60, events=360, max_sentences=8)
    with cleanup(sc):
        victim, survivor = sc.worker(env).start(), sc.worker(env).start()
        await asyncio.gather(wait_consuming(victim), wait_consuming(survivor))
        produced = await sc.produce(history.records)
        await eventually(
            lambda: sum(handled(victim).values()) >= 16 and sum(handled(survivor).values()) >= 1,
            timeout=300,
            what="both workers ingesting",
            workers=[victim, survivor],
            interval=0.2,
        )
        victim_share = handled(victim)
        victim.kill()  # SIGKILL mid-ingest; never restarted
        await eventually(
            lambda: set(handled(survivor)) == set(range(PARTITIONS)),
            timeout=300,
            what="the survivor taking over the victim's partitions",
            workers=[survivor],
        )
        await sc.wait_caught_up([survivor])
        survivor_share = handled(survivor)
        assert await asyncio.to_thread(survivor.terminate) == 0
    report = await sc.check(embedder)
    dead = dead_letter_sources(await sc.dead_letters())
    lost = junk_lost(produced, history.junk, dead)
    taken_over = sorted(set(victim_share) & set(survivor_share))
    record_result(
        "pgvector-sigkill-one-of-two",
        events=len(produced),
        report=report,
        lost=lost,
        notes=f"two workers on one pgvector store, {PARTITIONS} partitions; one SIGKILLed mid-ingest after "
        f"{sum(victim_share.values()):.0f} records and not restarted; the survivor took over partitions "
        f"{taken_over} (records per partition: victim {victim_share}, survivor {survivor_share})",
        victim=victim_share,
        survivor=survivor_share,
    )
    assert taken_over, (victim_share, survivor_share)
    assert_consistent(report)
    assert lost == 0 and report.dead_letters == len(history.junk)


async def test_database_restarted_mid_ingest_nothing_dead_lettered(
    apache_kafka, postgres, tmp_path, settings, embedder
):
    rng = random.Random(47)
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, "pgrestart", settings, partitions=PARTITIONS).setup()
    env = {**on_pgvector(sc, postgres), "VECTORSTREAM_INGEST__RETRY_MAX_SECONDS": "1"}
    history = mixed_history(rng, docs=60, events=360, max_sentences=8)
    with cleanup(sc):
        workers = [sc.worker(env).start(), sc.worker(env).start()]
        await asyncio.gather(*(wait_consuming(w) for w in workers))
        produced = await sc.produce(history.records)
        await eventually(
            lambda: sum(w.events() for w in workers) >= 30, timeout=300, what="ingest under way", workers=workers
        )
        await asyncio.to_thread(postgres.stop)  # a fast shutdown: every connection is cut (admin_shutdown)
        await eventually(
            lambda: sum(metric(w, "vectorstream_ingest_retries_total{reason=store_unavailable}") for w in workers) >= 2,
            timeout=120,
            what="the workers retrying against the stopped database",
            workers=workers,
        )
        during = {
            "dead_letters": sum(metric(w, "vectorstream_dead_letters_total") for w in workers),
            "paused": [metric(w, "vectorstream_ingest_paused") for w in workers],
        }
        await asyncio.sleep(2)
        await postgres.astart()
        await sc.wait_caught_up(workers)
        retries = sum(metric(w, "vectorstream_ingest_retries_total{reason=store_unavailable}") for w in workers)
        for w in workers:
            assert await asyncio.to_thread(w.terminate) == 0
    report = await sc.check(embedder)
    dead = dead_letter_sources(await sc.dead_letters())
    lost = junk_lost(produced, history.junk, dead)
    wrongly = good_dead_lettered(produced, history.junk, dead)
    record_result(
        "pgvector-db-restart",
        events=len(produced),
        report=report,
        lost=lost + wrongly,
        notes=f"PostgreSQL stopped (fast shutdown) mid-ingest under two workers and started again: {retries:.0f} "
        f"retries of store_unavailable, {wrongly} good records dead-lettered, while down {during}",
        retries=retries,
        during=during,
    )
    assert wrongly == 0, "a database outage dead-lettered good records"
    assert_consistent(report)
    assert lost == 0 and report.dead_letters == len(history.junk)
