"""What every benchmark shares: the machine description, the scifact corpus, tables and results files.

Results go to benchmarks/results/<name>.md (a table people read) and <name>.json (the same rows, for tools).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: the labelled datasets live next to the repository and are never copied into it
DATASETS = Path(os.environ.get("VECTORSTREAM_DATASETS", ROOT.parent / "shared" / "datasets"))
#: scratch space of benchmark runs (git-ignored)
CACHE = ROOT / "benchmarks" / ".cache"


def offline() -> None:
    """The packaged model is local: make sure nothing in a benchmark asks a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def say(message: str) -> None:
    """Progress on stderr, so stdout keeps only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the machine ------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in {"sse4_2", "fma"})
    except OSError:
        pass
    return []


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001 - not installed is an answer too
        return "not installed"


def machine_info() -> dict[str, Any]:
    import subprocess

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        commit = "unknown"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "cpu_flags": " ".join(_cpu_flags()),
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "sentence_transformers": _version("sentence_transformers"),
        "onnxruntime": _version("onnxruntime"),
        "openvino": _version("openvino"),
        "qdrant_edge": _edge_version(),
        "commit": commit,
    }


def _edge_version() -> str:
    try:
        from importlib.metadata import version

        return version("qdrant-edge-py")
    except Exception:  # noqa: BLE001
        return "not installed"


# --- the corpus -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str


def scifact_dir() -> Path:
    path = DATASETS / "scifact"
    if not (path / "corpus.jsonl").is_file():
        raise SystemExit(f"scifact not found at {path}: set VECTORSTREAM_DATASETS to the datasets folder")
    return path


def load_corpus(limit: int | None = None) -> list[Doc]:
    """scifact's abstracts in file order (``limit`` takes the first ones)."""
    docs: list[Doc] = []
    with open(scifact_dir() / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            docs.append(Doc(str(row["_id"]), row.get("title") or "", row.get("text") or ""))
            if limit is not None and len(docs) >= limit:
                break
    return docs


def load_queries() -> dict[str, str]:
    out: dict[str, str] = {}
    with open(scifact_dir() / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            out[str(row["_id"])] = row["text"]
    return out


def load_qrels() -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with open(scifact_dir() / "qrels_test.tsv", encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            qid, did, score = line.rstrip("\n").split("\t")
            out.setdefault(qid, {})[did] = int(score)
    return out


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- output -----------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text on a terminal)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def machine_table(info: dict[str, Any]) -> str:
    return table(["machine", ""], [[k, v] for k, v in info.items()])


def write_results(
    name: str,
    *,
    title: str,
    sections: Sequence[tuple[str, str]],
    data: dict[str, Any],
    machine: dict[str, Any] | None = None,
) -> Path:
    """Write results/<name>.md (``sections``: heading and Markdown body) and results/<name>.json (``data``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine or machine_info()
    parts = [f"# {title}", "", f"Written by `python -m benchmarks` ({name}); re-run it to refresh.", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    parts += ["## Machine", "", machine_table(machine), ""]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(parts))
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine, **data}, indent=2, default=str) + "\n")
    return md


def peak_rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process from /proc, in bytes; zeros where /proc is missing."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm
