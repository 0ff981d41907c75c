"""The query side under stress, against one real worker: a flood far beyond capacity is shed with error replies
in bounded memory, replayed requests get equivalent replies, expired requests are dropped and counted, and a slow
store turns into deadline_exceeded replies within the deadline. No reply ever carries another reader's chunk."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import pytest

from pipeline.auth import mint_token
from pipeline.client import QueryClient
from pipeline.settings import QuerySettings
from schemas.queries import ErrorCode, QueryFailure, QueryResult
from tests.chaos.harness import Scenario, cleanup, eventually, metric, record_result, rss_bytes, upsert, wait_consuming

SECRET = "chaos-test-secret-0123456789abcdef0123"
AUTH = QuerySettings(hs256_secret=SECRET)
MAX_CONCURRENCY, MAX_QUEUE = 2, 8
QUESTION = "how do I reset my password"


def corpus() -> tuple[list[tuple[bytes, bytes]], set[str]]:
    """Look-alike documents for two tenants under several access rules; returns them and what alice of acme (no
    groups) may read. Every document answers the question, so a leak would rank high."""
    text = "To reset your password open the account settings, choose 'Forgot password' and follow the link. "
    records, readable = [], set()
    for i in range(12):
        access = [{"public": True}, {"groups": ["ops"]}, {"users": ["carol"]}, {"users": ["alice"]}][i % 4]
        records.append(upsert("acme", f"acme-{i}", 1, f"{text} Variant {i} of the acme guide.", **access))
        if access.get("public") or access.get("users") == ["alice"]:
            readable.add(f"acme-{i}")
        records.append(upsert("globex", f"globex-{i}", 1, f"{text} Variant {i} of the globex guide.", public=True))
    return records, readable


@dataclass
class Stressed:
    sc: Scenario
    worker: object
    client: QueryClient
    readable: set[str]
    token: str
    leaks: list[str] = field(default_factory=list)

    def audit(self, reply: QueryResult | QueryFailure) -> None:
        """Count every hit alice of acme may not read (another tenant's, or another reader's document)."""
        if isinstance(reply, QueryResult):
            self.leaks += [h.doc_id for h in reply.hits if h.doc_id not in self.readable]

    def request(self, *, timeout: float = 60.0, request_id: str | None = None):
        return self.client.new_request(
            QUESTION, tenant="acme", token=self.token, top_k=8, timeout=timeout, request_id=request_id
        )


@pytest.fixture(scope="module")
async def stressed(apache_kafka, tmp_path_factory, settings):
    sc = await Scenario(
        apache_kafka.bootstrap_servers, tmp_path_factory.mktemp("query-stress"), "query", settings
    ).setup()
    records, readable = corpus()
    with cleanup(sc):
        w = sc.worker(
            {
                "VECTORSTREAM_QUERY__HS256_SECRET": SECRET,
                "VECTORSTREAM_QUERY__MAX_CONCURRENCY": str(MAX_CONCURRENCY),
                "VECTORSTREAM_QUERY__MAX_QUEUE": str(MAX_QUEUE),
            }
        ).start()
        await wait_consuming(w)
        await sc.produce(records)
        await sc.wait_caught_up([w])
        token = mint_token(AUTH, tenant="acme", user="alice", groups=[], ttl_seconds=3600)
        async with QueryClient(sc.bootstrap, queries_topic=sc.queries, replies_topic=sc.replies) as client:
            s = Stressed(sc, w, client, readable, token)
            first = await client.request(s.request())  # warm: the model and the index answer once
            assert isinstance(first, QueryResult) and first.hits, first
            s.audit(first)
            yield s
        assert await asyncio.to_thread(w.terminate) == 0


async def test_flood_beyond_capacity_is_shed_in_bounded_memory(stressed):
    s = stressed
    n = 1500
    s.sc.fault_file.write_text("slow 0.2")  # each store call takes 200 ms: the slots stay busy
    try:
        baseline = rss_bytes(s.worker.proc.pid)
        peak = baseline
        requests = [s.request() for _ in range(n)]
        futures = {r.request_id: s.client.expect(r.request_id) for r in requests}
        sender = asyncio.gather(
            *(
                s.client.publish_only(r.request_id.encode(), r.model_dump_json(exclude_none=True).encode())
                for r in requests
            )
        )
        started = time.monotonic()
        while not all(f.done() for f in futures.values()) and time.monotonic() - started < 300:
            peak = max(peak, rss_bytes(s.worker.proc.pid))
            await asyncio.sleep(0.1)
        await sender
    finally:
        s.sc.fault_file.unlink(missing_ok=True)
    replies = [f.result() for f in futures.values() if f.done()]
    for r in replies:
        s.audit(r)
    codes = [r.error.code if isinstance(r, QueryFailure) else "ok" for r in replies]
    unanswered = n - len(replies)
    twice = sum(c - 1 for rid, c in s.client.replies_seen.items() if rid in futures and c > 1)
    growth = (peak - baseline) / 2**20
    record_result(
        "query-flood",
        events=n,
        lost=unanswered,
        duplicated=twice,
        leaked=len(s.leaks),
        notes=f"{n} requests at once against {MAX_CONCURRENCY} slots + a queue of {MAX_QUEUE}, store calls "
        f"slowed to 200 ms: {codes.count('ok')} answered, {codes.count(ErrorCode.OVERLOADED)} shed as "
        f"overloaded; worker RSS {baseline / 2**20:.0f} MiB, peak +{growth:.0f} MiB",
        rss_baseline_bytes=baseline,
        rss_peak_bytes=peak,
    )
    assert unanswered == 0 and twice == 0
    assert set(codes) <= {"ok", ErrorCode.OVERLOADED}, set(codes)
    assert codes.count(ErrorCode.OVERLOADED) >= n // 2 and codes.count("ok") >= MAX_CONCURRENCY
    assert growth < 200, f"RSS grew by {growth:.0f} MiB during the flood"
    assert not s.leaks


async def test_replayed_requests_get_equivalent_replies(stressed):
    s = stressed
    rounds = []
    for _ in range(3):
        req = s.request(request_id=f"replayed-{uuid.uuid4().hex[:8]}")
        replies = []
        for _ in range(3):  # the very same record, sent again after each reply
            replies.append(await s.client.request(req, timeout=60))
        rounds.append(replies)
    shapes = []
    for replies in rounds:
        for r in replies:
            s.audit(r)
        shapes.append(
            [
                [(h.doc_id, h.chunk_index, round(h.score, 4)) for h in r.hits]
                if isinstance(r, QueryResult)
                else r.error.code
                for r in replies
            ]
        )
    differing = sum(len({str(x) for x in shape}) > 1 for shape in shapes)
    record_result(
        "query-replay",
        events=9,
        duplicated=0,
        leaked=len(s.leaks),
        notes=f"3 requests each sent 3 times with the same request id and body: {differing} of 3 "
        "got replies that differ",
        differing=differing,
    )
    assert all(isinstance(r, QueryResult) for replies in rounds for r in replies)
    assert differing == 0, shapes
    assert not s.leaks


async def test_expired_requests_are_dropped_and_counted(stressed):
    s = stressed
    m = 200
    before = metric(s.worker, "vectorstream_queries_expired_total")
    expired = [s.request(timeout=-5) for _ in range(m)]
    futures = [s.client.expect(r.request_id) for r in expired]
    await asyncio.gather(
        *(s.client.publish_only(r.request_id.encode(), r.model_dump_json(exclude_none=True).encode()) for r in expired)
    )
    await eventually(
        lambda: metric(s.worker, "vectorstream_queries_expired_total") >= before + m,
        timeout=120,
        what=f"{m} expired requests counted",
        workers=[s.worker],
    )
    # each was counted instead of being answered (the server decides once, on arrival); a live request afterwards
    # is served, and its reply was produced after any reply to the expired ones could have been
    live = await s.client.request(s.request(), timeout=60)
    s.audit(live)
    answered = sum(f.done() for f in futures)
    counted = metric(s.worker, "vectorstream_queries_expired_total") - before
    record_result(
        "query-expired",
        events=m + 1,
        leaked=len(s.leaks),
        notes=f"{m} requests whose deadline had passed: {counted:.0f} counted as expired, {answered} "
        "answered; a live request after them was served",
        counted=counted,
        answered=answered,
    )
    assert counted == m and answered == 0
    assert isinstance(live, QueryResult)


async def test_slow_store_times_out_as_errors_within_the_deadline(stressed):
    s = stressed
    deadline_s, n = 2.0, 6
    s.sc.fault_file.write_text("slow 4")  # every store call takes 4 s, twice the requests' deadline
    try:
        requests = [s.request(timeout=deadline_s) for _ in range(n)]
        sent = time.time()

        async def timed(req):
            reply = await s.client.request(req, timeout=30)
            return reply, time.time() - req.deadline_ms / 1000

        outcomes = await asyncio.gather(*(timed(r) for r in requests))
    finally:
        s.sc.fault_file.unlink(missing_ok=True)
    codes = [r.error.code if isinstance(r, QueryFailure) else "ok" for r, _ in outcomes]
    late = max(after for _, after in outcomes)
    exceeded = codes.count(ErrorCode.DEADLINE_EXCEEDED)
    record_result(
        "query-slow-store",
        events=n,
        leaked=len(s.leaks),
        notes=f"store calls slowed to 4 s, deadline {deadline_s:.0f} s: {exceeded} of {n} answered "
        f"deadline_exceeded, the last {late:+.2f} s from its deadline (all within "
        f"{time.time() - sent:.1f} s of sending)",
        codes=[str(c) for c in codes],
        late_seconds=late,
    )
    assert codes == [ErrorCode.DEADLINE_EXCEEDED] * n, codes
    assert late < 1.5, f"a deadline_exceeded reply arrived {late:.2f} s after its deadline"
    # the store is back: the same question is answered again
    reply = await s.client.request(s.request(), timeout=60)
    s.audit(reply)
    assert isinstance(reply, QueryResult) and not s.leaks
