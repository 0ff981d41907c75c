"""A real Prometheus scrapes a real worker on Apache Kafka during ingest and queries; then every PromQL
expression of the Grafana dashboard and of the alert rules must return data, and promtool accepts them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.dashboard import (
    ALERTS,
    BAD_RECORDS,
    PROMETHEUS_CONFIG,
    QUERY_METRICS,
    Prometheus,
    QueryTraffic,
    Topics,
    alert_rules,
    dashboard_panels,
    delete,
    dev_token,
    ensure_prometheus,
    grafana_expr,
    scifact,
    upsert,
    with_bool_comparisons,
)
from pipeline.client import DocumentPublisher
from tests.integration.workers import WorkerProcess

pytestmark = pytest.mark.integration

JOB = "vectorstream-ingest"
TENANT = "scifact"
DOCS = 80
RESENT = 10  # unchanged documents sent again: their chunks reuse the stored vectors
DELETED = 3
QUERIES = 20
#: what $__rate_interval becomes: longer than the whole run, so every rate() sees all of it
RATE_INTERVAL = "2m"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def tools() -> tuple[str, str]:
    """prometheus and promtool; installed by deploy/prometheus/install.sh under CI, where this never skips."""
    found = ensure_prometheus(install=_in_ci())
    if found is None:
        pytest.skip("prometheus/promtool not installed: run deploy/prometheus/install.sh")
    return found


@dataclass
class Run:
    prom: Prometheus
    worker: WorkerProcess
    serves_queries: bool
    answered: int


async def _workload(bootstrap: str, topics: Topics, worker: WorkerProcess) -> tuple[bool, int]:
    corpus = scifact("corpus", DOCS)
    questions = [q.text for q in scifact("queries", QUERIES)]
    async with DocumentPublisher(bootstrap, topics.documents) as publisher:
        await publisher.publish_many(upsert(TENANT, d) for d in corpus)
        for key, value in BAD_RECORDS:
            await publisher.send_raw(key, value)
        await publisher.flush()
        await asyncio.to_thread(worker.wait_events, DOCS + len(BAD_RECORDS), 120)
        # the same text again: every chunk is reused, nothing is embedded; then a few deletes
        await publisher.publish_many(upsert(TENANT, d, version=2) for d in corpus[:RESENT])
        await asyncio.to_thread(worker.wait_events, DOCS + len(BAD_RECORDS) + RESENT, 60)
        await publisher.publish_many(delete(TENANT, d, version=3) for d in corpus[:DELETED])
    total = DOCS + len(BAD_RECORDS) + RESENT + DELETED
    await asyncio.to_thread(worker.wait_events, total, 60)

    async with QueryTraffic(bootstrap, topics.queries, topics.replies, TENANT, dev_token(TENANT)) as traffic:
        if await traffic.ask(questions[0], wait=20) is None:
            return False, 0
        replies = await asyncio.gather(*(traffic.ask(q, wait=30) for q in questions[1:]))
        bad = await asyncio.gather(*(traffic.ask(q, token="not-a-token", wait=30) for q in questions[:2]))
    answered = 1 + sum(r is not None for r in replies)
    assert all(r is not None and r.status == "error" for r in bad), bad
    return True, answered


@pytest.fixture(scope="module")
def run(tools: tuple[str, str], apache_kafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("prometheus")
    bootstrap = apache_kafka.bootstrap_servers
    topics = Topics.unique("test-prometheus")
    asyncio.run(topics.create(bootstrap, 3))
    worker = WorkerProcess(
        bootstrap=bootstrap,
        store_path=tmp / "edge",
        topic=topics.documents,
        dlq=topics.dead_letters,
        group=f"{topics.documents}.group",
        log_path=tmp / "worker.log",
        extra_env={
            **topics.env(),
            "VECTORSTREAM_QUERY__RECALL_SAMPLE_RATE": "1",
            "VECTORSTREAM_STORE__INDEX_IDLE_SECONDS": "0.5",
            "APP_DATADIR": str(tmp / "faust"),
        },  # faust's table folder, else <group>-data in the repo
    ).start()
    prom = Prometheus(tools[0], tmp, {JOB: [f"127.0.0.1:{worker.metrics_port}"]}).start()
    try:
        worker.wait_for(lambda: worker.metrics() is not None, 120, "the metrics endpoint")
        serves, answered = asyncio.run(_workload(bootstrap, topics, worker))
        # everything the worker did is in Prometheus: the last events, a lag report, an index build, a recall sample
        worker.wait_for(
            lambda: (worker.metrics() or {}).get("vectorstream_index_builds_total", 0) >= 1, 30, "an index build"
        )
        total = DOCS + len(BAD_RECORDS) + RESENT + DELETED
        prom.wait_for("sum(vectorstream_events_total)", lambda v: v >= total)
        prom.wait_for("count(vectorstream_consumer_lag_messages)", lambda v: v >= 1, timeout=30)
        # lag is reported every 5 s: wait for the report after the last commit
        prom.wait_for("sum(vectorstream_consumer_lag_messages)", lambda v: v == 0, timeout=30)
        # the lag alert's deriv() needs two scraped samples of the lag: the first may be the only one so far
        prom.wait_for("count(deriv(vectorstream_consumer_lag_messages[10m]))", lambda v: v >= 1, timeout=60)
        prom.wait_for("sum(vectorstream_index_builds_total)", lambda v: v >= 1)
        if serves:
            prom.wait_for("sum(vectorstream_recall_samples_total)", lambda v: v >= 1)
            prom.wait_for("sum(vectorstream_query_duration_seconds_count)", lambda v: v >= answered)
        yield Run(prom, worker, serves, answered)
    except BaseException:
        print(f"worker log:\n{worker.log_tail()}\nprometheus log:\n{prom.log_tail()}")
        raise
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.terminate()
        prom.stop()


def test_promtool_accepts_the_config_and_the_rules(tools: tuple[str, str], tmp_path: Path) -> None:
    promtool = tools[1]
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(ALERTS)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr


def test_the_run_is_what_the_dashboard_shows(run: Run) -> None:
    value = run.prom.value
    assert value('sum(vectorstream_events_total{outcome="indexed"})') == DOCS + RESENT
    assert value('sum(vectorstream_events_total{outcome="deleted"})') == DELETED
    assert value("sum(vectorstream_dead_letters_total)") == len(BAD_RECORDS)
    assert value("sum(vectorstream_chunks_reused_total)") >= RESENT
    assert value("sum(vectorstream_chunks_embedded_total)") >= DOCS
    assert value(f'count(vectorstream_build_info{{job="{JOB}", model!="", version!=""}})') == 1
    assert value("sum(vectorstream_consumer_lag_messages)") == 0
    freshness = value("histogram_quantile(0.5, sum by (le) (rate(vectorstream_freshness_seconds_bucket[5m])))")
    assert 0 < freshness < 120
    if run.serves_queries:
        assert value('sum(vectorstream_query_duration_seconds_count{outcome="ok"})') == run.answered
        assert value('sum(vectorstream_query_errors_total{code="unauthenticated"})') == 2
        assert 0 < value("max(vectorstream_recall_at_k)") <= 1
        # the stage break-down: every answered query passed each stage once (error replies only some)
        for stage in ("consume", "decode", "auth", "queue_wait", "embed", "search", "encode", "produce"):
            count = value(f'sum(vectorstream_query_stage_seconds_count{{stage="{stage}"}})')
            assert count >= run.answered, (stage, count)
        # the stages are parts of a request's time in the worker, so their sums are within it
        inside = value('sum(vectorstream_query_stage_seconds_sum{stage=~"queue_wait|embed|search|encode|produce"})')
        assert 0 < inside <= value("sum(vectorstream_query_duration_seconds_sum)")
        assert value("sum(vectorstream_query_embedding_cache_total)") >= run.answered


@pytest.mark.parametrize("part", ["ingest", "query"])
def test_every_dashboard_and_alert_expression_returns_data(run: Run, part: str) -> None:
    exprs = [
        (f"panel {p.title!r}", grafana_expr(t.expr, rate_interval=RATE_INTERVAL))
        for p in dashboard_panels()
        for t in p.targets
    ]
    # an alert that is not firing filters its series away: evaluate its comparisons as bool to see them
    exprs += [(f"alert {r.name}", with_bool_comparisons(r.expr)) for r in alert_rules()]
    mine = [(what, e) for what, e in exprs if bool(QUERY_METRICS.search(e)) == (part == "query")]
    assert mine
    if part == "query" and not run.serves_queries:
        pytest.skip("the worker does not answer queries yet (no query agent in `vectorstream worker`)")
    empty = [f"{what}: {e}" for what, e in mine if not run.prom.query(e)]
    assert not empty, "no data for:\n" + "\n".join(empty)


def test_prometheus_evaluates_every_alert_rule_without_error(run: Run) -> None:
    groups = run.prom.api("rules", type="alert")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {r.name for r in alert_rules()}
    bad = {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"}
    assert not bad


def test_the_dead_letter_alert_sees_the_bad_records(run: Run) -> None:
    # 5 of 98 events were dead-lettered: above the 1% threshold, so the alert is pending (for: 10m)
    deadline = time.monotonic() + 15
    while True:
        states = {a["labels"]["alertname"]: a["state"] for a in run.prom.api("alerts")["alerts"]}
        if states.get("VectorstreamDeadLetterRate") in ("pending", "firing") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert states.get("VectorstreamDeadLetterRate") in ("pending", "firing"), states
    assert "firing" not in {states.get(name) for name in states if name != "VectorstreamDeadLetterRate"}, states


def test_the_worker_down_alert_fires_when_the_worker_stops(run: Run) -> None:
    """Last in the module: stops the worker."""
    rule = next(r for r in alert_rules() if r.name == "VectorstreamWorkerDown")
    # a busy machine may miss one 1-second scrape; a running worker must come back within a few
    deadline = time.monotonic() + 10
    while run.prom.query(rule.expr) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run.prom.query(rule.expr) == []
    assert run.worker.terminate() == 0
    deadline = time.monotonic() + 15
    while not (result := run.prom.query(rule.expr)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [r["metric"]["job"] for r in result] == [JOB]
