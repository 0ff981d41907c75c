"""Hostile input drawn by hypothesis, interleaved with good events, into one real worker: each bad record lands in
the dead-letter topic once, with its reason; the worker stays up and ready; every good event is indexed.
Then a bad deploy that makes every record fail trips the breaker instead of draining the topic into the DLQ."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipeline.decode import Record, Rejected, decode_record
from tests.chaos.harness import (
    Scenario,
    assert_consistent,
    cleanup,
    dead_letter_sources,
    eventually,
    metric,
    record_result,
    upsert,
    wait_consuming,
)

MAX_BYTES = 1_000_000  # the worker's default ingest.max_message_bytes
KNOWN_FIELDS = {"type", "tenant_id", "doc_id", "version", "title", "text", "metadata", "access"}


@dataclass(frozen=True)
class Case:
    kind: str
    value: bytes | None
    #: the reasons the dead letter may carry; None: whatever the decoder says, as long as it is a rejection
    reasons: frozenset[str] | None
    key: bytes | None = None  # None: acme/<a fresh doc id>


def event(**fields) -> dict:
    return {"type": "upsert", "tenant_id": "acme", "doc_id": "DOC", "version": 1, "text": "hostile", **fields}


def encode(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def one(*reasons: str) -> frozenset[str]:
    return frozenset(reasons)


random_bytes = st.binary(max_size=3000).map(lambda b: Case("random_bytes", b, None))

deeply_nested = st.tuples(st.integers(17, 5000), st.sampled_from(['{"a":', "["])).map(
    lambda t: Case(
        "deeply_nested",
        encode(event(metadata="NEST")).replace(
            b'"NEST"', t[1].encode() * t[0] + b"1" + (b"}" if t[1] == '{"a":' else b"]") * t[0]
        ),
        one("too_deep"),
    )
)


def _huge_integer(digits: int, negative: bool, where: str) -> Case:
    literal = ("-" if negative else "") + "9" * digits
    as_json = digits > sys.get_int_max_str_digits()  # Python refuses to parse longer integer literals
    if where == "version":
        reason = "invalid_json" if as_json else "invalid_value"  # versions are 0..2**53
        value = encode(event(version="HUGE")).replace(b'"HUGE"', literal.encode())
    else:  # metadata: beyond the float range is a wrong type (between 2**53 and ~1e308 it becomes a float)
        reason = "invalid_json" if as_json else "wrong_type"
        value = encode(event(metadata={"n": "HUGE"})).replace(b'"HUGE"', literal.encode())
    return Case(f"huge_integer_{where}", value, one(reason))


huge_integers = st.one_of(
    st.builds(_huge_integer, st.integers(17, 6000), st.booleans(), st.just("version")),
    st.builds(_huge_integer, st.integers(310, 6000), st.booleans(), st.just("metadata")),
)

_BAD_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",
    b"\xc3\x28",
    b"\xa0\xa1",
    b"\xe2\x28\xa1",
    b"\xf0\x28\x8c\xbc",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",
]
invalid_utf8 = st.one_of(
    st.tuples(st.text(max_size=200), st.sampled_from(_BAD_UTF8), st.text(max_size=200)).map(
        lambda t: Case(
            "invalid_utf8_value",
            encode(event(text="SPLIT")).replace(
                b"SPLIT", json.dumps(t[0])[1:-1].encode() + t[1] + json.dumps(t[2])[1:-1].encode()
            ),
            one("invalid_utf8"),
        )
    ),
    st.sampled_from(_BAD_UTF8).map(
        lambda b: Case("invalid_utf8_key", encode(event()), one("bad_key"), key=b"acme/" + b)
    ),
)

nul_bytes = st.tuples(st.text(max_size=100), st.text(max_size=100), st.sampled_from(["text", "title", "raw"])).map(
    lambda t: Case(
        f"nul_{t[2]}",
        encode(event(**{"text" if t[2] == "raw" else t[2]: t[0] + "\x00" + t[1]})).replace(
            b"\\u0000", b"\x00" if t[2] == "raw" else b"\\u0000"
        ),
        one("invalid_json") if t[2] == "raw" else one("invalid_value"),
    )
)

_SPACES = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2003\u200a\u2028\u2029\u202f\u205f\u3000"
empty_text = st.text(alphabet=_SPACES, max_size=60).map(
    lambda s: Case("empty_text", encode(event(text=s)), one("empty_text"))
)

oversize = st.integers(MAX_BYTES, MAX_BYTES + 400_000).map(
    lambda n: Case("oversize", encode(event(text="y" * n)), one("oversize"))
)

_not_int = st.one_of(
    st.text(max_size=10),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_not_str = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=3),
)
wrong_types = st.one_of(
    _not_int.map(lambda v: ("version", v)),
    _not_str.map(lambda v: ("text", v)),
    _not_str.map(lambda v: ("title", v)),
    st.one_of(st.text(max_size=5), st.integers(), st.lists(st.booleans(), max_size=2)).map(lambda v: ("access", v)),
    st.one_of(st.text(max_size=5), st.integers(), st.lists(st.integers(), max_size=2)).map(lambda v: ("metadata", v)),
    st.dictionaries(
        st.from_regex(r"[a-z]{1,8}", fullmatch=True),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        min_size=1,
        max_size=2,
    ).map(lambda v: ("metadata", v)),
).map(lambda fv: Case(f"wrong_type_{fv[0]}", encode(event(**{fv[0]: fv[1]})), one("wrong_type")))


def _unknown_field(name: str, value: object, in_access: bool) -> Case:
    if in_access and name not in {"public", "users", "groups"}:
        return Case("unknown_field_access", encode(event(access={"public": True, name: value})), one("unknown_field"))
    return Case("unknown_field", encode(event(**{name: value})), one("unknown_field"))


unknown_fields = st.builds(
    _unknown_field,
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True).filter(lambda n: n not in KNOWN_FIELDS),
    st.one_of(st.integers(-5, 5), st.text(max_size=10), st.booleans(), st.none()),
    st.booleans(),
)

KINDS = (
    random_bytes,
    deeply_nested,
    huge_integers,
    invalid_utf8,
    nul_bytes,
    empty_text,
    oversize,
    wrong_types,
    unknown_fields,
)
hostile = st.one_of(*KINDS)
#: every kind at least once, then more of any
hostile_batch = st.tuples(st.tuples(*KINDS), st.lists(hostile, max_size=8)).map(lambda t: [*t[0], *t[1]])


@dataclass
class Hostile:
    sc: Scenario
    worker: object
    #: (partition, offset) -> the case produced there
    bad: dict[tuple[int, int], Case] = field(default_factory=dict)
    good: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    examples: int = 0
    problems: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
async def hostile_worker(apache_kafka, tmp_path_factory, settings):
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path_factory.mktemp("hostile"), "hostile", settings).setup()
    with cleanup(sc):
        w = sc.worker().start()
        await wait_consuming(w)
        yield Hostile(sc, w)


def ready(worker) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@hsettings(
    max_examples=5, deadline=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck)
)
@given(cases=hostile_batch, goods=st.integers(2, 5), order=st.randoms(use_true_random=False))
async def test_hostile_input_is_dead_lettered_with_its_reason(hostile_worker, cases, goods, order):
    h = hostile_worker
    sc, w = h.sc, h.worker
    n = h.examples
    h.examples += 1
    records: list[tuple[str, Case | None, bytes | None, bytes | None]] = []
    for i, case in enumerate(cases):
        key = case.key or f"acme/h{n}-{i}".encode()
        value = case.value.replace(b'"DOC"', json.dumps(f"h{n}-{i}").encode()) if case.value else case.value
        records.append((case.kind, case, key, value))
    for g in range(goods):
        k, v = upsert("acme", f"good{n}-{g}", 1, f"Good document {g} of example {n} says something useful. " * (3 + g))
        records.append(("good", None, k, v))
    order.shuffle(records)
    indexed = w.events("indexed")
    produced = await sc.produce((k, v) for _, _, k, v in records)
    await sc.wait_caught_up([w])
    dead = dead_letter_sources(await sc.dead_letters())
    for (kind, case, key, value), p in zip(records, produced, strict=True):
        if case is None:
            continue
        where = (p.partition, p.offset)
        h.bad[where] = case
        h.kinds[kind] = h.kinds.get(kind, 0) + 1
        decoded = decode_record(Record(sc.topic, p.partition, p.offset, key, value), max_bytes=MAX_BYTES, max_depth=16)
        assert isinstance(decoded, Rejected), f"{kind}: {value[:200]!r} was accepted as {decoded!r}"
        expected = case.reasons or {decoded.reason.value}
        assert dead.get(where) and set(dead[where]) <= expected, (
            f"{kind}: dead-lettered as {dead.get(where)}, expected one of {sorted(expected)} for {value[:200]!r}"
        )
    h.good += goods
    assert w.events("indexed") - indexed == goods, "every good event interleaved with the bad ones is indexed"
    assert w.proc.poll() is None and ready(w)[0] == 200


async def test_zz_after_hostile_input_nothing_lost_or_left(hostile_worker, embedder):
    h = hostile_worker
    code = await asyncio.to_thread(h.worker.terminate)
    report = await h.sc.check(embedder)
    dead = dead_letter_sources(await h.sc.dead_letters())
    missing = [w for w in h.bad if w not in dead]
    twice = sum(len(v) - 1 for v in dead.values())
    record_result(
        "hostile-input",
        events=len(h.bad) + h.good,
        report=report,
        lost=len(missing),
        duplicated=twice,
        notes=f"{h.examples} hypothesis examples, {len(h.bad)} hostile records interleaved with {h.good} "
        "good ones: " + ", ".join(f"{n} {k}" for k, n in sorted(h.kinds.items())),
        kinds=h.kinds,
    )
    assert h.examples > 0 and code == 0
    assert not missing and twice == 0
    assert report.dead_letters == len(h.bad) == len(dead)
    assert_consistent(report)
    assert report.documents == h.good


# --- the breaker -----------------------------------------------------------------------------------------------


async def test_bad_deploy_trips_the_breaker_instead_of_draining_the_topic(apache_kafka, tmp_path, settings, embedder):
    """A deploy whose size limit is below every record (a stand-in for any bug that fails every message): after
    ``threshold`` dead letters in a row the worker stops consuming and says so; fixed and restarted, it indexes
    the rest, and the dead letters are redriven from the dead-letter topic."""
    threshold, n = 8, 60
    sc = await Scenario(apache_kafka.bootstrap_servers, tmp_path, "breaker", settings).setup()
    docs = [
        upsert("acme", f"doc-{i}", 1, f"Document {i} is perfectly fine and a little over a kilobyte. " * 20)
        for i in range(n)
    ]
    with cleanup(sc):
        produced = await sc.produce(docs)
        bad = sc.worker(
            {
                "VECTORSTREAM_INGEST__MAX_MESSAGE_BYTES": "1024",
                "VECTORSTREAM_INGEST__BREAKER_CONSECUTIVE_FAILURES": str(threshold),
                "VECTORSTREAM_INGEST__MAX_BATCH_EVENTS": "4",
            }
        ).start()
        await eventually(
            lambda: metric(bad, "vectorstream_ingest_breaker_open") == 1,
            timeout=300,
            what="the breaker open",
            workers=[bad],
        )
        status, body = ready(bad)
        dead = dead_letter_sources(await sc.dead_letters())
        committed = await sc.committed()
        breaker = {
            "dead_letters": metric(bad, "vectorstream_dead_letters_total"),
            "dlq": len(dead),
            "committed": sum(committed.values()),
            "alive": bad.proc.poll() is None,
        }
        code = await asyncio.to_thread(bad.terminate)

        fixed = sc.worker().start()
        await sc.wait_caught_up([fixed])
        # redrive: the dead letters are republished to the documents topic with their original keys
        redriven = [(r.key, r.value) for r in await sc.dead_letters()]
        await sc.produce(redriven)
        await sc.wait_caught_up([fixed])
        assert await asyncio.to_thread(fixed.terminate) == 0
    report = await sc.check(embedder)
    # a committed offset may not pass a record that was neither applied nor dead-lettered
    first_untouched = {}
    for p in produced:
        if (p.partition, p.offset) not in dead:
            first_untouched.setdefault(p.partition, p.offset)
    past = {part: off for part, off in committed.items() if off > first_untouched.get(part, off)}
    record_result(
        "breaker-bad-deploy",
        events=len(produced) + len(redriven),
        report=report,
        notes=f"every record failing (size limit 1024 B): breaker open after {len(dead)} dead letters "
        f"(threshold {threshold}) of {n}, /readyz {status}; fixed worker indexed the rest, "
        f"{len(redriven)} redriven from the DLQ",
        breaker=breaker,
        readyz=[status, body.strip()],
    )
    assert breaker == {"dead_letters": threshold, "dlq": threshold, "committed": breaker["committed"], "alive": True}
    assert breaker["committed"] <= threshold and not past, (committed, first_untouched)
    assert status == 503 and "breaker" in body, body
    assert code == 0
    assert_consistent(report)
    assert report.documents == n
