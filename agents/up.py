"""``vectorstream up``: a local vectorstream to point other terminals at, until Ctrl-C.

Starts Tansu (the embedded, memory-only Kafka-compatible broker) where the settings' bootstrap servers point
(``127.0.0.1:9092`` unless ``VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS`` says otherwise) and a worker on Qdrant Edge
with its metrics endpoint (``settings.metrics.port``, 9464), then prints how to publish and ask.

Why a fixed, well-known port rather than a state file: the defaults of every command (``publish``, ``query``,
``ask``, ``check``) and of the Python client (``DocumentPublisher("127.0.0.1:9092", ...)``) already name it, as
do Kafka tools, so a second terminal needs no settings and nothing has to read a file that could be stale.
When the port is taken, ``up`` says so and how to pick another (the same variable in both terminals).

What a memory-only broker means for a restart: Tansu keeps nothing, so after a restart the topics are empty
and the consumer group has no committed offsets; the worker starts at the (empty) beginning and nothing is
replayed twice. The index and the document registry (versions) persist in ``<data-dir>/qdrant-edge``, so a
restart serves the same index at once, and versions keep moving forward. What the broker loses is what was
published and not yet indexed: so the first Ctrl-C waits until the worker has committed every published
event (a second Ctrl-C stops at once), and ``publish`` re-sends unchanged documents at their versions (a no-op
for the worker when it has them), so publishing again after a lost event repairs the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pipeline.settings import Settings

#: the tenant of ``up``'s readiness probe (a query that finds nothing, to see the whole query path answer)
PROBE_TENANT = "vectorstream-up-probe"


class UpError(RuntimeError):
    """``up`` cannot start; the message says what to do."""


def _local_address(settings: Settings) -> tuple[str, int]:
    servers = [s.strip() for s in settings.kafka.bootstrap_servers.split(",") if s.strip()]
    host, _, port = servers[0].rpartition(":") if len(servers) == 1 else ("", "", "")
    if host not in {"127.0.0.1", "localhost", "::1", "[::1]"} or not port.isdigit():
        raise UpError(
            f"`up` runs a local broker, but kafka.bootstrap_servers is {settings.kafka.bootstrap_servers!r}: "
            "unset VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS, or set it to 127.0.0.1:PORT"
        )
    return ("127.0.0.1" if host == "localhost" else host.strip("[]")), int(port)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # as the servers bind: a port in TIME_WAIT after the last `up` stopped is free to them
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def worker_env(settings: Settings, data: Path, metrics_port: int) -> dict[str, str]:
    """The worker's environment: the caller's, plus the local broker, Qdrant Edge under ``data`` and short
    group sessions (Tansu holds a group join for about half the session timeout)."""
    return {
        **os.environ,
        "VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "VECTORSTREAM_KAFKA__SESSION_TIMEOUT_SECONDS": "3",
        "VECTORSTREAM_KAFKA__HEARTBEAT_INTERVAL_SECONDS": "1",
        "VECTORSTREAM_STORE__BACKEND": "edge",
        "VECTORSTREAM_STORE__PATH": str(data / "qdrant-edge"),
        "VECTORSTREAM_DATA_DIR": str(data),
        "VECTORSTREAM_METRICS__PORT": str(metrics_port),
        "VECTORSTREAM_METRICS__HOST": "127.0.0.1",
        # `up` is a development mode: its worker accepts tokens signed with the development HS256 secret,
        # which `ask`, `query` and `token` mint when no secret or key is configured
        "VECTORSTREAM_QUERY__DEV_MODE": "true",
    }


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: SIGTERM the worker when `up` dies without stopping it (killed), so no worker outlives it."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _metrics(port: int) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


async def _probe(settings: Settings, timeout: float) -> float:  # noqa: ASYNC109 - a deadline for the probe
    """Ask one question of an empty tenant and return the worker's time: the query path answers end to end."""
    from agents.commands import dev_token, query_client

    token = dev_token(settings, tenant=PROBE_TENANT, user="up", groups=[])
    async with query_client(settings, tenant=PROBE_TENANT, token=token, startup_timeout=timeout) as client:
        result = await client.ask("is anyone there?", top_k=1, timeout=timeout)
    return result.took_ms


async def _pending_events(settings: Settings) -> int | None:
    """Events of the documents topic the worker's group has not committed yet (None: cannot tell)."""
    from aiokafka import TopicPartition

    from pipeline.kafka import consumer as kafka_consumer

    k = settings.kafka
    consumer = kafka_consumer(k, group_id=k.group_id, enable_auto_commit=False)
    try:
        async with asyncio.timeout(10):
            await consumer.start()
            parts = consumer.partitions_for_topic(k.documents_topic)
            if parts is None:
                await consumer._client.force_metadata_update()  # noqa: SLF001 - a topic created after start
                parts = consumer.partitions_for_topic(k.documents_topic) or set()
            tps = [TopicPartition(k.documents_topic, p) for p in sorted(parts)]
            if not tps:
                return 0
            ends = await consumer.end_offsets(tps)
            pending = 0
            for tp in tps:
                pending += max(ends[tp] - (await consumer.committed(tp) or 0), 0)
            return pending
    except Exception:  # noqa: BLE001 - the answer is "unknown", and stopping goes on
        return None
    finally:
        await consumer.stop()


def _chunks_at_start(log_path: Path) -> int | None:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(r"store edge ready: .*?(\d+) chunks", text)
    return int(found[-1]) if found else None


def run_up(*, data_dir: str, tenant: str, verbose: bool = False) -> int:
    """Run until SIGINT/SIGTERM; 0 after a clean stop, 1 when the worker or broker died, 2 when it cannot start."""
    from pipeline.embedded_broker import BrokerStartError, BrokerUnavailable, Tansu

    settings = Settings()
    try:
        host, port = _local_address(settings)
        if not _port_free(host, port):
            raise UpError(
                f"{host}:{port} is in use: is `vectorstream up` (or a Kafka) already running? Stop it, or pick "
                f"another port with VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:PORT here and in the other "
                "terminals"
            )
        metrics_port = settings.metrics.port
        if metrics_port and not _port_free("127.0.0.1", metrics_port):
            raise UpError(f"the metrics port {metrics_port} is in use: set VECTORSTREAM_METRICS__PORT to a free one")
    except UpError as exc:
        print(f"vectorstream up: {exc}", file=sys.stderr)
        return 2

    data = Path(data_dir).expanduser().resolve()
    data.mkdir(parents=True, exist_ok=True)
    stop_requests: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requests.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    broker = Tansu(host=host, port=port, data_dir=data / "broker", quiet=True)
    worker: subprocess.Popen[bytes] | None = None
    log_path = data / "worker.log"
    try:
        try:
            broker.start()
        except (BrokerUnavailable, BrokerStartError) as exc:
            print(f"vectorstream up: the broker did not start: {exc}", file=sys.stderr)
            return 2
        print(f"broker:  {broker.label} on {broker.bootstrap_servers} (log {broker.log_path})", flush=True)
        with open(log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} vectorstream up =====\n".encode())
            log.flush()
            worker = subprocess.Popen(
                [sys.executable, "-m", "agents.cli", "worker"],
                env=worker_env(settings, data, metrics_port),
                stdin=subprocess.DEVNULL,
                stdout=None if verbose else log,
                stderr=subprocess.STDOUT if not verbose else None,
                # the terminal's Ctrl-C reaches `up` only: it stops the worker before the broker, in order
                process_group=0,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
            )
        print(f"worker:  pid {worker.pid}, Qdrant Edge at {data / 'qdrant-edge'} (log {log_path})", flush=True)
        code = _serve(settings, broker, worker, log_path, metrics_port, tenant, stop_requests)
        return code
    finally:
        if worker is not None and worker.poll() is None:
            print("stopping the worker ...", flush=True)
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print("the worker did not stop in 60 s: killing it", flush=True)
                worker.kill()
                worker.wait()
        if broker.running:
            print("stopping the broker ...", flush=True)
        broker.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        print("stopped.", flush=True)


def _serve(
    settings: Settings,
    broker: object,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    metrics_port: int,
    tenant: str,
    stop_requests: list[int],
) -> int:
    from pipeline.client import QueryFailed

    def died() -> str | None:
        if worker.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:]) if log_path.exists() else ""
            return f"the worker exited with code {worker.returncode}; last lines of {log_path}:\n{tail}"
        if not getattr(broker, "running", True):
            return f"the broker exited; see {getattr(broker, 'log_path', '')}"
        return None

    # 1. the worker loads its model and store, creates the topics, joins its group: wait for an answer
    started = time.monotonic()
    print("starting: loading the model and the index ...", flush=True)
    while metrics_port and not _ready(metrics_port):
        if (why := died()) is not None:
            print(why, file=sys.stderr)
            return 1
        if stop_requests:
            return 0
        time.sleep(0.3)
    took_ms: float | None = None
    while took_ms is None:
        if (why := died()) is not None:
            print(why, file=sys.stderr)
            return 1
        if stop_requests:
            return 0
        try:
            took_ms = asyncio.run(_probe(settings, timeout=10))
        except QueryFailed as exc:
            print(f"the worker refused the probe query: {exc}", file=sys.stderr)
            return 1
        except Exception:  # noqa: BLE001 - not answering yet (topics being created, group joining): retry
            time.sleep(0.5)
    chunks = _chunks_at_start(log_path)
    k = settings.kafka
    here = (
        ""
        if k.bootstrap_servers == type(k)().bootstrap_servers
        else f"VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS={k.bootstrap_servers} "
    )
    print(
        f"\nvectorstream is up in {time.monotonic() - started:.0f} s: Kafka on {k.bootstrap_servers} "
        f"(documents topic {k.documents_topic!r}),\n"
        + (f"{chunks} chunks in the index, " if chunks is not None else "")
        + f"a query answered in {took_ms:.1f} ms"
        + (f"\nmetrics on http://127.0.0.1:{metrics_port}/metrics" if metrics_port else "")
    )
    print(
        "\nIn another terminal:\n"
        f"  {here}vectorstream publish ~/my-notes --tenant {tenant}     "
        "# Markdown, text, reStructuredText, HTML; or events in JSONL\n"
        f"  {here}vectorstream ask --tenant {tenant}                    # questions in, hits out\n"
        f'  {here}vectorstream query "your question" --tenant {tenant}\n'
        "From Python:\n"
        f'  DocumentPublisher("{k.bootstrap_servers}", "{k.documents_topic}")  and\n'
        f'  QueryClient("{k.bootstrap_servers}", tenant=..., token=...)  (pipeline.client), with a token from\n'
        "  `vectorstream token --tenant ... --user ...` (the development secret: this worker runs in dev mode)\n"
        "Ctrl-C stops (after the worker has indexed what was published).\n",
        flush=True,
    )

    # 2. serve: report ingest as it happens, until asked to stop
    last_events = (_metrics(metrics_port) or {}).get("vectorstream_events_total", 0.0) if metrics_port else 0.0
    while not stop_requests:
        if (why := died()) is not None:
            print(why, file=sys.stderr)
            return 1
        time.sleep(1.0)
        m = _metrics(metrics_port) if metrics_port else None
        if m is not None and m.get("vectorstream_events_total", 0.0) > last_events:
            now = m["vectorstream_events_total"]
            print(
                f"{time.strftime('%H:%M:%S')} ingested {now - last_events:.0f} events ({now:.0f} since start; "
                f"{m.get('vectorstream_chunks_embedded_total', 0):.0f} chunks embedded, "
                f"{m.get('vectorstream_chunks_reused_total', 0):.0f} reused, "
                f"{m.get('vectorstream_dead_letters_total', 0):.0f} dead letters)",
                flush=True,
            )
            last_events = now

    # 3. a first Ctrl-C: let the worker finish what was published (the broker forgets it when it stops)
    print("\nstopping: waiting for the worker to index what was published (Ctrl-C again to stop now) ...", flush=True)
    asked = len(stop_requests)
    deadline = time.monotonic() + 120
    while True:
        pending = asyncio.run(_pending_events(settings))
        if not pending:  # 0, or unknown
            return 0
        if len(stop_requests) > asked or time.monotonic() > deadline or died() is not None:
            print(f"  stopping with {pending} events not indexed: publish them again after the next `up`", flush=True)
            return 0
        print(f"  {pending} events not yet indexed ...", flush=True)
        time.sleep(1.0)
