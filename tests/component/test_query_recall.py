"""The recall command's measurement on a real Qdrant Edge store: exact search is the truth, HNSW is measured."""

import numpy as np
import pytest

from pipeline.recall import Row, format_table, measure, percentile, sample_cases
from pipeline.store.base import ACL_GROUPS, ACL_PUBLIC, ACL_USERS, DOC, TENANT, ChunkPoint, chunk_point_id
from pipeline.store.edge import EdgeStore


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 95) == 95


def test_table_has_a_row_per_ef_and_exact():
    rows = [Row(None, 1, 1, 2.0, 3.0, 4.0, 0), Row(16, 0.9, 0.95, 0.5, 0.7, 0.9, 3)]
    text = format_table(rows, k=10, n=50)
    assert "recall@10 HNSW" in text and "exact" in text and "3/50" in text
    md = format_table(rows, k=10, n=50, markdown=True)
    assert md.startswith("| ef |") and md.count("\n") == 3


@pytest.fixture
async def store(tmp_path):
    rng = np.random.default_rng(1)
    st = EdgeStore(tmp_path, "recall", flush_writes=False)
    await st.open(model="m", dim=16)
    points = []
    for t in range(3):
        for i in range(400):
            v = rng.normal(size=16)
            points.append(
                ChunkPoint(
                    chunk_point_id(f"t{t}", f"d{i}", 0),
                    (v / np.linalg.norm(v)).tolist(),
                    {
                        TENANT: f"t{t}",
                        DOC: f"d{i}",
                        ACL_PUBLIC: i % 2 == 0,
                        ACL_USERS: [],
                        ACL_GROUPS: ["g"] if i % 3 == 0 else [],
                    },
                )
            )
    await st.upsert_chunks(points)
    await st.build_index()
    yield st
    await st.close()


async def test_measure_sampled_vectors(store):
    cases = await sample_cases(store, n=30, seed=3)
    assert len(cases) == 30
    rows = await measure(store, cases, k=10, efs=(8, 256), progress=False)
    assert [r.ef for r in rows] == [None, 8, 256]
    assert rows[0].recall == 1.0
    assert 0 <= rows[1].recall <= rows[2].recall + 0.05 and rows[2].recall >= 0.9
    assert all(r.p50_ms > 0 for r in rows)
