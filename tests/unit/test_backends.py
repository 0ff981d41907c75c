"""Backend selection without a model: instruction-set detection, int8 settings, pooling, cache keys, calibration."""

import numpy as np
import pytest

from pipeline.backends import (
    auto_backend,
    cpu_isa,
    export_dir,
    int8_reduce_range,
    load_backend,
    model_fingerprint,
    pool_and_normalize,
)
from pipeline.calibration import calibration_texts
from pipeline.errors import ConfigurationError


@pytest.mark.parametrize(
    ("flags", "isa"),
    [
        ({"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"}, "amx"),
        ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "avx512_vnni"),
        ({"avx2", "avx_vnni"}, "avx512_vnni"),
        ({"avx2", "avx512f", "avx512bw"}, "avx512"),
        ({"avx2", "fma"}, "avx2"),
        (set(), "generic"),
    ],
)
def test_isa_is_the_best_int8_instruction_set_of_the_cpu(flags, isa):
    assert cpu_isa(flags) == isa


@pytest.mark.parametrize(
    ("isa", "backend"),
    [
        ("amx", "openvino-int8"),
        ("avx512_vnni", "openvino-int8"),
        ("avx512", "openvino"),  # int8 without a one-instruction dot product was measured slower than fp32
        ("avx2", "openvino"),
        ("generic", "openvino"),
    ],
)
def test_auto_backend_uses_int8_only_where_the_cpu_multiplies_int8_fast(isa, backend):
    assert auto_backend(isa) == backend


def test_reduce_range_only_without_vnni():
    assert not int8_reduce_range("avx512_vnni") and not int8_reduce_range("amx")
    assert int8_reduce_range("avx2") and int8_reduce_range("avx512") and int8_reduce_range("generic")


def test_mean_pooling_ignores_padding_and_normalizes():
    hidden = np.array([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    out = pool_and_normalize(hidden, mask, "mean")
    assert np.allclose(out, [[1.0, 0.0]])
    cls = pool_and_normalize(np.array([[[0.0, 2.0], [5.0, 5.0]]]), np.array([[1, 1]]), "cls")
    assert np.allclose(cls, [[0.0, 1.0]])


def test_cache_key_separates_model_backend_and_isa(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"x" * 10)
    a = export_dir(tmp_path, "all-MiniLM-L6-v2", str(model), "onnx-int8", "avx512_vnni")
    assert a != export_dir(tmp_path, "all-MiniLM-L6-v2", str(model), "onnx-int8", "avx2")
    assert a != export_dir(tmp_path, "all-MiniLM-L6-v2", str(model), "openvino-int8", "avx512_vnni")
    before = model_fingerprint(str(model))
    (model / "weights.bin").write_bytes(b"x" * 11)  # another checkpoint under the same name
    assert model_fingerprint(str(model)) != before


def test_calibration_set_is_varied_and_local():
    texts = calibration_texts()
    assert len(texts) >= 60 and len(set(texts)) == len(texts)
    assert max(len(t.split()) for t in texts) > 100 and min(len(t.split()) for t in texts) < 6


def test_unknown_backend_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="unknown embedding backend"):
        load_backend("tensorrt", object(), model_name="m", model_path="/nonexistent", threads=1)
