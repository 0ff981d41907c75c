"""Workers killed with SIGKILL at random moments, again and again, and stopped with SIGTERM in the middle of a
batch: after a restart nothing is lost, duplicated or left stale, and SIGTERM commits only what was written."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.chaos.harness import (
    Scenario,
    assert_consistent,
    cleanup,
    dead_letter_sources,
    eventually,
    metric,
    mixed_history,
    record_result,
    upsert,
    wait_consuming,
)


async def kill_again_and_again(
    apache_kafka, tmp_path, settings, embedder, *, kills: int, seed: int, scenario: str
) -> None:
    """Publish a slice of the history, start a worker, SIGKILL it at a random moment; repeat, then let one last
    worker finish and check the store against the whole topic."""
    rng = random.Random(seed)
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, f"kill{kills}", settings).setup()
    history = mixed_history(rng, docs=24, events=30 * (kills + 1))
    cut = len(history.records) // (kills + 1)
    slices = [history.records[i * cut : (i + 1) * cut] for i in range(kills)] + [history.records[kills * cut :]]
    produced = []
    moments = []
    env = {"VECTORSTREAM_INGEST__MAX_BATCH_EVENTS": "8"}  # many small batches: many write/commit boundaries
    with cleanup(sc):
        for i in range(kills):
            produced += await sc.produce(slices[i])
            w = sc.worker(env).start()
            started = time.monotonic()
            if rng.random() < 0.25:
                # anywhere in start-up: loading the model, opening the store, joining the group, first fetch
                await asyncio.sleep(rng.uniform(0.5, 10.0))
                moment = "start-up"
            else:
                await eventually(lambda w=w: w.events() >= 1, timeout=300, what="ingest under way", workers=[w])
                await asyncio.sleep(rng.uniform(0.0, 2.5))
                moment = "ingest"
            done = w.events()  # what this incarnation had applied or dead-lettered when it died
            w.kill()
            moments.append((moment, round(time.monotonic() - started, 1), done))
        produced += await sc.produce(slices[-1])
        final = sc.worker().start()
        await sc.wait_caught_up([final], timeout=600)
        code = await asyncio.to_thread(final.terminate)
    report = await sc.check(embedder)
    dead = dead_letter_sources(await sc.dead_letters())
    junk = [produced[i] for i in history.junk]
    lost_junk = sum((p.partition, p.offset) not in dead for p in junk)
    again = sum(len(v) - 1 for v in dead.values())  # at-least-once: a kill after the DLQ confirmed, before the commit
    mid = sum(m == "ingest" and n > 0 for m, _, n in moments)
    record_result(
        scenario,
        events=len(produced),
        report=report,
        lost=lost_junk,
        notes=f"{kills} SIGKILLs ({mid} with batches applied by that incarnation, the rest during "
        f"start-up or the first batch), then a final worker; {again} dead letters written twice "
        "(killed between the DLQ's confirmation and the commit: at-least-once); history: "
        + ", ".join(f"{n} {k}" for k, n in sorted(history.kinds.items())),
        kills=kills,
        moments=moments,
    )
    assert code == 0
    assert_consistent(report)
    assert lost_junk == 0, "every junk record reached the dead-letter topic (at least once)"
    assert report.documents > 0 and report.dead_letters == len(history.junk)


async def test_sigkill_at_random_moments_then_restart(apache_kafka, tmp_path, settings, embedder):
    await kill_again_and_again(apache_kafka, tmp_path, settings, embedder, kills=6, seed=6, scenario="sigkill")


@pytest.mark.slow
async def test_sigkill_at_random_moments_twenty_times(apache_kafka, tmp_path, settings, embedder):
    await kill_again_and_again(apache_kafka, tmp_path, settings, embedder, kills=20, seed=20, scenario="sigkill-20")


async def test_sigterm_mid_batch_finishes_or_gives_back_the_batch(apache_kafka, tmp_path, settings, embedder):
    rng = random.Random(3)
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, "sigterm", settings).setup()
    # one big, slow first batch: 20 documents of ~7 chunks each, all waiting before the worker starts (big enough
    # to be caught mid-way, small enough to finish well within the SIGTERM bound on a slow AVX2-only CPU)
    docs = [
        upsert(
            "acme",
            f"big-{i}",
            1,
            " ".join(
                f"Section {j} of big document {i} covers topic {rng.randrange(10**6)} in considerable detail."
                for j in range(110)
            ),
        )
        for i in range(20)
    ]
    with cleanup(sc):
        produced = await sc.produce(docs)
        w = sc.worker(
            {"VECTORSTREAM_INGEST__MAX_BATCH_EVENTS": "256", "VECTORSTREAM_INGEST__MAX_BATCH_WAIT_SECONDS": "2"}
        ).start()
        # a batch has begun (handle() observed its size) and nothing of it is applied yet: mid-batch
        await eventually(
            lambda: metric(w, "vectorstream_ingest_batch_events_count") >= 1,
            timeout=300,
            what="the first batch under way",
            workers=[w],
            interval=0.1,
        )
        in_flight = metric(w, "vectorstream_ingest_batch_events_sum")
        applied_before = w.events()
        started = time.monotonic()
        code = await asyncio.to_thread(w.terminate, 120)
        took = time.monotonic() - started
        committed = await sc.committed()
        # every record below a committed offset must be in the store; records above it may be too (replayed
        # idempotently later), so extra chunks are fine here and missing or stale ones are not
        prefix = await sc.check_prefix(embedder, committed)
        outcome = "finished" if sum(committed.values()) >= applied_before + in_flight else "given back"
        second = sc.worker().start()
        await sc.wait_caught_up([second])
        await wait_consuming(second)
        assert await asyncio.to_thread(second.terminate) == 0
    report = await sc.check(embedder)
    record_result(
        "sigterm-mid-batch",
        events=len(produced),
        report=report,
        lost=prefix.missing,
        stale=prefix.stale,
        notes=f"SIGTERM with a batch of {in_flight:.0f} in flight: exit {code} after {took:.1f} s, batch "
        f"{outcome} (committed {sum(committed.values())} of {len(produced)}), then a restart",
        exit_code=code,
        seconds=took,
        committed=committed,
    )
    assert code == 0, w.log_tail()
    assert took < 60, f"SIGTERM took {took:.1f} s"
    assert prefix.missing == 0 and prefix.stale == 0, prefix.summary() + "\n" + "\n".join(prefix.examples)
    assert_consistent(report)
