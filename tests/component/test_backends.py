"""Exported backends on the real model: cached exports, vectors close to PyTorch, the quality guard."""

import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from pipeline.backends import load_backend  # noqa: E402
from pipeline.errors import ConfigurationError  # noqa: E402

TEXTS = ["a short one", "how do I reset my password " * 20, "kafka offsets", "x"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


def _load(embedder, settings, cache, name, **kw):
    return load_backend(
        name, embedder.model, model_name=embedder.name, model_path=settings.model_path, threads=2, cache_dir=cache, **kw
    )


def test_onnx_export_matches_torch_and_is_cached(embedder, settings, cache):
    backend, quality = _load(embedder, settings, cache, "onnx")
    assert quality["mean_cosine"] > 0.9999
    ours = backend.encode_batch(TEXTS)
    ref = embedder.model.encode(TEXTS, normalize_embeddings=True)
    assert np.allclose(ours, ref, atol=1e-4)
    assert len(list(cache.rglob("model.onnx"))) == 1
    started = time.perf_counter()
    _load(embedder, settings, cache, "onnx")  # the second load reads the cache: no export, no guard run
    assert time.perf_counter() - started < 5


def test_int8_is_close_to_fp32_and_keyed_by_isa(embedder, settings, cache):
    backend, quality = _load(embedder, settings, cache, "onnx-int8")
    assert quality["mean_cosine"] >= 0.99 and quality["isa"] in {"amx", "avx512_vnni", "avx512", "avx2", "generic"}
    assert any(quality["isa"] in p.parent.name for p in cache.rglob("model.onnx"))
    vecs = backend.encode_batch(TEXTS)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)


def test_guard_refuses_a_backend_below_the_threshold_unless_forced(embedder, settings, cache):
    with pytest.raises(ConfigurationError, match="mean cosine"):
        _load(embedder, settings, cache, "onnx-int8", min_cosine=0.99999)
    backend, quality = _load(embedder, settings, cache, "onnx-int8", min_cosine=0.99999, force=True)
    assert quality["mean_cosine"] < 0.99999 and backend.encode_batch(["x"]).shape == (1, embedder.dim)


def test_embedder_uses_the_configured_backend(settings, cache):
    from pipeline.embedding import Embedder

    s = settings.model_copy(update={"model": settings.model.model_copy(update={"backend": "onnx", "cache_dir": cache})})
    emb = Embedder(s)
    try:
        assert emb.backend_label == "ONNX Runtime fp32"
        vecs = emb.encode_sync(TEXTS)
        assert np.allclose(vecs, emb.model.encode(TEXTS, normalize_embeddings=True), atol=1e-4)
    finally:
        emb.close()
