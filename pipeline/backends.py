"""Embedding backends behind one interface: PyTorch, ONNX Runtime (fp32, int8) and OpenVINO (fp32, int8).

Exports are cached on disk keyed by model, backend and CPU instruction set; a quality guard compares each
export's vectors with PyTorch fp32 ones on a calibration set and refuses a backend below the threshold.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.calibration import calibration_texts
from pipeline.errors import ConfigurationError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8", "openvino", "openvino-int8")
#: bump when the export recipe changes, so old cached exports are not reused
EXPORT_VERSION = 1
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Backend(Protocol):
    """Encodes already-batched texts to L2-normalized float32 vectors."""

    label: str
    #: batches it runs side by side (OpenVINO: one per stream); 1 when one batch takes every core
    streams: int

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_batches(self, batches: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Several batches; a backend may overlap them (OpenVINO runs one per stream)."""
        ...


# --- the CPU ------------------------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(flags: set[str] | None = None) -> str:
    """The best int8 instruction set of this CPU: ``amx``, ``avx512_vnni``, ``avx512``, ``avx2`` or ``generic``."""
    flags = cpu_flags() if flags is None else flags
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags and "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "generic"


def auto_backend(isa: str | None = None) -> str:
    """The backend ``auto`` stands for on this CPU, from benchmarks/results/embedding_backends*.md.

    With VNNI or AMX (int8 dot products in one instruction) OpenVINO int8 was 3.7-4.5x PyTorch at a mean
    cosine of 0.996 to fp32. Without them (AVX2 only) OpenVINO int8 was slower than OpenVINO fp32 in every run
    (7.2 vs 9.0 and 8.0 vs 11.1 chunks/s), and OpenVINO fp32 was the fastest backend, with vectors identical
    to PyTorch's.
    """
    isa = cpu_isa() if isa is None else isa
    return "openvino-int8" if isa in ("amx", "avx512_vnni") else "openvino"


def int8_reduce_range(isa: str) -> bool:
    """Without VNNI the u8 x s8 multiply-add can saturate; 7-bit weights (reduce_range) avoid that."""
    return isa not in ("amx", "avx512_vnni")


# --- the cache ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vectorstream" / "models"


def model_fingerprint(model_path: str) -> str:
    """Name and file sizes of the model folder: a different checkpoint under the same name gets its own cache."""
    h = hashlib.sha256(str(Path(model_path).resolve()).encode())
    root = Path(model_path)
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(root)}:{p.stat().st_size}".encode())
    return h.hexdigest()[:12]


def export_dir(cache_dir: Path, model_name: str, model_path: str, backend: str, isa: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name)[-60:]
    return cache_dir / f"{slug}-{model_fingerprint(model_path)}" / f"{backend}-{isa}-v{EXPORT_VERSION}"


# --- pooling, shared by the exported backends -----------------------------------------------------------------


def pooling_mode(st_model: Any) -> str:
    """``mean`` or ``cls``: the pooling of a Transformer -> Pooling (-> Normalize) sentence-transformers model."""
    modules = list(st_model)
    if len(modules) < 2 or type(modules[1]).__name__ != "Pooling":
        raise ConfigurationError("exported backends support Transformer -> Pooling models only; use backend=torch")
    pool = modules[1]
    mode = getattr(pool, "pooling_mode", None)
    if mode is None:  # sentence-transformers before 6
        mode = (
            "mean"
            if getattr(pool, "pooling_mode_mean_tokens", False)
            else ("cls" if getattr(pool, "pooling_mode_cls_token", False) else "other")
        )
    if mode not in ("mean", "cls"):
        raise ConfigurationError(f"pooling {mode!r} is not supported by exported backends; use backend=torch")
    return str(mode)


def pool_and_normalize(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "cls":
        vecs = hidden[:, 0, :].astype(np.float32)
    else:
        m = mask[:, :, None].astype(np.float32)
        vecs = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return (vecs / np.clip(norms, 1e-12, None)).astype(np.float32)


class _Tokenizing:
    """Tokenize as sentence-transformers does: pad to the batch's longest, truncate at max_seq_length."""

    def __init__(self, tokenizer: Any, max_seq_length: int, pooling: str) -> None:
        # a copy of its own: a fast (Rust) tokenizer keeps its padding and truncation settings on the object and
        # resets them on every call, so two threads calling one tokenizer with different settings (the chunker on
        # the event loop, this backend on its lane, the other lane) corrupt each other's output (ragged arrays)
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_seq_length = max_seq_length
        self.pooling = pooling

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="np"
        )
        out = {k: np.asarray(enc[k], dtype=np.int64) for k in _INPUTS if k in enc}
        if "token_type_ids" not in out:
            out["token_type_ids"] = np.zeros_like(out["input_ids"])
        return out


# --- query shapes --------------------------------------------------------------------------------------------------


def bucket_length(n: int, max_length: int) -> int:
    """The padded length of a batch whose longest text has ``n`` tokens: a multiple of 8 up to 64, of 16 up to
    128, of 32 beyond, never above ``max_length``. Questions are short: up to 64 tokens 8 shapes cover them."""
    for limit, step in ((64, 8), (128, 16)):
        if n <= limit:
            return min(max_length, -(-n // step) * step)
    return min(max_length, -(-n // 32) * 32)


def batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes :func:`shaped_batches` uses: the powers of two up to ``max_batch``."""
    sizes, size = [], 1
    while size <= max(1, max_batch):
        sizes.append(size)
        size *= 2
    return sizes


def shaped_batches(lengths: Sequence[int], streams: int = 1) -> list[list[int]]:
    """Indices of ``lengths`` in groups whose sizes are powers of two (13 -> 8 + 4 + 1), longest texts first, so
    each group pads to a :func:`bucket_length` close to its own longest. Splitting costs a little against one
    batch of the odd size (measured: a warm batch of 16 took 25 ms, of 4 9 ms) and keeps the shapes few.

    With ``streams`` > 1 the texts are first dealt round-robin (longest first) into one share per stream, each
    share split as above, and the groups interleaved (share 1's first, share 2's first, ...), so that streams
    taking groups in order each get a share of about equal work."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    shares = [order[s :: max(1, streams)] for s in range(max(1, streams))]
    per_share: list[list[list[int]]] = []
    for share in shares:
        groups: list[list[int]] = []
        start = 0
        while start < len(share):
            size = 1 << ((len(share) - start).bit_length() - 1)
            groups.append(share[start : start + size])
            start += size
        per_share.append(groups)
    out: list[list[int]] = []
    for round_ in range(max((len(g) for g in per_share), default=0)):
        out.extend(groups[round_] for groups in per_share if round_ < len(groups))
    return out


def _padded(ids: Sequence[Sequence[int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """BERT-style inputs for token ids, right-padded to ``length`` and masked."""
    input_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}


# --- the backends ------------------------------------------------------------------------------------------------


class _Sequential(ABC):
    """One batch at a time, on every thread."""

    streams = 1

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_batches(self, batches: Sequence[Sequence[str]]) -> list[np.ndarray]:
        return [self.encode_batch(b) for b in batches]


class TorchBackend(_Sequential):
    def __init__(self, st_model: Any) -> None:
        self.model = st_model
        self.label = "torch fp32"

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(
            list(texts),
            batch_size=max(1, len(texts)),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)


class OnnxBackend(_Tokenizing, _Sequential):
    def __init__(self, path: Path, tokenizer: Any, max_seq_length: int, pooling: str, threads: int, label: str) -> None:
        super().__init__(tokenizer, max_seq_length, pooling)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._names = [i.name for i in self.session.get_inputs()]
        self.label = label

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        feed = self.tokenize(texts)
        (hidden,) = self.session.run(["last_hidden_state"], {k: feed[k] for k in self._names})
        return pool_and_normalize(hidden, feed["attention_mask"], self.pooling)


class OpenVinoBackend(_Tokenizing):
    def __init__(
        self,
        path: Path,
        tokenizer: Any,
        max_seq_length: int,
        pooling: str,
        threads: int,
        label: str,
        *,
        latency: bool = False,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, max_seq_length, pooling)
        import openvino as ov

        self.xml_path = path

        core = ov.Core()
        # One stream per core, one thread each, for both lanes. Ingest: on few cores, batches side by side beat
        # one batch on all threads (measured: ~1.3-1.8x on 2 cores), and tokenizing the next batch overlaps
        # inference. Queries: a lone question runs on one thread; measured here, the same question on one
        # stream of two threads finished no sooner between requests 20 ms apart (6.05 against 6.02 ms p50) and
        # cost the process half as much CPU again (9.1 against 5.9 ms a question), the second thread spinning
        # while it waits for work; a batch is spread over the streams instead (shaped_batches).
        self.streams = max(1, threads)
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": self.streams,
            # fp32 means fp32: without this OpenVINO computes in bf16 on CPUs that have it
            "INFERENCE_PRECISION_HINT": "f32",
        }
        config.update(overrides or {})  # the roofline benchmark's layout experiments
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        # what the plugin made of it (an override may ask for another layout)
        self.streams = max(1, int(self.compiled.get_property("NUM_STREAMS")))
        self._names = [p.get_any_name() for p in self.compiled.inputs]
        self._queue: Any = None
        self._lock = threading.Lock()  # one caller at a time owns the request queue and its callback
        self.label = label
        #: an instance for the query lane runs shaped batches (:func:`shaped_batches`)
        self.latency = latency
        self._pad_id = int(self.tokenizer.pad_token_id or 0)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_batches([texts])[0]

    def encode_batches(self, batches: Sequence[Sequence[str]]) -> list[np.ndarray]:
        with self._lock:
            if self.latency:
                return [self._encode_shaped(texts) for texts in batches]
            return self._encode_batches(batches)

    def _encode_shaped(self, texts: Sequence[str]) -> np.ndarray:
        """One batch of queries, run as a few inferences of shapes from a small fixed set, spread over the streams.

        The CPU plugin compiles kernels for each input shape the first time it sees it: measured here, a
        question of a length not seen before took ~15 ms more than one seen (3 ms), and a batch of 16 new ones
        40 ms against 25. Questions come in every length and batches in every size, so served as they come
        nearly every batch meets a new shape. Shaped, there are few enough to compile them all at start-up
        (:meth:`warm`), and the padding is masked: the vectors are the same.
        """
        enc = self.tokenizer(list(texts), padding=False, truncation=True, max_length=self.max_seq_length)
        ids: list[list[int]] = enc["input_ids"]
        groups = shaped_batches([len(x) for x in ids], self.streams)
        feeds = [
            _padded(
                [ids[i] for i in group],
                bucket_length(max(len(ids[i]) for i in group), self.max_seq_length),
                self._pad_id,
            )
            for group in groups
        ]
        vectors = self._run(feeds)
        out = np.empty((len(ids), vectors[0].shape[1]), dtype=np.float32)
        for group, vecs in zip(groups, vectors, strict=True):
            out[group] = vecs
        return out

    def warm(self, max_batch: int, max_length: int = 64) -> int:
        """Compile, on every stream, each shape a batch of up to ``max_batch`` questions of up to ``max_length``
        tokens can take (longer ones compile on first use); returns how many shapes that was."""
        if not self.latency:
            return 0
        lengths = sorted({bucket_length(n, self.max_seq_length) for n in range(1, max_length + 1)})
        shapes = [(size, length) for size in batch_sizes(max_batch) for length in lengths]
        feeds = [
            _padded([[self._pad_id] * length] * size, length, self._pad_id)
            for size, length in shapes
            for _ in range(self.streams)
        ]
        with self._lock:
            self._run(feeds)
        return len(shapes)

    def _encode_batches(self, batches: Sequence[Sequence[str]]) -> list[np.ndarray]:
        # tokenized one by one as they start: the next batch is tokenized while the streams run the last ones
        return self._run(self.tokenize(texts) for texts in batches)

    def _run(self, feeds: Iterable[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Infer each feed on the next free stream; the pooled unit vectors of each, in order."""
        import openvino as ov

        if self._queue is None:
            self._queue = ov.AsyncInferQueue(self.compiled, self.streams)
        out: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []
        started = 0

        def done(request: Any, userdata: tuple[int, np.ndarray]) -> None:
            i, mask = userdata
            try:
                out[i] = pool_and_normalize(np.asarray(request.get_output_tensor(0).data), mask, self.pooling)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                errors.append(exc)

        self._queue.set_callback(done)
        try:
            for i, feed in enumerate(feeds):
                self._queue.start_async({k: feed[k] for k in self._names}, (i, feed["attention_mask"]))
                started = i + 1
        finally:
            # also when a batch failed before it started: requests already started must finish, or the queue stays
            # busy and every later call fails ("Infer Request is busy")
            self._queue.wait_all()
        if errors:
            raise errors[0]
        if len(out) != started:
            raise RuntimeError("OpenVINO returned fewer batches than it was given")
        return [out[i] for i in range(started)]


# --- exporting -----------------------------------------------------------------------------------------------------


class _HiddenStates:
    """A torch module returning the transformer's last hidden state from the three BERT-style inputs."""

    def __new__(cls, auto_model: Any) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.inner(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state

        return Wrapped(auto_model).eval()


def _example_inputs(st_model: Any) -> dict[str, Any]:
    enc = st_model.tokenizer(
        ["an example input", "a second, somewhat longer example input text"], padding=True, return_tensors="pt"
    )
    import torch

    out = {k: enc[k] for k in _INPUTS if k in enc}
    out.setdefault("token_type_ids", torch.zeros_like(out["input_ids"]))
    return out


def _auto_model(st_model: Any) -> Any:
    first = list(st_model)[0]
    model = getattr(first, "auto_model", None) or getattr(first, "model", None)
    if model is None:
        raise ConfigurationError("cannot find the transformer inside this model; use backend=torch")
    return model


def export_onnx_fp32(st_model: Any, out: Path) -> None:
    """PyTorch -> ONNX with dynamic batch and sequence axes, then ONNX Runtime's BERT fusions when they apply."""
    import warnings

    import torch

    example = _example_inputs(st_model)
    axes = {k: {0: "batch", 1: "sequence"} for k in (*_INPUTS, "last_hidden_state")}
    raw = out.with_name("raw.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _HiddenStates(_auto_model(st_model)),
            tuple(example[k] for k in _INPUTS),
            str(raw),
            input_names=list(_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    config = _auto_model(st_model).config
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=1,
        )
        fused.save_model_to_file(str(out))
        raw.unlink()
    except Exception as exc:  # noqa: BLE001 - the plain export is correct, only slower
        log.warning("ONNX Runtime's transformer fusions did not apply (%s); using the plain export", exc)
        raw.rename(out)


def export_onnx_int8(fp32: Path, out: Path, isa: str) -> None:
    """Dynamic quantization: int8 weights, activations quantized per batch at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the fused graph has contrib ops that shape inference cannot type: their outputs are float tensors
    quantize_dynamic(
        str(fp32),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=int8_reduce_range(isa),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def export_openvino(st_model: Any, out: Path) -> None:
    import openvino as ov

    model = ov.convert_model(_HiddenStates(_auto_model(st_model)), example_input=_example_inputs(st_model))
    for port, name in zip(model.inputs, _INPUTS, strict=False):
        port.get_tensor().set_names({name})
    ov.save_model(model, str(out), compress_to_fp16=False)


def export_openvino_int8(fp32_xml: Path, out: Path, st_model: Any, max_seq_length: int) -> None:
    """Static int8 with NNCF, calibrated on the local calibration texts (never a dataset from a hub)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(fp32_xml))
    tok = _Tokenizing(st_model.tokenizer, max_seq_length, "mean")
    texts = calibration_texts()
    samples = [tok.tokenize(texts[i : i + 8]) for i in range(0, len(texts), 8)]
    quantized = nncf.quantize(
        model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples)
    )
    ov.save_model(quantized, str(out), compress_to_fp16=False)


# --- loading with the cache and the guard ------------------------------------------------------------------------


def _guard(backend: Backend, reference: Backend) -> dict[str, float]:
    texts = calibration_texts()
    ours = np.concatenate([backend.encode_batch(texts[i : i + 16]) for i in range(0, len(texts), 16)])
    ref = np.concatenate([reference.encode_batch(texts[i : i + 16]) for i in range(0, len(texts), 16)])
    cos = (ours * ref).sum(axis=1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "texts": len(texts)}


def load_backend(
    name: str,
    st_model: Any,
    *,
    model_name: str,
    model_path: str,
    threads: int,
    cache_dir: Path | None = None,
    min_cosine: float = 0.99,
    force: bool = False,
    latency: bool = False,
    overrides: dict[str, Any] | None = None,
) -> tuple[Backend, dict[str, Any]]:
    """The named backend, exported on first use and cached; returns it with its quality record.

    A backend whose mean cosine to PyTorch fp32 on the calibration texts is below ``min_cosine`` raises
    :class:`ConfigurationError` unless ``force``.
    """
    if name == "auto":
        name = auto_backend()
    if name not in BACKENDS:
        raise ConfigurationError(f"unknown embedding backend {name!r}; choose one of {', '.join(BACKENDS)}")
    torch_backend = TorchBackend(st_model)
    if name == "torch":
        return torch_backend, {"backend": name, "mean_cosine": 1.0}
    pooling = pooling_mode(st_model)
    isa = cpu_isa() if name.endswith("int8") else "any"
    cache = cache_dir or default_cache_dir()
    folder = export_dir(cache, model_name, model_path, name, isa)
    max_len = int(st_model.max_seq_length)
    if not (folder / "quality.json").is_file():
        _export(name, st_model, folder, cache, model_name, model_path, isa, max_len)
    backend = _open(name, folder, st_model.tokenizer, max_len, pooling, threads, isa, latency, overrides)
    quality_path = folder / "quality.json"
    quality = json.loads(quality_path.read_text())
    if "mean_cosine" not in quality:
        started = time.perf_counter()
        quality.update(_guard(backend, torch_backend))
        quality["guard_seconds"] = round(time.perf_counter() - started, 2)
        _atomic_write(quality_path, json.dumps(quality, indent=2))
    quality["backend"] = name
    if quality["mean_cosine"] < min_cosine:
        message = (
            f"embedding backend {name} gives a mean cosine of {quality['mean_cosine']:.4f} to PyTorch fp32 "
            f"on the calibration set, below the guard's {min_cosine}"
        )
        if not force:
            raise ConfigurationError(message + "; set VECTORSTREAM_MODEL__FORCE_BACKEND=true to use it anyway")
        log.warning("%s; used anyway because force_backend is set", message)
    return backend, quality


def _open(
    name: str,
    folder: Path,
    tokenizer: Any,
    max_len: int,
    pooling: str,
    threads: int,
    isa: str,
    latency: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Backend:
    if name.startswith("onnx"):
        label = "ONNX Runtime int8 (" + isa + ")" if name == "onnx-int8" else "ONNX Runtime fp32"
        return OnnxBackend(folder / "model.onnx", tokenizer, max_len, pooling, threads, label)
    label = "OpenVINO int8 (" + isa + ")" if name == "openvino-int8" else "OpenVINO fp32"
    return OpenVinoBackend(
        folder / "model.xml", tokenizer, max_len, pooling, threads, label, latency=latency, overrides=overrides
    )


def _export(
    name: str, st_model: Any, folder: Path, cache: Path, model_name: str, model_path: str, isa: str, max_len: int
) -> None:
    """Export into a scratch folder and rename it into place, so concurrent processes never see half a model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    started = time.perf_counter()
    log.info("exporting %s for backend %s (first use; cached in %s)", model_name, name, folder)
    try:
        if name == "onnx":
            export_onnx_fp32(st_model, scratch / "model.onnx")
        elif name == "onnx-int8":
            fp32 = export_dir(cache, model_name, model_path, "onnx", "any")
            if not (fp32 / "quality.json").is_file():
                _export("onnx", st_model, fp32, cache, model_name, model_path, "any", max_len)
            export_onnx_int8(fp32 / "model.onnx", scratch / "model.onnx", isa)
        elif name == "openvino":
            export_openvino(st_model, scratch / "model.xml")
        else:
            fp32 = export_dir(cache, model_name, model_path, "openvino", "any")
            if not (fp32 / "quality.json").is_file():
                _export("openvino", st_model, fp32, cache, model_name, model_path, "any", max_len)
            export_openvino_int8(fp32 / "model.xml", scratch / "model.xml", st_model, max_len)
        meta = {
            "model": model_name,
            "backend": name,
            "isa": isa,
            "export_version": EXPORT_VERSION,
            "export_seconds": round(time.perf_counter() - started, 1),
        }
        (scratch / "quality.json").write_text(json.dumps(meta, indent=2))
        try:
            scratch.rename(folder)
        except OSError:
            if not (folder / "quality.json").is_file():  # not another process's finished export: a real error
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("exported %s in %.1fs", name, time.perf_counter() - started)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
