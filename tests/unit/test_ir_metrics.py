"""The benchmark's nDCG@10 and recall@10 against values worked out by hand (trec_eval's definitions)."""

import math

import pytest

from benchmarks.ir_metrics import doc_scores, evaluate, ndcg_at_k, rank, recall_at_k


def test_ndcg_by_hand():
    judged = {"a": 1, "b": 2}
    # ranking c, b, a: DCG = 2/log2(3) + 1/log2(4); ideal = 2/log2(2) + 1/log2(3)
    expected = (2 / math.log2(3) + 1 / 2) / (2 + 1 / math.log2(3))
    assert ndcg_at_k(["c", "b", "a"], judged) == pytest.approx(expected)
    assert ndcg_at_k(["b", "a"], judged) == pytest.approx(1.0)
    assert ndcg_at_k(["x"] * 10 + ["a"], {"a": 1}) == 0.0  # beyond the cut-off


def test_recall_and_ranking_ties():
    assert recall_at_k(["a", "x", "y"], {"a": 1, "b": 1, "c": 0}) == pytest.approx(0.5)
    assert rank({"b": 0.5, "a": 0.5, "c": 0.9}) == ["c", "a", "b"]


def test_evaluate_means_over_judged_queries_and_missing_runs_score_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    runs = {"q1": {"a": 0.9, "z": 0.1}}
    result = evaluate(runs, qrels)
    assert result["queries"] == 2
    assert result["ndcg@10"] == pytest.approx(0.5) and result["recall@10"] == pytest.approx(0.5)


def test_a_document_scores_as_its_best_chunk():
    assert doc_scores([("a", 0.2), ("b", 0.5), ("a", 0.7)]) == {"a": 0.7, "b": 0.5}
