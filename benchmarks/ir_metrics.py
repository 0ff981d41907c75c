"""Retrieval metrics as trec_eval computes them: nDCG@k with linear gains, recall@k, mean over queries.

Documents are ranked by score (ties: by id); a query without positive judgements is skipped, as pytrec_eval does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def rank(scores: Mapping[str, float]) -> list[str]:
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))]


def ndcg_at_k(ranked: list[str], judged: Mapping[str, int], k: int = 10) -> float:
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if judged.get(d, 0) > 0)
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at_k(ranked: list[str], judged: Mapping[str, int], k: int = 10) -> float:
    relevant = {d for d, g in judged.items() if g > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def evaluate(
    runs: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], k: int = 10
) -> dict[str, float]:
    """Mean nDCG@k and recall@k over the judged queries; a judged query missing from ``runs`` scores 0."""
    queries = [q for q, j in qrels.items() if any(g > 0 for g in j.values())]
    ndcg = recall = 0.0
    for q in queries:
        ranked = rank(runs.get(q, {}))
        ndcg += ndcg_at_k(ranked, qrels[q], k)
        recall += recall_at_k(ranked, qrels[q], k)
    n = max(1, len(queries))
    return {f"ndcg@{k}": ndcg / n, f"recall@{k}": recall / n, "queries": len(queries)}


def doc_scores(chunk_hits: list[tuple[str, float]]) -> dict[str, float]:
    """A document scores as its best chunk (chunk hits: (doc id, score))."""
    out: dict[str, float] = {}
    for doc, score in chunk_hits:
        if score > out.get(doc, -math.inf):
            out[doc] = score
    return out
