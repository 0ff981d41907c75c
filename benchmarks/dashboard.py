"""``python -m benchmarks.dashboard``: a real worker ingests scifact and answers queries while a real Prometheus
scrapes it; every panel of the Grafana dashboard is then plotted from its own PromQL into docs/dashboard.png.

The Prometheus harness, the dashboard and alert readers and the workload here are also used by
tests/integration/test_prometheus.py, so the picture and the test evaluate exactly the same expressions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import DATASETS, ROOT, machine_info, say

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "vectorstream.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
INSTALL_SCRIPT = ROOT / "deploy" / "prometheus" / "install.sh"
OUTPUT = ROOT / "docs" / "dashboard.png"
#: metric names that only a process serving queries moves
QUERY_METRICS = re.compile(r"vectorstream_(query|queries|recall)_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what the dashboard and the alert rules ask -------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str
    unit: str
    grid: Mapping[str, int]
    targets: tuple[Target, ...]
    decimals: int | None = None


def dashboard_panels(path: Path = DASHBOARD) -> list[Panel]:
    """Every panel with queries, in the dashboard's order (panels of collapsed rows included)."""

    def walk(items: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        for item in items:
            yield item
            yield from walk(item.get("panels", ()))

    out = []
    for p in walk(json.loads(path.read_text())["panels"]):
        targets = tuple(
            Target(t["expr"], t.get("legendFormat", ""), bool(t.get("instant")))
            for t in p.get("targets", ())
            if t.get("expr")
        )
        if targets:
            defaults = p.get("fieldConfig", {}).get("defaults", {})
            out.append(
                Panel(
                    p["title"],
                    p["type"],
                    defaults.get("unit", "short"),
                    p["gridPos"],
                    targets,
                    defaults.get("decimals"),
                )
            )
    return out


def grafana_expr(expr: str, *, rate_interval: str) -> str:
    """An expression as Grafana sends it with every instance selected."""
    return expr.replace("$__rate_interval", rate_interval).replace("${instance}", ".*").replace("$instance", ".*")


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    for_: str
    severity: str


def alert_rules(path: Path = ALERTS) -> list[AlertRule]:
    import yaml

    doc = yaml.safe_load(path.read_text())
    return [
        AlertRule(r["alert"], " ".join(r["expr"].split()), r.get("for", "0s"), r.get("labels", {}).get("severity", ""))
        for group in doc["groups"]
        for r in group["rules"]
        if "alert" in r
    ]


_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def with_bool_comparisons(expr: str) -> str:
    """``expr`` with every comparison turned into a ``bool`` one, so that it returns its signal (0 or 1 per
    series) instead of filtering it away: an alert that is not firing still shows it reads real series.
    Label matchers (``{...}``), ranges (``[...]``) and strings are left alone."""
    out: list[str] = []
    depth, quote, i = 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < len(expr):
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = ""
            i += 1
            continue
        if c in "\"'`":
            quote = c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        elif depth == 0 and (m := _COMPARISON.match(expr, i)):
            op = m.group(0)
            rest = expr[i + len(op) :]
            out.append(op)
            i += len(op)
            if not re.match(r"\s*bool\b", rest):
                out.append(" bool")
            continue
        out.append(c)
        i += 1
    return "".join(out)


# --- a real Prometheus --------------------------------------------------------------------------------------


def ensure_prometheus(*, install: bool) -> tuple[str, str] | None:
    """Paths of ``prometheus`` and ``promtool``; runs deploy/prometheus/install.sh first when ``install``."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if (not found[0] or not found[1]) and install:
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True)
        found = shutil.which("prometheus"), shutil.which("promtool")
    return (found[0], found[1]) if found[0] and found[1] else None


def scrape_config(targets: Mapping[str, Sequence[str]], *, self_port: int, interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its service discovery replaced by ``targets`` (job -> host:port),
    its intervals shortened and its rule files made absolute: same jobs, same rules, same labels."""
    import yaml

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    config["rule_files"] = [str((PROMETHEUS_CONFIG.parent / f).resolve()) for f in config.get("rule_files", [])]
    jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name == "prometheus":
            hosts: Sequence[str] = [f"127.0.0.1:{self_port}"]
        elif name in targets:
            hosts = targets[name]
        else:
            continue
        job = {k: v for k, v in job.items() if not k.endswith("_sd_configs")}
        job["static_configs"] = [{"targets": list(hosts)}]
        jobs.append(job)
    unknown = set(targets) - {j["job_name"] for j in jobs}
    if unknown:
        raise ValueError(f"no such job in {PROMETHEUS_CONFIG}: {sorted(unknown)}")
    config["scrape_configs"] = jobs
    return config


class Prometheus:
    """A Prometheus server on a free localhost port with a generated config, and its HTTP API."""

    def __init__(
        self, binary: str, workdir: Path, targets: Mapping[str, Sequence[str]], *, interval: str = "1s"
    ) -> None:
        import yaml

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.config_path.write_text(yaml.safe_dump(scrape_config(targets, self_port=self.port, interval=interval)))
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Prometheus:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return "(no log)"

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; returns the result list (vector) or a one-element list (scalar)."""
        data = self.api("query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:.3f}")["result"]

    def value(self, expr: str) -> float:
        """The sum of an instant query's values (0 when it returns nothing)."""
        return sum(float(r["value"][1]) for r in self.query(expr))

    def wait_for(self, expr: str, predicate: Any, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.value(expr)
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr} is {value} after {timeout}s")
            time.sleep(0.5)


# --- the workload ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    id: str
    title: str
    text: str


def scifact(name: str, limit: int | None = None) -> list[Text]:
    """scifact's corpus (``corpus``) or questions (``queries``), in file order; synthetic text if not present."""
    path = DATASETS / "scifact" / f"{name}.jsonl"
    out: list[Text] = []
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                out.append(Text(str(row["_id"]), row.get("title") or "", row.get("text") or ""))
                if limit is not None and len(out) >= limit:
                    break
        return out
    say(f"{path} not found: using synthetic text")
    rng = random.Random(7)
    words = "cell protein gene immune tumour signal receptor dose trial cohort risk brain".split()
    for i in range(limit or 100):
        body = " ".join(rng.choice(words) for _ in range(40 if name == "corpus" else 8))
        out.append(Text(str(i), f"Synthetic {i}", body))
    return out


#: records every producer gets wrong sooner or later, each with its dead-letter reason
BAD_RECORDS: list[tuple[bytes | None, bytes | None]] = [
    (b"scifact/bad-1", b"{not json"),
    (b"scifact/bad-2", b"[1, 2, 3]"),
    (b"scifact/bad-3", b'{"type": "upsert", "tenant_id": "scifact", "doc_id": "bad-3", "version": 1}'),
    (b"scifact/bad-4", b'{"type": "upsert", "tenant_id": "scifact", "doc_id": "bad-4", "version": 1, "text": ""}'),
    (b"scifact/bad-5", b"\xff\xfe not utf-8"),
]


def upsert(tenant: str, doc: Text, version: int = 1) -> Any:
    from schemas.events import DocumentUpsert

    return DocumentUpsert(
        type="upsert",
        tenant_id=tenant,
        doc_id=doc.id,
        version=version,
        title=doc.title[:500],
        text=doc.text or doc.title,
        metadata={"source": "scifact"},
        access={"public": True},
    )


def delete(tenant: str, doc: Text, version: int) -> Any:
    from schemas.events import DocumentDelete

    return DocumentDelete(type="delete", tenant_id=tenant, doc_id=doc.id, version=version)


@dataclass
class QueryTraffic:
    """Query requests on the wire contract (schemas/queries.py) and their replies, with plain aiokafka."""

    bootstrap: str
    queries_topic: str
    #: the prefix of the per-tenant reply topics (kafka.replies_topic): replies come on "<prefix>.<tenant>"
    replies_prefix: str
    tenant: str
    token: str
    _pending: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    replies: int = 0

    @property
    def reply_topic(self) -> str:
        from schemas.queries import reply_topic_for

        return reply_topic_for(self.replies_prefix, self.tenant)

    async def __aenter__(self) -> QueryTraffic:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from pipeline.kafka import create_topics

        await create_topics(self.bootstrap, {self.reply_topic: 1})  # the worker never creates a reply topic
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2)
        self._consumer = AIOKafkaConsumer(
            self.reply_topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await self._producer.start()
        await self._consumer.start()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._consumer.stop()
        await self._producer.stop()

    async def _read(self) -> None:
        from schemas.queries import query_reply_adapter

        async for msg in self._consumer:
            reply = query_reply_adapter.validate_json(msg.value)
            self.replies += 1
            future = self._pending.pop(reply.request_id, None)
            if future is not None and not future.done():
                future.set_result(reply)

    async def ask(
        self, text: str, *, top_k: int = 10, token: str | None = None, wait: float = 30, exact: bool = False
    ) -> Any:
        """Send one request; returns its reply, or None when none came within ``wait`` seconds."""
        from schemas.queries import QueryRequest

        request = QueryRequest(
            request_id=uuid.uuid4().hex,
            tenant_id=self.tenant,
            token=self.token if token is None else token,
            query=text[:1000],
            top_k=top_k,
            reply_topic=self.reply_topic,
            with_text=False,
            search={"exact": True} if exact else None,
            deadline_ms=int((time.time() + wait) * 1000),
        )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        await self._producer.send_and_wait(
            self.queries_topic, request.model_dump_json().encode(), key=request.request_id.encode()
        )
        try:
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            return None
        finally:
            self._pending.pop(request.request_id, None)


@dataclass(frozen=True)
class Topics:
    documents: str
    dead_letters: str
    queries: str
    replies: str

    @classmethod
    def unique(cls, prefix: str) -> Topics:
        salt = uuid.uuid4().hex[:8]
        return cls(
            f"{prefix}.{salt}.documents",
            f"{prefix}.{salt}.documents.dlq",
            f"{prefix}.{salt}.queries",
            f"{prefix}.{salt}.replies",
        )

    def env(self) -> dict[str, str]:
        return {
            "VECTORSTREAM_KAFKA__DOCUMENTS_TOPIC": self.documents,
            "VECTORSTREAM_KAFKA__DEAD_LETTER_TOPIC": self.dead_letters,
            "VECTORSTREAM_KAFKA__QUERIES_TOPIC": self.queries,
            "VECTORSTREAM_KAFKA__REPLIES_TOPIC": self.replies,
        }

    async def create(self, bootstrap: str, partitions: int) -> None:
        from pipeline.kafka import create_topics

        await create_topics(
            bootstrap,
            {
                self.documents: partitions,
                self.dead_letters: partitions,
                self.queries: partitions,
                self.replies: partitions,
            },
        )


def dev_token(tenant: str) -> str:
    """A token for ``tenant`` signed with the settings the worker reads (the dev secret unless configured: the
    dashboard's worker runs in query.dev_mode)."""
    from pipeline.auth import mint_token
    from pipeline.settings import Settings

    query = Settings().query.model_copy(update={"dev_mode": True})
    return mint_token(query, tenant=tenant, user="dashboard", ttl_seconds=3600)


# --- the picture -----------------------------------------------------------------------------------------

_UNITS = {"s": "seconds", "ops": "per second", "reqps": "per second", "percentunit": "", "short": ""}


def _legend(fmt: str, labels: Mapping[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    return text or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"


def _fmt(value: float, unit: str, decimals: int | None = None) -> str:
    if math.isnan(value):
        return "n/a"
    if decimals is not None and unit == "short":
        return f"{value:,.{decimals}f}"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
    if unit == "percentunit":
        return f"{value * 100:.1f} %"
    if unit in ("ops", "reqps"):
        return f"{value:.1f}/s"
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.2f}"


def render(
    prom: Prometheus,
    panels: Sequence[Panel],
    *,
    start: float,
    end: float,
    step: float,
    rate_interval: str,
    out: Path,
    subtitle: str,
) -> list[tuple[str, str, str]]:
    """Plot every panel over [start, end] on Grafana's 24-column grid; returns (panel, series, last value) rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    # Grafana's layout: x and w in 24 columns, y and h in rows; stats are 4 high, graphs 8
    ys = sorted({p.grid["y"] for p in panels})
    offsets, unit_rows = {}, 0
    for y in ys:
        offsets[y] = unit_rows
        unit_rows += max(p.grid["h"] for p in panels if p.grid["y"] == y) // 4
    fig = plt.figure(figsize=(24, unit_rows * 2.1))
    grid = GridSpec(unit_rows, 6, figure=fig, hspace=1.0, wspace=0.28, top=1 - 1.6 / (unit_rows * 2.1), bottom=0.02)
    rows: list[tuple[str, str, str]] = []
    for panel in panels:
        r0, c0 = offsets[panel.grid["y"]], panel.grid["x"] // 4
        ax = fig.add_subplot(grid[r0 : r0 + panel.grid["h"] // 4, c0 : c0 + panel.grid["w"] // 4])
        ax.set_title(panel.title, fontsize=11, loc="left", fontweight="bold")
        if panel.kind == "table":
            lines = []
            for target in panel.targets:
                for series in prom.query(grafana_expr(target.expr, rate_interval=rate_interval), at=end):
                    labels = {k: v for k, v in series["metric"].items() if k != "__name__"}
                    lines.append("  ".join(f"{k}={v}" for k, v in sorted(labels.items())))
            ax.axis("off")
            ax.text(
                0,
                0.9,
                "\n".join(lines) or "no data",
                va="top",
                fontsize=9,
                family="monospace",
                transform=ax.transAxes,
                wrap=True,
            )
            rows.append((panel.title, "labels", "; ".join(lines)))
            continue
        last_values = []
        for target in panel.targets:
            result = prom.query_range(grafana_expr(target.expr, rate_interval=rate_interval), start, end, step)
            for series in sorted(result, key=lambda s: _legend(target.legend, s["metric"])):
                xs = [float(t) - start for t, _ in series["values"]]
                vals = [float(v) for _, v in series["values"]]
                if panel.unit == "percentunit":
                    vals = [v * 100 for v in vals]
                label = _legend(target.legend, series["metric"])
                flat = all(v == 0 or math.isnan(v) for v in vals)
                if panel.kind == "timeseries" and flat and len(result) > 3:
                    continue  # Grafana's "hide zero series": a legend of 14 flat dead-letter reasons says nothing
                ax.plot(xs, vals, label=label, linewidth=1.3)
                finite = [v for v in series["values"] if not math.isnan(float(v[1]))]
                last = float(finite[-1][1]) if finite else float("nan")
                last_values.append(last)
                rows.append((panel.title, label, _fmt(last, panel.unit)))
        ax.set_xlim(0, end - start)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("seconds since start", fontsize=8)
        if _UNITS.get(panel.unit):
            ax.set_ylabel(_UNITS[panel.unit], fontsize=8)
        if panel.unit == "percentunit":
            ax.set_ylabel("%", fontsize=8)
        if panel.kind == "stat":
            shown = [v for v in last_values if not math.isnan(v)]
            text = _fmt(shown[-1], panel.unit, panel.decimals) if shown else "n/a"
            ax.text(0.97, 0.9, text, transform=ax.transAxes, ha="right", va="top", fontsize=18, fontweight="bold")
        elif ax.lines:
            ax.legend(fontsize=7, loc="upper left", ncol=2 if len(ax.lines) > 4 else 1, framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "all zero", transform=ax.transAxes, ha="center", va="center", color="grey")
    fig.suptitle(
        f"vectorstream dashboard (deploy/grafana/dashboards/vectorstream.json)\n{subtitle}", fontsize=14, y=0.995
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70, bbox_inches="tight")
    plt.close(fig)
    return rows


# --- the command -----------------------------------------------------------------------------------------


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}; see {log}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout}s; see {log}")


async def _run_workload(args: argparse.Namespace, bootstrap: str, topics: Topics, prom: Prometheus) -> int:
    from pipeline.client import DocumentPublisher

    tenant = "scifact"
    corpus = scifact("corpus", args.docs)
    questions = [q.text for q in scifact("queries")]
    rng = random.Random(11)
    served = 0
    async with (
        DocumentPublisher(bootstrap, topics.documents) as publisher,
        QueryTraffic(bootstrap, topics.queries, topics.replies, tenant, dev_token(tenant)) as traffic,
    ):
        # 1. a first tenth, then probe whether this worker answers queries at all
        first = corpus[: len(corpus) // 10]
        await publisher.publish_many(upsert(tenant, d) for d in first)
        say(f"published {len(first)} documents; asking a first question")
        serves_queries = await traffic.ask(questions[0], wait=args.probe_seconds) is not None
        if not serves_queries:
            say("no reply: this worker has no query agent, query panels will stay empty")

        async def queries(until: asyncio.Event) -> None:
            nonlocal served
            while serves_queries and not until.is_set():
                bad = rng.random() < 0.03
                reply = await traffic.ask(
                    rng.choice(questions), token="not-a-token" if bad else None, top_k=rng.choice((5, 10, 20)), wait=10
                )
                served += reply is not None
                await asyncio.sleep(rng.expovariate(args.qps))

        stop = asyncio.Event()
        querying = asyncio.create_task(queries(stop))
        # 2. a steady stream of documents with a burst in the middle, a few bad records along the way
        rest = corpus[len(first) :]
        burst_at = len(rest) // 2
        i = 0
        while i < len(rest):
            if i == burst_at:
                say(f"burst of {args.burst} documents")
                await publisher.publish_many(upsert(tenant, d) for d in rest[i : i + args.burst])
                i += args.burst
                continue
            await publisher.publish(upsert(tenant, rest[i]))
            if rng.random() < 0.02:
                await publisher.send_raw(*BAD_RECORDS[rng.randrange(len(BAD_RECORDS))])
            i += 1
            if i % 100 == 0:
                await publisher.flush()
                say(
                    f"published {len(first) + i}/{len(corpus)} documents, {served} queries answered, "
                    f"{prom.value('sum(vectorstream_events_total)'):.0f} events processed"
                )
            await asyncio.sleep(1 / args.rate)
        # 3. producers re-sending unchanged documents (their chunks reuse stored vectors), then deletes
        again = rng.sample(corpus, min(len(corpus), args.docs // 5))
        await publisher.publish_many(upsert(tenant, d, version=2) for d in again)
        await publisher.publish_many(delete(tenant, d, version=3) for d in again[:20])
        await publisher.flush()
        say(f"re-published {len(again)} unchanged documents and deleted 20")
        expected = len(corpus) + len(again) + 20
        prom.wait_for("sum(vectorstream_events_total)", lambda v: v >= expected, timeout=600)
        await asyncio.sleep(args.tail_seconds)
        stop.set()
        await querying
    return served


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description=__doc__)
    parser.add_argument("--docs", type=int, default=600, help="scifact abstracts to ingest (default %(default)s)")
    parser.add_argument("--rate", type=float, default=8, help="steady documents per second (default %(default)s)")
    parser.add_argument("--burst", type=int, default=150, help="documents published at once mid-run")
    parser.add_argument("--qps", type=float, default=2, help="mean queries per second (default %(default)s)")
    parser.add_argument("--recall-sample-rate", type=float, default=0.25)
    parser.add_argument("--rate-interval", default="15s", help="what $__rate_interval becomes in the plots")
    parser.add_argument("--tail-seconds", type=float, default=20, help="keep watching after the last event")
    parser.add_argument("--probe-seconds", type=float, default=20)
    parser.add_argument("--broker", choices=("apache", "tansu"), default="apache")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tools = ensure_prometheus(install=os.environ.get("CI", "").lower() in {"1", "true", "yes"})
    if tools is None:
        raise SystemExit(f"prometheus and promtool are needed: run {INSTALL_SCRIPT.relative_to(ROOT)}")
    from pipeline.embedded_broker import Tansu
    from tests.support.apache_kafka import ApacheKafka

    work = Path(tempfile.mkdtemp(prefix="vectorstream-dashboard-"))
    metrics_port = free_port()
    broker = ApacheKafka() if args.broker == "apache" else Tansu()
    say(f"starting {args.broker} broker (scratch in {work})")
    worker: subprocess.Popen[bytes] | None = None
    try:
        with broker:
            bootstrap = broker.bootstrap_servers
            topics = Topics.unique("dashboard")
            asyncio.run(topics.create(bootstrap, 4))
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                **topics.env(),
                "VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "VECTORSTREAM_KAFKA__GROUP_ID": f"dashboard-{uuid.uuid4().hex[:8]}",
                "VECTORSTREAM_STORE__PATH": str(work / "qdrant-edge"),
                "VECTORSTREAM_METRICS__PORT": str(metrics_port),
                "VECTORSTREAM_METRICS__HOST": "127.0.0.1",
                "VECTORSTREAM_QUERY__RECALL_SAMPLE_RATE": str(args.recall_sample_rate),
                "VECTORSTREAM_QUERY__DEV_MODE": "true",  # tokens signed with the development secret
                "APP_DATADIR": str(work / "faust"),  # faust's table folder, else <group>-data in the repo
            }
            with Prometheus(tools[0], work, {"vectorstream-ingest": [f"127.0.0.1:{metrics_port}"]}) as prom:
                log = work / "worker.log"
                with open(log, "ab") as fh:
                    worker = subprocess.Popen(
                        [sys.executable, "-m", "agents.cli", "worker"],
                        env=env,
                        cwd=ROOT,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                    )
                _wait_http(f"http://127.0.0.1:{metrics_port}/readyz", worker, log, 180)
                start = time.time()
                say(f"worker ready, Prometheus on {prom.url}; ingesting {args.docs} scifact abstracts")
                served = asyncio.run(_run_workload(args, bootstrap, topics, prom))
                end = time.time()
                worker.send_signal(signal.SIGTERM)
                worker.wait(60)
                say(f"run took {end - start:.0f}s, {served} queries answered; plotting")
                info = machine_info()
                machine = f"{info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, commit {info['commit']}"
                subtitle = (
                    f"{args.docs} scifact abstracts + {args.docs // 5} unchanged re-sends, {served} queries, "
                    f"{args.broker} Kafka, Qdrant Edge — {time.strftime('%Y-%m-%d')}, {machine}"
                )
                rows = render(
                    prom,
                    dashboard_panels(),
                    start=start,
                    end=end,
                    step=max(1.0, (end - start) / 300),
                    rate_interval=args.rate_interval,
                    out=args.out,
                    subtitle=subtitle,
                )
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"| {'panel'.ljust(width)} | series | last value |\n|{'-' * (width + 2)}|--------|------------|")
    for title, series, value in rows:
        print(f"| {title.ljust(width)} | {series} | {value} |")
    say(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
