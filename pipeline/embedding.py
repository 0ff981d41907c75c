"""Sentence-transformers embedding: normalized vectors for cosine, batched by a token budget.

Texts are sorted by length so a batch pads little, and encoding runs in a worker thread on the backend chosen
in settings (PyTorch, ONNX Runtime or OpenVINO, see ``pipeline.backends``) so the event loop keeps going.
Queries get a lane of their own (``encode_query``): a second instance of the backend, on its own thread, so a
question never waits behind an ingest batch that takes tens of seconds to embed. On OpenVINO that instance
runs questions in a few fixed shapes compiled at start-up, over one stream per thread
(``pipeline.backends.shaped_batches``, ``model.query_streams``).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline import metrics as m
from pipeline.backends import Backend, load_backend
from pipeline.chunking import Chunker
from pipeline.settings import PACKAGED_MODEL, Settings

log = logging.getLogger(__name__)


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group indices into batches whose padded size (count x longest) stays within ``budget``.

    Indices are taken longest first, so each batch holds texts of similar length and pads little.
    A single text longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = max(lengths[i], 1)
        if current and max(longest, size) * (len(current) + 1) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


class Embedder:
    """Loads the model once; ``encode`` returns an ``(n, dim)`` float32 array of unit vectors."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.model.name == PACKAGED_MODEL:
            # the packaged weights are local: make sure nothing ever asks a hub
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        threads = settings.model.threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        self.model: Any = SentenceTransformer(settings.model_path, device=settings.model.device)
        self.name = settings.model.name
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise ValueError(f"model {self.name!r} does not declare its embedding dimension")
        self.dim: int = int(dim)
        max_seq_length = self.model.max_seq_length
        if max_seq_length is None:  # chunking needs it: a chunk must never be cut off silently
            raise ValueError(f"model {self.name!r} does not declare its maximum sequence length")
        self.max_seq_length: int = int(max_seq_length)
        # the chunker and token counts run on the event loop while a lane embeds on its thread: they get a copy of
        # their own (the backends each copy theirs too; see pipeline.backends._Tokenizing)
        self.tokenizer = copy.deepcopy(self.model.tokenizer)
        self._special = len(self.tokenizer("", add_special_tokens=True)["input_ids"])
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._query_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-query")
        self._query_backend: Backend | None = None
        self._threads = threads
        self.batch_token_budget = settings.model.batch_token_budget
        self.backend, self.quality = self._load_backend(latency=False)
        self.backend_label: str = self.backend.label
        log.info(
            "loaded model %s on %s (dim %d, max_seq_length %d, %d threads, mean cosine to fp32 %.4f)",
            self.name,
            self.backend_label,
            self.dim,
            self.max_seq_length,
            threads,
            self.quality["mean_cosine"],
        )

    def chunker(self) -> Chunker:
        """A chunker whose windows fit this model: chunk_tokens capped by max_seq_length less specials."""
        max_tokens = min(self.settings.model.chunk_tokens, self.max_seq_length - self._special)
        overlap = min(self.settings.model.chunk_overlap_tokens, max_tokens // 2)
        return Chunker(self.tokenizer, max_tokens=max_tokens, overlap=overlap)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def encode_sync(self, texts: Sequence[str], lengths: Sequence[int] | None = None) -> np.ndarray:
        return self._encode_with(self.backend, texts, lengths)

    def encode_query_sync(self, texts: Sequence[str]) -> np.ndarray:
        """Like ``encode_sync``, on the query lane: the backend instance made for latency (made on first use)."""
        if self._query_backend is None:
            # the export is cached and its quality already checked: this is a second compile, not a second export
            self._query_backend, _ = self._load_backend(latency=True)
        return self._encode_with(self._query_backend, texts, None)

    def _load_backend(self, *, latency: bool) -> tuple[Backend, dict[str, Any]]:
        cfg = self.settings.model
        return load_backend(
            cfg.backend,
            self.model,
            model_name=self.name,
            model_path=self.settings.model_path,
            threads=self._threads,
            cache_dir=cfg.cache_dir,
            min_cosine=cfg.min_mean_cosine,
            force=cfg.force_backend,
            latency=latency,
            # the query lane's OpenVINO streams: one per thread unless model.query_streams says otherwise
            overrides=(
                {
                    "NUM_STREAMS": cfg.query_streams,
                    **({"PERFORMANCE_HINT": "LATENCY"} if cfg.query_streams == 1 else {}),
                }
                if latency and cfg.query_streams
                else None
            ),
        )

    def _encode_with(self, backend: Backend, texts: Sequence[str], lengths: Sequence[int] | None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if lengths is None and getattr(backend, "latency", False):
            # the query lane's backend shapes its batches itself (pipeline.backends.shaped_batches): no count
            return backend.encode_batch(list(texts))
        if lengths is None:
            lengths = self.count_tokens(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        padded = [min(n + self._special, self.max_seq_length) for n in lengths]
        budget = self.batch_token_budget
        streams = backend.streams
        if streams > 1 and len(texts) > 1:
            # a backend running one batch per stream (OpenVINO, one core each) would leave cores idle on a
            # small input that fits one batch: the trickle of a live topic, a re-ingest of a few edited
            # chunks. Cap each batch at its share, so the input spreads over the streams.
            share = -(-len(texts) // streams)
            budget = min(budget, max(padded) * share)
        batches = token_budget_batches(padded, budget)
        vectors = backend.encode_batches([[texts[i] for i in batch] for batch in batches])
        for batch, vecs in zip(batches, vectors, strict=True):
            out[batch] = vecs
        return out

    async def encode(self, texts: Sequence[str], lengths: Sequence[int] | None = None) -> np.ndarray:
        """Encode off the event loop, on the ingest lane (one thread: calls run one after another)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._encode_observed, list(texts), None if lengths is None else list(lengths)
        )

    def _encode_observed(self, texts: list[str], lengths: list[int] | None) -> np.ndarray:
        # timed in the thread: with ingest batches in flight a call may wait behind an earlier one, and the
        # wait is not embedding time
        started = time.perf_counter()
        try:
            return self.encode_sync(texts, lengths)
        finally:
            m.EMBED_BATCH_SECONDS.observe(time.perf_counter() - started)

    async def encode_query(self, texts: Sequence[str]) -> np.ndarray:
        """Encode query texts off the event loop, on the query lane (never queued behind ingest)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._query_executor, self.encode_query_sync, list(texts))

    def warm_query_lane(self) -> None:
        """Make the query lane's backend now (a compile), and compile the shapes questions take (OpenVINO), so
        neither the first question nor the first of each length pays for it."""
        self.encode_query_sync(["warm up"])
        warm = getattr(self._query_backend, "warm", None)
        if warm is not None:
            started = time.perf_counter()
            shapes = warm(self.settings.query.max_batch)
            if shapes:
                log.info("query lane: %d input shapes compiled in %.1f s", shapes, time.perf_counter() - started)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._query_executor.shutdown(wait=False, cancel_futures=True)
