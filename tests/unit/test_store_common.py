"""The helpers both Qdrant adapters share: vectors in and out, match-any values, the one-document filter."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.store.base import DOC, TENANT, VERSION, Filter, Match, Range
from pipeline.store.common import as_floats, dense_floats, doc_chunks_filter, match_any_values


def test_as_floats_takes_numpy_arrays_and_sequences_alike() -> None:
    row = np.array([0.25, -1.5], dtype=np.float32)
    assert as_floats(row) == [0.25, -1.5]
    assert all(type(x) is float for x in as_floats(row))
    assert as_floats((1, 2.5)) == [1.0, 2.5]


def test_dense_floats_reads_one_unnamed_dense_vector_only() -> None:
    assert dense_floats([1, 0.5]) == [1.0, 0.5]
    assert dense_floats([]) == []
    assert dense_floats(None) is None
    assert dense_floats({"text": [0.1, 0.2]}) is None  # a named vector
    assert dense_floats([[0.1, 0.2], [0.3, 0.4]]) is None  # a multi-vector


def test_match_any_values_are_all_keywords_or_all_integers() -> None:
    assert match_any_values(("a", "b")) == ["a", "b"]
    assert match_any_values((1, 3)) == [1, 3]
    with pytest.raises(ValueError, match="only strings or only integers"):
        match_any_values(("a", 1))


def test_doc_chunks_filter_selects_one_documents_chunks() -> None:
    assert doc_chunks_filter("t", "d") == Filter(must=(Match(TENANT, "t"), Match(DOC, "d")))
    assert doc_chunks_filter("t", "d", below_version=3) == Filter(
        must=(Match(TENANT, "t"), Match(DOC, "d"), Range(VERSION, lt=3))
    )
