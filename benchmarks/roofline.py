"""The embedding model against this CPU's roofline: the GEMM ceiling at the model's own shapes, each backend's
achieved GFLOP/s and fraction of it, a per-operator profile of the chosen backend and the layout experiments.

``python -m benchmarks --only roofline`` (or ``python -m benchmarks.roofline``) writes results/roofline.md and
results/operator_profile.md. Every ceiling runs in a child process, so its thread count and instruction set
(``OPENBLAS_CORETYPE``, ``ONEDNN_MAX_CPU_ISA``) are its own and the report says which kernels actually ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, ROOT, load_corpus, machine_info, offline, say, table, write_results

DEFAULT_DOCS = 200
#: tokens per GEMM call in the ceiling: one ingest batch (model.batch_token_budget's order of magnitude)
CEILING_TOKENS = 4096


# --- the model's arithmetic ----------------------------------------------------------------------------------


def model_dims(st_model: Any) -> dict[str, int]:
    cfg = list(st_model)[0].auto_model.config
    return {
        "layers": int(cfg.num_hidden_layers),
        "hidden": int(cfg.hidden_size),
        "ffn": int(cfg.intermediate_size),
        "heads": int(cfg.num_attention_heads),
    }


def flops_of_text(n: int, dims: dict[str, int]) -> float:
    """Multiply-adds x 2 of one text of ``n`` tokens (embeddings, norms, softmax, GELU left out: < 1 %):
    per layer, n x (4 d^2 [Q, K, V, output] + 2 d f [FFN]) for the projections and 2 n^2 d for Q K^T and A V."""
    d, f, layers = dims["hidden"], dims["ffn"], dims["layers"]
    return 2.0 * layers * (n * (4 * d * d + 2 * d * f) + 2 * n * n * d)


def formula(dims: dict[str, int]) -> str:
    d, f, layers = dims["hidden"], dims["ffn"], dims["layers"]
    per_token = 2 * layers * (4 * d * d + 2 * d * f)
    return (
        f"FLOPs(text of n tokens) = 2 x layers x (n x (4 d^2 + 2 d f) + 2 n^2 d), layers={layers}, d={d}, f={f}: "
        f"{per_token / 1e6:.2f} MFLOP per token for the projections plus {4 * layers * d / 1e3:.1f} kFLOP x n per "
        f"token for attention (at n=193: {flops_of_text(193, dims) / 193 / 1e6:.1f} MFLOP per token). Counted on "
        "real tokens (special tokens included, padding excluded), whatever the precision the backend computes "
        "in: fp32-equivalent FLOPs."
    )


def gemm_shapes(tokens: int, dims: dict[str, int]) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, calls per layer) of the projections at ``tokens`` rows: what the weights GEMMs do."""
    d, f = dims["hidden"], dims["ffn"]
    return [
        ("Q/K/V/output (T x d)(d x d)", tokens, d, d, 4),
        ("FFN up (T x d)(d x f)", tokens, d, f, 1),
        ("FFN down (T x f)(f x d)", tokens, f, d, 1),
    ]


# --- ceilings, each in a child process -----------------------------------------------------------------------


def _best_seconds(fn: Any, min_seconds: float = 0.6, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, started = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            took = time.perf_counter() - started
            if took >= min_seconds / repeats:
                break
        best = min(best, took / n)
    return best


def _child_numpy(shapes: list[tuple[str, int, int, int, int]]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    rows = []
    for name, m, k, n, calls in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        out = np.empty((m, n), dtype=np.float32)
        sec = _best_seconds(lambda a=a, b=b, out=out: np.matmul(a, b, out=out))
        rows.append({"shape": name, "m": m, "k": k, "n": n, "calls": calls, "seconds": sec})
    from threadpoolctl import threadpool_info

    info = [
        {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")} for i in threadpool_info()
    ]
    return {"rows": rows, "kernels": info}


def _child_openvino(shapes: list[tuple[str, int, int, int, int]], precision: str, threads: int) -> dict[str, Any]:
    """One MatMul against constant weights per compiled model; ``int8``: NNCF-style FakeQuantize on the
    activations (per tensor) and the weights (per output channel), which the CPU plugin runs as u8 x s8."""
    import openvino as ov
    import openvino.opset13 as ops

    core = ov.Core()
    rng = np.random.default_rng(0)
    rows = []
    for name, m, k, n, calls in shapes:
        x = ops.parameter([m, k], ov.Type.f32, name="x")
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        src: Any = x
        weights: Any = ops.constant(w)
        if precision == "int8":
            lo, hi = np.float32(-4.0), np.float32(4.0)
            src = ops.fake_quantize(x, ops.constant(lo), ops.constant(hi), ops.constant(lo), ops.constant(hi), 256)
            amax = np.abs(w).max(axis=1, keepdims=True).astype(np.float32)
            weights = ops.fake_quantize(
                weights, ops.constant(-amax), ops.constant(amax), ops.constant(-amax), ops.constant(amax), 255
            )
        mm = ops.matmul(src, weights, transpose_a=False, transpose_b=True)
        model = ov.Model([mm.output(0)], [x], f"gemm_{m}x{k}x{n}")
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERF_COUNT": True,
        }
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        data = rng.standard_normal((m, k)).astype(np.float32)
        request.set_input_tensor(ov.Tensor(data))
        sec = _best_seconds(request.infer)
        execs = sorted(
            {f"{p.node_type}:{p.exec_type}" for p in request.get_profiling_info() if p.node_type == "FullyConnected"}
            or {f"{p.node_type}:{p.exec_type}" for p in request.get_profiling_info() if p.real_time.total_seconds() > 0}
        )
        rows.append({"shape": name, "m": m, "k": k, "n": n, "calls": calls, "seconds": sec, "kernels": execs})
    return {"rows": rows}


def _child(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    shapes = [(str(n), int(m), int(k), int(c), int(x)) for n, m, k, c, x in spec["shapes"]]
    if spec["engine"] == "numpy":
        out = _child_numpy(shapes)
    else:
        out = _child_openvino(shapes, spec["precision"], spec["threads"])
    print(json.dumps(out))
    return 0


def measure_ceiling(
    engine: str, threads: int, shapes: list[tuple[str, int, int, int, int]], precision: str = "f32", isa_env: str = ""
) -> dict[str, Any]:
    env = dict(os.environ)
    if engine == "numpy":
        env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        if isa_env:
            env["OPENBLAS_CORETYPE"] = isa_env
    elif isa_env:
        env["ONEDNN_MAX_CPU_ISA"] = isa_env
    spec = {"engine": engine, "precision": precision, "threads": threads, "shapes": shapes}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.roofline", "--child", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    flops = sum(2.0 * r["m"] * r["k"] * r["n"] * r["calls"] for r in out["rows"])
    seconds = sum(r["seconds"] * r["calls"] for r in out["rows"])
    for r in out["rows"]:
        r["gflops"] = 2.0 * r["m"] * r["k"] * r["n"] / r["seconds"] / 1e9
    out.update(engine=engine, threads=threads, precision=precision, isa_env=isa_env or "native")
    out["gflops"] = flops / seconds / 1e9  # a layer's mix of the three shapes, weighted as the model calls them
    return out


# --- backends on real text ---------------------------------------------------------------------------------------


def _embedder(backend: str, **model_updates: Any) -> Any:
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings

    base = Settings(_env_file=None)
    model = base.model.model_copy(update={"backend": backend, **model_updates})
    return Embedder(base.model_copy(update={"model": model}))


def _timed_encode(emb: Any, texts: list[str], lengths: list[int], rounds: int = 2) -> float:
    emb.encode_sync(texts[:32], lengths[:32])
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        emb.encode_sync(texts, lengths)
        best = min(best, time.perf_counter() - started)
    return best


def padded_tokens(emb: Any, lengths: list[int], budget: int, streams: int) -> int:
    """Tokens the kernels compute for these texts under the embedder's batching (padding included)."""
    from pipeline.embedding import token_budget_batches

    padded = [min(n + emb._special, emb.max_seq_length) for n in lengths]
    if streams > 1 and len(padded) > 1:
        budget = min(budget, max(padded) * -(-len(padded) // streams))
    return sum(len(b) * max(padded[i] for i in b) for b in token_budget_batches(padded, budget))


# --- the per-operator profile ------------------------------------------------------------------------------------

GEMM = "GEMM with weights (Q/K/V/output projections, FFN; bias and GELU fused in)"
ATTENTION = "attention (fused: Q K^T, scale, mask, softmax, A V)"
LAYER_NORM = "layer norm (MVN and its scale/shift)"
_BY_TYPE = (
    (GEMM, ("FullyConnected", "FullyConnectedQuantizedLegacy", "MatMul")),
    (ATTENTION, ("ScaledDotProductAttention", "Softmax", "SoftMax")),
    (LAYER_NORM, ("MVN", "LayerNorm", "RMS")),
    ("GELU (not fused)", ("Gelu",)),
    ("quantize / dequantize", ("FakeQuantize", "Quantize", "Dequantize")),
    ("copies and layout (reorder, convert, transpose, reshape, concat)", ("Reorder", "Convert", "Transpose",
     "Reshape", "Concat", "Split", "VariadicSplit", "Broadcast", "Squeeze", "Unsqueeze", "StridedSlice", "Slice")),
    ("embeddings lookup (gather)", ("Gather",)),
    ("element-wise (residual adds, masks, scales)", ("Eltwise", "Add", "Multiply", "Subtract", "Select", "Power",
     "MulAdd", "GreaterEqual")),
)  # fmt: skip


def _category(node_type: str, original: str) -> str:
    """A profiled node's category, from what it was made of (``originalLayersNames`` of the runtime model:
    OpenVINO fuses e.g. a whole attention block into one ``Subgraph`` node) and else from its type."""
    low = original.lower()
    if node_type.startswith("FullyConnected"):
        return GEMM
    if "scaled_dot_product_attention" in low or "softmax" in low:
        return ATTENTION
    if "layer_norm" in low or "layernorm" in low or node_type == "MVN":
        return LAYER_NORM
    for name, types in _BY_TYPE:
        if node_type in types:
            return name
    return f"other ({node_type})"


def _original_layers(compiled: Any) -> dict[str, str]:
    out = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        out[op.get_friendly_name()] = rt["originalLayersNames"].astype(str) if "originalLayersNames" in rt else ""
    return out


def operator_profile(emb: Any, texts: list[str], lengths: list[int], batches: int = 6) -> dict[str, Any]:
    """Run the chosen backend's compiled model with PERF_COUNT on real token-budget batches, one request at a
    time, and split each batch's wall time into tokenization, the model's operators, and pooling/Python."""
    import openvino as ov

    from pipeline.backends import pool_and_normalize
    from pipeline.embedding import token_budget_batches

    backend = emb.backend
    core = ov.Core()
    xml = backend.xml_path
    threads = emb._threads
    config = {
        "INFERENCE_NUM_THREADS": 1 if backend.streams > 1 else threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "PERF_COUNT": True,
    }
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
    names = [p.get_any_name() for p in compiled.inputs]
    original = _original_layers(compiled)
    request = compiled.create_infer_request()
    padded = [min(n + emb._special, emb.max_seq_length) for n in lengths]
    order = token_budget_batches(padded, emb.batch_token_budget)
    per_op: dict[str, float] = defaultdict(float)
    per_cat: dict[str, float] = defaultdict(float)
    op_nodes: dict[str, int] = defaultdict(int)
    execs: dict[str, set[str]] = defaultdict(set)
    tok_s = model_s = pool_s = wall_s = 0.0
    real_tokens = pad_tokens = 0
    chosen = order[1 : batches + 1] if len(order) > batches else order
    feed0 = backend.tokenize([texts[i] for i in chosen[0]])
    request.infer({k: feed0[k] for k in names})  # warm-up: first-shape compilation
    for batch in chosen:
        started = time.perf_counter()
        feed = backend.tokenize([texts[i] for i in batch])
        t1 = time.perf_counter()
        request.infer({k: feed[k] for k in names})
        t2 = time.perf_counter()
        pool_and_normalize(np.asarray(request.get_output_tensor(0).data), feed["attention_mask"], backend.pooling)
        t3 = time.perf_counter()
        tok_s += t1 - started
        model_s += t2 - t1
        pool_s += t3 - t2
        wall_s += t3 - started
        real_tokens += int(feed["attention_mask"].sum())
        pad_tokens += int(feed["attention_mask"].size)
        for p in request.get_profiling_info():
            sec = p.real_time.total_seconds()
            if sec <= 0:
                continue
            per_op[p.node_type] += sec
            per_cat[_category(p.node_type, original.get(p.node_name, ""))] += sec
            op_nodes[p.node_type] += 1
            execs[p.node_type].add(p.exec_type)
    ops_total = sum(per_op.values())
    return {
        "batches": len(chosen),
        "texts": sum(len(b) for b in chosen),
        "real_tokens": real_tokens,
        "padded_tokens": pad_tokens,
        "threads_per_request": config["INFERENCE_NUM_THREADS"],
        "wall_seconds": wall_s,
        "tokenize_seconds": tok_s,
        "model_seconds": model_s,
        "pool_seconds": pool_s,
        "operators_seconds": ops_total,
        "per_category": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "per_node_type": {
            k: {"seconds": v, "nodes": op_nodes[k] // len(chosen), "exec_types": sorted(execs[k])}
            for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])
        },
    }


# --- the run -------------------------------------------------------------------------------------------------------


def run(docs_n: int = DEFAULT_DOCS, write: bool = True, experiments: bool = True) -> dict[str, Any]:
    offline()
    from benchmarks.ingest_throughput import chunk_texts
    from pipeline.backends import cpu_isa

    machine = machine_info()
    load_before = os.getloadavg()
    say("loading the chosen backend (auto)")
    chosen = _embedder("auto")
    dims = model_dims(chosen.model)
    docs = load_corpus(docs_n)
    texts, lengths = chunk_texts(chosen, docs)
    special = chosen._special
    seq = [min(n + special, chosen.max_seq_length) for n in lengths]
    total_flops = sum(flops_of_text(n, dims) for n in seq)
    mean_len = sum(seq) / len(seq)
    say(f"{len(docs)} scifact documents -> {len(texts)} chunks, {mean_len:.0f} tokens with specials on average")

    # 1. ceilings at the model's shapes
    shapes = gemm_shapes(CEILING_TOKENS, dims)
    ceilings: list[dict[str, Any]] = []
    plan = [
        ("numpy", 1, "f32", ""),
        ("numpy", 2, "f32", ""),
        ("numpy", 2, "f32", "Haswell"),
        ("numpy", 2, "f32", "SkylakeX"),
        ("openvino", 2, "f32", ""),
        ("openvino", 2, "bf16", ""),
        ("openvino", 1, "int8", ""),
        ("openvino", 2, "int8", ""),
        ("openvino", 2, "f32", "AVX2"),
        ("openvino", 2, "int8", "AVX2"),
    ]
    for engine, threads, precision, isa_env in plan:
        say(f"GEMM ceiling: {engine} {precision}, {threads} thread(s), ISA {isa_env or 'native'}")
        ceilings.append(measure_ceiling(engine, threads, shapes, precision, isa_env))
    # the fp32 ceiling is the fastest fp32 GEMM measured on both cores, whichever library and kernel gave it
    fp32_ceiling = max(
        (
            c
            for c in ceilings
            if c["precision"] == "f32" and c["threads"] == 2 and c["isa_env"] in ("native", "SkylakeX")
        ),
        key=lambda c: c["gflops"],
    )
    fp32_ceiling_avx2 = next(c for c in ceilings if c["engine"] == "numpy" and c["isa_env"] == "Haswell")
    int8_ceiling = next(
        c
        for c in ceilings
        if c["engine"] == "openvino" and c["precision"] == "int8" and c["threads"] == 2 and c["isa_env"] == "native"
    )

    # 2. each backend on the same chunks
    results: list[dict[str, Any]] = []
    for name in ("torch", "openvino", "openvino-int8", "onnx-int8"):
        say(f"backend {name}")
        emb = chosen if name == chosen.quality["backend"] else _embedder(name, force_backend=True)
        sec = _timed_encode(emb, texts, lengths, rounds=1 if name == "torch" else 2)
        gflops = total_flops / sec / 1e9
        streams = getattr(emb.backend, "streams", 1)
        pad = padded_tokens(emb, lengths, emb.batch_token_budget, streams)
        results.append(
            {
                "backend": name,
                "label": emb.backend_label,
                "auto": name == chosen.quality["backend"],
                "chunks_per_second": len(texts) / sec,
                "tokens_per_second": sum(seq) / sec,
                "gflops": gflops,
                "fraction_fp32_ceiling": gflops / fp32_ceiling["gflops"],
                "fraction_int8_ceiling": gflops / int8_ceiling["gflops"],
                "padding": 1 - sum(seq) / pad,
                "mean_cosine": emb.quality.get("mean_cosine"),
            }
        )
        if emb is not chosen:
            emb.close()
            del emb

    # 3. where the chosen backend's time goes
    say("per-operator profile of the chosen backend")
    profile = operator_profile(chosen, texts, lengths)

    # 4. layout experiments on the chosen backend, side by side
    trials: list[dict[str, Any]] = []
    if experiments:
        trials = layout_experiments(chosen, texts, lengths, total_flops, fp32_ceiling["gflops"])
    load_after = os.getloadavg()
    data = {
        "isa": cpu_isa(),
        "cpu_flags": machine["cpu_flags"],
        "dims": dims,
        "chunks": len(texts),
        "mean_tokens": mean_len,
        "flops_per_token": total_flops / sum(seq),
        "ceiling_tokens": CEILING_TOKENS,
        "ceilings": ceilings,
        "fp32_ceiling_gflops": fp32_ceiling["gflops"],
        "fp32_ceiling_source": f"{fp32_ceiling['engine']} {fp32_ceiling['isa_env']}",
        "fp32_ceiling_avx2_gflops": fp32_ceiling_avx2["gflops"],
        "int8_ceiling_gflops": int8_ceiling["gflops"],
        "backends": results,
        "profile": profile,
        "experiments": trials,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    if write:
        _write(data, machine, dims)
    return data


def layout_experiments(
    chosen: Any, texts: list[str], lengths: list[int], total_flops: float, ceiling: float, rounds: int = 2
) -> list[dict[str, Any]]:
    """Stream/thread layouts, pinning, token budgets and length sorting, each on the same chunks, in turns."""
    from pipeline.backends import OpenVinoBackend

    base = chosen.backend
    variants: list[tuple[str, dict[str, Any], int]] = [
        ("2 streams x 1 thread (today's ingest layout), budget 16384", {}, 16384),
        ("2 streams x 1 thread, pinned to cores", {"overrides": {"ENABLE_CPU_PINNING": True}}, 16384),
        (
            "1 stream x 2 threads (latency hint)",
            {"overrides": {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}},
            16384,
        ),
        ("attention not fused (SNIPPETS_MODE=DISABLE)", {"overrides": {"SNIPPETS_MODE": "DISABLE"}}, 16384),
        (
            "bf16 for the ops int8 leaves (precision hint bf16)",
            {"overrides": {"INFERENCE_PRECISION_HINT": "bf16"}},
            16384,
        ),
        ("2 streams x 1 thread, budget 4096", {}, 4096),
        ("2 streams x 1 thread, budget 8192", {}, 8192),
        ("2 streams x 1 thread, budget 32768", {}, 32768),
    ]
    backends: dict[str, Any] = {}
    for _label, opts, _ in variants:
        key = json.dumps(opts, sort_keys=True)
        if key not in backends:
            backends[key] = OpenVinoBackend(
                base.xml_path,
                base.tokenizer,
                base.max_seq_length,
                base.pooling,
                chosen._threads,
                base.label,
                latency=opts.get("latency", False),
                overrides=opts.get("overrides"),
            )
    times: dict[str, list[float]] = defaultdict(list)
    cosines: dict[str, float] = {}
    reference: np.ndarray | None = None
    saved_backend, saved_budget = chosen.backend, chosen.batch_token_budget
    try:
        for round_ in range(rounds):  # in turns, so a change in the machine's load hits every variant alike
            # each round starts one variant later, so no variant always runs first (or last) in a round
            shift = round_ % len(variants)
            for label, opts, budget in variants[shift:] + variants[:shift]:
                say(f"  experiment round {round_ + 1}: {label}")
                chosen.backend = backends[json.dumps(opts, sort_keys=True)]
                chosen.batch_token_budget = budget
                times[label].append(_timed_encode(chosen, texts, lengths, rounds=1))
                if label not in cosines:
                    vecs = chosen.encode_sync(texts, lengths)
                    reference = vecs if reference is None else reference
                    cosines[label] = float((vecs * reference).sum(axis=1).mean())
            # arrival order, no length sorting: one batch of 32 texts at a time (what bucketing saves)
            label = "no length bucketing: batches of 32 in arrival order"
            say(f"  experiment round {round_ + 1}: {label}")
            chosen.backend, chosen.batch_token_budget = saved_backend, saved_budget
            started = time.perf_counter()
            batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]
            saved_backend.encode_batches(batches)
            times[label].append(time.perf_counter() - started)
    finally:
        chosen.backend, chosen.batch_token_budget = saved_backend, saved_budget
    out = []
    for label, secs in times.items():
        best = float(np.median(secs))  # the median round: one lucky round on a shared machine is not a win
        out.append(
            {
                "variant": label,
                "seconds": secs,
                "chunks_per_second": len(texts) / best,
                "gflops": total_flops / best / 1e9,
                "fraction_fp32_ceiling": total_flops / best / 1e9 / ceiling,
                "mean_cosine_to_default": cosines.get(label),
            }
        )
    return out


def experiments_run(docs_n: int, rounds: int) -> None:
    """Only the layout experiments, more rounds in rotated order: results/layout_experiments.md."""
    offline()
    from benchmarks.ingest_throughput import chunk_texts

    machine = machine_info()
    before = os.getloadavg()
    chosen = _embedder("auto")
    dims = model_dims(chosen.model)
    texts, lengths = chunk_texts(chosen, load_corpus(docs_n))
    seq = [min(n + chosen._special, chosen.max_seq_length) for n in lengths]
    flops = sum(flops_of_text(n, dims) for n in seq)
    roof = json.loads((RESULTS / "roofline.json").read_text()) if (RESULTS / "roofline.json").is_file() else {}
    ceiling = float(roof.get("fp32_ceiling_gflops", 1.0))
    trials = layout_experiments(chosen, texts, lengths, flops, ceiling, rounds=rounds)
    rows = [
        [
            t["variant"],
            ", ".join(f"{s:.2f}" for s in t["seconds"]),
            f"{t['chunks_per_second']:.1f}",
            f"{t['chunks_per_second'] / trials[0]['chunks_per_second']:.2f}x",
            "-" if t["mean_cosine_to_default"] is None else f"{t['mean_cosine_to_default']:.4f}",
        ]
        for t in trials
    ]
    body = table(
        ["variant (chosen backend, same chunks)", "seconds per round", "median chunks/s", "vs today's layout",
         "mean cosine to today's layout"],
        rows,
    )  # fmt: skip
    method = (
        f"{len(texts)} scifact chunks, {rounds} rounds; each round runs every variant once, starting one variant "
        "later than the round before; the median round is reported. Load average before / after: "
        + ", ".join(f"{x:.2f}" for x in before)
        + " / "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + " (2 cores shared with other engineers' runs)."
    )
    write_results(
        "layout_experiments",
        title="Layout experiments on the chosen backend: streams, pinning, budgets, bucketing, precision",
        sections=[("Variants, in rotated turns", body), ("Method", method)],
        data={"experiments": trials, "rounds": rounds, "chunks": len(texts)},
        machine=machine,
    )


def _write(data: dict[str, Any], machine: dict[str, Any], dims: dict[str, int]) -> None:
    (RESULTS / "roofline.json").write_text(json.dumps({"machine": machine, **data}, indent=2, default=str) + "\n")
    ceiling_rows = [
        [
            c["engine"],
            c["precision"],
            c["threads"],
            c["isa_env"],
            *[f"{r['gflops']:.0f}" for r in c["rows"]],
            f"{c['gflops']:.0f}",
            "; ".join(sorted({k for r in c["rows"] for k in r.get("kernels", [])}))
            or ", ".join(f"{k['internal_api']} {k['architecture']} x{k['num_threads']}" for k in c.get("kernels", [])),
        ]
        for c in data["ceilings"]
    ]
    shape_names = [r["shape"] for r in data["ceilings"][0]["rows"]]
    ceilings = table(
        ["engine", "precision", "threads", "ISA cap", *shape_names, "layer mix GFLOP/s", "kernels that ran"],
        ceiling_rows,
    )
    backend_rows = [
        [
            r["label"] + (" (auto)" if r["auto"] else ""),
            f"{r['chunks_per_second']:.1f}",
            f"{r['tokens_per_second']:,.0f}",
            f"{r['gflops']:.0f}",
            f"{r['fraction_fp32_ceiling']:.0%}",
            f"{r['fraction_int8_ceiling']:.0%}",
            f"{r['padding']:.1%}",
            "-" if r["mean_cosine"] is None else f"{r['mean_cosine']:.4f}",
        ]
        for r in data["backends"]
    ]
    backends = table(
        [
            "backend",
            "chunks/s",
            "tokens/s",
            "achieved GFLOP/s",
            "of fp32 ceiling (best fp32 GEMM, 2 threads)",
            "of int8 ceiling (OpenVINO, 2 threads)",
            "padding",
            "mean cosine to fp32",
        ],
        backend_rows,
    )
    trials = (
        table(
            [
                "variant (chosen backend, same chunks)",
                "seconds per round",
                "median chunks/s",
                "GFLOP/s",
                "of fp32 ceiling",
                "mean cosine to today's layout",
            ],
            [
                [
                    t["variant"],
                    ", ".join(f"{s:.2f}" for s in t["seconds"]),
                    f"{t['chunks_per_second']:.1f}",
                    f"{t['gflops']:.0f}",
                    f"{t['fraction_fp32_ceiling']:.0%}",
                    "-" if t["mean_cosine_to_default"] is None else f"{t['mean_cosine_to_default']:.4f}",
                ]
                for t in data["experiments"]
            ],
        )
        if data["experiments"]
        else "not run"
    )
    isa = (
        f"This run: `{data['isa']}` ({data['cpu_flags']}). The CPU has AVX-512F, AVX512_VNNI and AVX512_BF16; the "
        "issue was written for an AVX2-only machine. The `ISA cap` rows show the AVX2-only picture on this CPU: "
        "`OPENBLAS_CORETYPE=Haswell` for numpy's OpenBLAS, `ONEDNN_MAX_CPU_ISA=AVX2` for OpenVINO's oneDNN; the "
        "`kernels that ran` column is what OpenVINO's profiler reported, so it shows whether the cap was honoured."
    )
    method = (
        f"{data['chunks']} scifact chunks ({data['mean_tokens']:.0f} tokens on average with specials), the same "
        f"chunks as `ingest_throughput` makes. {formula(dims)} That is {data['flops_per_token'] / 1e6:.1f} MFLOP "
        f"per token on these chunks. Ceiling: the three projection shapes of one layer at {data['ceiling_tokens']} "
        "rows (one ingest batch), each timed best of 5, combined in the proportion the model calls them "
        "(4 d x d, 1 d x f, 1 f x d per layer): `layer mix GFLOP/s` = FLOPs of one layer / its time. The int8 "
        "ceiling is a single MatMul with FakeQuantize on activations (per tensor) and weights (per channel), the "
        "pattern NNCF writes, compiled by OpenVINO's CPU plugin; the kernel name proves it ran in int8. Achieved "
        "GFLOP/s = FLOPs of the chunks (formula above, real tokens) / seconds of `Embedder.encode_sync` over all "
        "of them (best of 2, after a warm-up). Padding = share of computed tokens that were padding under the "
        "embedder's batching. Load average before / after: "
        + ", ".join(f"{x:.2f}" for x in data["load_average_before"])
        + " / "
        + ", ".join(f"{x:.2f}" for x in data["load_average_after"])
        + " (2 cores shared with other engineers' runs)."
    )
    write_results(
        "roofline",
        title="Embedding at the CPU's roofline: GEMM ceilings and each backend's share of them",
        sections=[
            ("Instruction set", isa),
            ("GEMM ceilings at the model's shapes (GFLOP/s)", ceilings),
            ("Backends on the same chunks", backends),
            ("Layout experiments on the chosen backend (two rounds, in turns)", trials),
            ("Method", method),
        ],
        data={k: v for k, v in data.items() if k != "profile"},
        machine=machine,
    )
    p = data["profile"]
    wall = p["wall_seconds"]
    # the counters' sum differs from the request's wall time (they overlap, and count preemption on a loaded
    # machine): each category gets its share of the counters, applied to the model's wall time
    scale = p["model_seconds"] / p["operators_seconds"] if p["operators_seconds"] else 0.0
    rows = [
        [name, f"{sec * scale * 1e3 / p['batches']:.1f}", f"{sec * scale / wall:.1%}"]
        for name, sec in p["per_category"].items()
        if sec * scale * 1e3 / p["batches"] >= 0.05
    ]
    for name, sec in (
        ("the model (OpenVINO request), all of the above", p["model_seconds"]),
        ("tokenization (fast tokenizer, padding to the batch's longest)", p["tokenize_seconds"]),
        ("pooling, normalization and Python", p["pool_seconds"]),
        ("total per batch", wall),
    ):
        rows.append([name, f"{sec * 1e3 / p['batches']:.1f}", f"{sec / wall:.1%}"])
    cats = table(["where (per batch)", "ms", "share of the batch's wall time"], rows)
    nodes = table(
        ["OpenVINO node type", "ms per batch", "nodes", "kernels (exec type)"],
        [
            [k, f"{v['seconds'] * 1e3 / p['batches']:.2f}", v["nodes"], ", ".join(v["exec_types"])]
            for k, v in p["per_node_type"].items()
        ],
    )
    pmethod = (
        f"The chosen backend's compiled model with `PERF_COUNT`, one request on {p['threads_per_request']} "
        f"thread(s) (the per-stream share of the ingest layout), on {p['batches']} real token-budget batches of "
        f"scifact chunks ({p['texts']} texts, {p['real_tokens']} real tokens, {p['padded_tokens']} computed: "
        f"padding {1 - p['real_tokens'] / p['padded_tokens']:.1%}). Operators by OpenVINO's `get_profiling_info` "
        f"(real time), their sum ({p['operators_seconds']:.2f} s) rescaled to the requests' wall time "
        f"({p['model_seconds']:.2f} s); GELU and biases fused into a GEMM appear as that GEMM. "
        "Tokenization and pooling timed "
        "around the request in Python. Categories group node types; the second table has every node type."
    )
    write_results(
        "operator_profile",
        title="Where the chosen backend's time goes: per-operator profile on real batches",
        sections=[
            ("Per batch, by category", cats),
            ("Per node type", nodes),
            ("Method", pmethod),
        ],
        data=p,
        machine=machine,
    )


# --- the pipeline around the model (point 4) ------------------------------------------------------------------

#: the worker's Python threads by name prefix; every other thread is native (OpenVINO's streams, tokenizers, ...)
_THREAD_GROUPS = (
    ("MainThread", "event loop (faust, aiokafka, decode, chunking, plan, payloads)"),
    ("embed-query", "query lane"),
    ("embed", "embedding thread (tokenize, start requests, pool)"),
    ("edge-", "Qdrant Edge calls (upserts, registry)"),
    ("health", "metrics HTTP"),
)


class ThreadCpu:
    """CPU seconds of every thread of a process, sampled from /proc; Python names from one ``py-spy dump``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.names: dict[str, str] = {}

    def sample(self) -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[task.name] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def learn_names(self) -> None:
        import re
        import shutil

        if not shutil.which("py-spy"):
            return
        dump = subprocess.run(["py-spy", "dump", "--pid", str(self.pid)], capture_output=True, text=True).stdout
        self.names = {m.group(1): m.group(2) for m in re.finditer(r'Thread (\d+) \([^)]*\): "([^"]+)"', dump)}

    def group(self, tid: str) -> str:
        name = self.names.get(tid)
        if name is None:
            return "native threads (OpenVINO streams, tokenizers, Qdrant Edge, ...)"
        for prefix, label in _THREAD_GROUPS:
            if name.startswith(prefix):
                return label
        return f"other Python threads ({name})"


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipeline_run(docs_n: int = 800, variants: tuple[str, ...] = ("1", "2", "1", "2"), write: bool = True) -> dict:
    """The embedder alone and the real worker end to end (Kafka -> worker -> Qdrant Edge) on the same chunks,
    alternating ``ingest.batches_in_flight`` values, with wall time and CPU seconds (the worker's per thread
    group, the broker's, and the embedder's alone): on a shared machine the CPU seconds per chunk say what the
    pipeline costs the cores even when the wall time moves with other people's load."""
    import asyncio
    import shutil
    import tempfile
    import threading

    from benchmarks import ingest_throughput as it
    from tests.support.apache_kafka import ApacheKafka

    offline()
    machine = machine_info()
    emb = _embedder("auto")
    docs = load_corpus(docs_n)
    texts, lengths = it.chunk_texts(emb, docs)
    scratch = Path(tempfile.mkdtemp(prefix="vectorstream-roofline-e2e-"))
    broker = ApacheKafka(quiet=True)
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    original_start = it.start_worker
    try:
        broker.start()
        broker_pid = _broker_pid(broker)
        for i, value in enumerate(variants):
            say(f"embedder alone ({i + 1}/{len(variants)})")
            emb.encode_sync(texts[:64], lengths[:64])
            cpu0, wall0 = time.process_time(), time.perf_counter()
            emb.encode_sync(texts, lengths)
            alone_wall, alone_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            samples: list[tuple[float, dict[str, float], float]] = []
            meters: list[ThreadCpu] = []
            calls: list[tuple[float, float]] = []  # (when, events processed) as the benchmark polled them

            def start_worker(*a: Any, samples: list[Any] = samples, meters: list[ThreadCpu] = meters, **k: Any) -> Any:
                worker = original_start(*a, **k)
                meter = ThreadCpu(worker.proc.pid)
                meters.append(meter)

                def watch(samples: list[Any] = samples) -> None:
                    while worker.proc.poll() is None:
                        snap = meter.sample()
                        if snap:
                            samples.append((time.perf_counter(), snap, _safe_cpu(broker_pid)))
                        if len(samples) % 20 == 10:  # threads start lazily (the embedding thread on first use)
                            meter.learn_names()
                        time.sleep(0.25)

                counted = worker.events

                def events(polls: list[Any] = calls) -> float:  # noqa: B023 - bound here, per run
                    n = counted()
                    polls.append((time.perf_counter(), n))
                    return n

                worker.events = events

                threading.Thread(target=watch, daemon=True).start()
                return worker

            it.start_worker = start_worker
            say(f"end to end with ingest.batches_in_flight={value}")
            measured, detail = it.measure_end_to_end(
                broker.bootstrap_servers,
                docs,
                scratch / f"e2e-{i}",
                len(texts),
                {"VECTORSTREAM_INGEST__BATCHES_IN_FLIGHT": value},
            )
            it.start_worker = original_start
            # the run ends at the poll that saw every event processed, and began ``seconds`` before it
            ended = next(t for t, n in calls if n >= max(n for _, n in calls))
            window = [s for s in samples if ended - measured.seconds - 0.3 <= s[0] <= ended + 0.3]
            groups: dict[str, float] = defaultdict(float)
            broker_cpu = 0.0
            if len(window) >= 2:
                first, last = window[0], window[-1]
                for tid, sec in last[1].items():
                    groups[meters[0].group(tid)] += sec - first[1].get(tid, 0.0)
                broker_cpu = last[2] - first[2]
            rows.append(
                {
                    "batches_in_flight": int(value),
                    "alone_chunks_per_second": len(texts) / alone_wall,
                    "alone_cpu_ms_per_chunk": alone_cpu / len(texts) * 1e3,
                    "e2e_chunks_per_second": measured.rate,
                    "e2e_vs_alone": measured.rate / (len(texts) / alone_wall),
                    "worker_cpu_ms_per_chunk": sum(groups.values()) / len(texts) * 1e3,
                    "broker_cpu_ms_per_chunk": broker_cpu / len(texts) * 1e3,
                    "worker_cpu_by_group_seconds": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
                    "worker_seconds": measured.seconds,
                    "worker_embed_seconds": detail["worker_embed_seconds"],
                    "worker_upsert_seconds": detail["worker_upsert_seconds"],
                    "worker_batches": detail["worker_batches"],
                    "load_average": os.getloadavg(),
                }
            )
            say(f"  alone {rows[-1]['alone_chunks_per_second']:.1f}, end to end {measured.rate:.1f} chunks/s")
    finally:
        it.start_worker = original_start
        broker.close()
        shutil.rmtree(scratch, ignore_errors=True)
        asyncio.set_event_loop(None)
    data = {"chunks": len(texts), "docs": len(docs), "rows": rows, "load_before": load_before}
    if write:
        _write_pipeline(data, machine)
    return data


def _broker_pid(broker: Any) -> int | None:
    proc = getattr(broker, "proc", None) or getattr(broker, "_proc", None) or getattr(broker, "process", None)
    return getattr(proc, "pid", None)


def _safe_cpu(pid: int | None) -> float:
    try:
        return _process_cpu(pid) if pid else 0.0
    except OSError:
        return 0.0


def _write_pipeline(data: dict[str, Any], machine: dict[str, Any]) -> None:
    rows = data["rows"]
    main = table(
        [
            "run (in order)",
            "embedder alone chunks/s",
            "end to end chunks/s",
            "end to end / alone",
            "alone CPU ms/chunk",
            "worker CPU ms/chunk",
            "broker CPU ms/chunk",
            "worker CPU / alone CPU",
            "load (1 min)",
        ],
        [
            [
                f"{i + 1}: batches_in_flight={r['batches_in_flight']}",
                f"{r['alone_chunks_per_second']:.1f}",
                f"{r['e2e_chunks_per_second']:.1f}",
                f"{r['e2e_vs_alone']:.2f}x",
                f"{r['alone_cpu_ms_per_chunk']:.1f}",
                f"{r['worker_cpu_ms_per_chunk']:.1f}",
                f"{r['broker_cpu_ms_per_chunk']:.1f}",
                f"{r['worker_cpu_ms_per_chunk'] / r['alone_cpu_ms_per_chunk']:.2f}x",
                f"{r['load_average'][0]:.1f}",
            ]
            for i, r in enumerate(rows)
        ],
    )
    groups = sorted({g for r in rows for g in r["worker_cpu_by_group_seconds"]})
    by_group = table(
        ["worker thread group (CPU seconds during the run)", *[f"run {i + 1}" for i in range(len(rows))]],
        [[g, *[f"{r['worker_cpu_by_group_seconds'].get(g, 0.0):.2f}" for r in rows]] for g in groups]
        + [["wall seconds of the run", *[f"{r['worker_seconds']:.1f}" for r in rows]]],
    )
    method = (
        f"{data['docs']} scifact abstracts -> {data['chunks']} chunks, as `ingest_throughput` makes them; the "
        "end-to-end runs use that benchmark's own functions (a real Apache Kafka broker, a real worker process "
        "on Qdrant Edge, wall time from the first event published until the worker's metrics counted every "
        "event). Before each end-to-end run the embedder alone (`Embedder.encode_sync`, this process) embeds the "
        "same chunks, so each pair shares the machine's load. CPU seconds: utime + stime from /proc of the "
        "worker's threads (grouped by their Python names from `py-spy dump`; unnamed ones are native) and of the "
        "broker, and `time.process_time()` of the embedder alone. Load average before the first run: "
        + ", ".join(f"{x:.2f}" for x in data["load_before"])
        + " (2 cores, shared with other engineers' runs)."
    )
    write_results(
        "pipeline_overhead",
        title="The pipeline around the model: end to end vs the embedder alone, wall and CPU",
        sections=[("Runs, alternating", main), ("Where the worker's CPU went", by_group), ("Method", method)],
        data=data,
        machine=machine,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__)
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS, help="scifact documents (default %(default)s)")
    parser.add_argument("--no-experiments", action="store_true", help="skip the layout experiments")
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="instead: the embedder alone vs the worker end to end (batches_in_flight 1 and 2, alternating)",
    )
    parser.add_argument("--variants", default="1,2,1,2", help="--pipeline: batches_in_flight per run, in order")
    parser.add_argument(
        "--experiments-only", type=int, metavar="ROUNDS", help="instead: only the layout experiments, ROUNDS rounds"
    )
    args = parser.parse_args(argv)
    if args.experiments_only:
        experiments_run(args.docs, args.experiments_only)
    elif args.pipeline:
        pipeline_run(800 if args.docs == DEFAULT_DOCS else args.docs, tuple(args.variants.split(",")))
    else:
        run(args.docs, experiments=not args.no_experiments)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
