"""Every embedding backend on the same scifact chunks: chunks per second and mean cosine to PyTorch fp32.

The default backend in pipeline/settings.py is picked from this table (fastest one that passes the guard).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks.common import load_corpus, machine_info, offline, say, table, write_results

DEFAULT_DOCS = 200


def run(docs_n: int = DEFAULT_DOCS, backends: tuple[str, ...] | None = None, write: bool = True) -> dict[str, Any]:
    offline()
    from benchmarks.ingest_throughput import chunk_texts
    from pipeline.backends import BACKENDS
    from pipeline.embedding import Embedder
    from pipeline.settings import Settings

    base = Settings(_env_file=None)
    machine = machine_info()
    docs = load_corpus(docs_n)
    names = backends or BACKENDS
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    texts: list[str] = []
    lengths: list[int] = []
    for name in ("torch", *[n for n in names if n != "torch"]):
        settings = base.model_copy(
            update={"model": base.model.model_copy(update={"backend": name, "force_backend": True})}
        )
        say(f"backend {name}: loading (exports on first use)")
        started = time.perf_counter()
        try:
            emb = Embedder(settings)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot load here is a row, not a crash
            say(f"backend {name} unavailable: {exc}")
            rows.append({"backend": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        load_seconds = time.perf_counter() - started
        if not texts:
            texts, lengths = chunk_texts(emb, docs)
            say(f"{len(docs)} scifact documents -> {len(texts)} chunks")
        emb.encode_sync(texts[:32], lengths[:32])
        started = time.perf_counter()
        vecs = emb.encode_sync(texts, lengths)
        seconds = time.perf_counter() - started
        if reference is None:
            reference = vecs
        cos = (vecs * reference).sum(axis=1)
        row = {
            "backend": name,
            "label": emb.backend_label,
            "chunks_per_second": len(texts) / seconds,
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "guard_mean_cosine": float(emb.quality["mean_cosine"]),
            "load_seconds": load_seconds,
            "export_seconds": emb.quality.get("export_seconds"),
        }
        say(f"backend {name}: {row['chunks_per_second']:.1f} chunks/s, mean cosine {row['mean_cosine']:.4f}")
        rows.append(row)
        emb.close()
        del emb

    torch_rate = next(r["chunks_per_second"] for r in rows if r["backend"] == "torch")
    threshold = base.model.min_mean_cosine
    body = table(
        [
            "backend",
            "chunks/s",
            "vs torch",
            "mean cosine (scifact)",
            "min cosine",
            "guard (calibration)",
            "passes guard",
            "first load s",
        ],
        [
            [
                r.get("label", r["backend"]),
                round(r["chunks_per_second"], 1),
                f"{r['chunks_per_second'] / torch_rate:.2f}x",
                round(r["mean_cosine"], 4),
                round(r["min_cosine"], 4),
                round(r["guard_mean_cosine"], 4),
                "yes" if r["guard_mean_cosine"] >= threshold else "no",
                round(r["load_seconds"], 1),
            ]
            if "error" not in r
            else [r["backend"], "-", "-", "-", "-", "-", r["error"], "-"]
            for r in rows
        ],
    )
    ok = [r for r in rows if "error" not in r and r["guard_mean_cosine"] >= threshold]
    best = max(ok, key=lambda r: r["chunks_per_second"])
    print(body)
    print(f"\nfastest backend passing the guard (mean cosine >= {threshold}): {best['backend']}")
    data = {
        "docs": len(docs),
        "chunks": len(texts),
        "rows": rows,
        "fastest_passing": best["backend"],
        "default_backend": base.model.backend,
    }
    if write:
        method = (
            f"{len(docs)} scifact abstracts -> {len(texts)} chunks ({sum(lengths) / max(1, len(lengths)):.0f} tokens "
            "on average); each backend runs `Embedder.encode_sync` over all of them (token-budget batches, "
            "threads = cores). Mean cosine: against the PyTorch fp32 vectors of the same chunks. Guard: mean cosine "
            f"on the project's calibration texts (pipeline/calibration.py), threshold {threshold}. "
            "First load includes the export when the cache was cold (then cached under ~/.cache/vectorstream)."
        )
        from pipeline.backends import auto_backend, cpu_isa

        default = base.model.backend
        if default == "auto":
            default = f"auto, which is {auto_backend()} on this CPU ({cpu_isa()})"
        summary = f"Fastest backend that passes the guard: **{best['backend']}**. Default in settings: **{default}**."
        path = write_results(
            "embedding_backends",
            title="Embedding backends side by side",
            sections=[("Results", body), ("Choice", summary), ("Method", method)],
            data=data,
            machine=machine,
        )
        say(f"wrote {path}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS)
    parser.add_argument("--backends", help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    run(args.docs, tuple(args.backends.split(",")) if args.backends else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
