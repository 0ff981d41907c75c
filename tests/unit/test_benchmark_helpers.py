"""The query benchmark's reading of the worker's stage histogram and the ingest benchmark's --variants parser,
against values worked out by hand."""

import math

import pytest

from benchmarks.ingest_throughput import Variant, parse_variants
from benchmarks.query_latency import bucket_quantile, stage_breakdown, stage_histograms

M = "vectorstream_query_stage_seconds"


def sample(stage: str, buckets: dict[str, float], total: float) -> dict[str, float]:
    """What WorkerProcess.metrics() gives for one stage: cumulative buckets, sum and count."""
    out = {f"{M}_bucket{{le={le},stage={stage}}}": c for le, c in buckets.items()}
    out[f"{M}_sum{{stage={stage}}}"] = total
    out[f"{M}_count{{stage={stage}}}"] = buckets["+Inf"]
    return out


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile():
    # 10 observations: 4 in (0, 0.01], 4 in (0.01, 0.02], 2 in (0.02, 0.05]
    buckets = {0.01: 4.0, 0.02: 8.0, 0.05: 10.0, math.inf: 10.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.01 + 0.01 * (5 - 4) / 4)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.02 + 0.03 * (9.9 - 8) / 2)
    assert bucket_quantile(0.2, buckets) == pytest.approx(0.01 * 2 / 4)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound_and_empty_is_none():
    assert bucket_quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == pytest.approx(0.1)
    assert bucket_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert bucket_quantile(0.5, {}) is None


def test_breakdown_reports_only_what_the_row_added():
    before = {
        **sample("embed", {"0.005": 10, "0.01": 10, "+Inf": 10}, 0.03),
        **sample("search", {"0.005": 2, "0.01": 2, "+Inf": 2}, 0.004),
        "vectorstream_other_total": 5.0,
    }
    after = {
        **sample("embed", {"0.005": 10, "0.01": 14, "+Inf": 14}, 0.03 + 4 * 0.008),
        **sample("search", {"0.005": 6, "0.01": 6, "+Inf": 6}, 0.004 + 4 * 0.002),
    }
    got = stage_breakdown(before, after)
    assert got is not None and list(got) == ["embed", "search"]  # the pipeline's order
    assert got["embed"]["count"] == 4
    assert got["embed"]["mean_ms"] == pytest.approx(8.0)
    assert got["embed"]["p50_ms"] == pytest.approx(5 + 5 * 2 / 4)  # all 4 new ones in (5 ms, 10 ms]
    assert got["search"]["mean_ms"] == pytest.approx(2.0)
    assert got["search"]["p99_ms"] == pytest.approx(5 * 3.96 / 4)


def test_a_worker_without_the_histogram_gives_no_breakdown():
    plain = {"vectorstream_events_total{outcome=ok}": 3.0}
    assert stage_histograms(plain) == {}
    assert stage_breakdown(plain, plain) is None
    assert stage_breakdown(None, None) is None


def test_variants_default_and_generic_forms():
    assert parse_variants("edge,pgvector") == [Variant("edge"), Variant("pgvector")]
    got = parse_variants("edge,nosparse:VECTORSTREAM_SPARSE__ENABLED=false,VECTORSTREAM_X=a=b,pgvector")
    assert [v.name for v in got] == ["edge", "nosparse", "pgvector"]
    assert got[1].env == (("VECTORSTREAM_SPARSE__ENABLED", "false"), ("VECTORSTREAM_X", "a=b"))
    assert [v.store for v in got] == ["edge", "edge", "pgvector"]
    assert parse_variants("pg2:VECTORSTREAM_STORE__BACKEND=pgvector")[0].store == "pgvector"


@pytest.mark.parametrize(
    "spec",
    ["", "X=1", "edge,edge", ":X=1", "a:B-C=1", "a:VECTORSTREAM_STORE__BACKEND=milvus"],
)
def test_variants_refuse_what_they_cannot_run(spec):
    with pytest.raises(ValueError):
        parse_variants(spec)
