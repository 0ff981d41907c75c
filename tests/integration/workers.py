"""A real ``vectorstream worker`` process for integration tests: start, watch its metrics, stop or kill it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    def __init__(
        self,
        *,
        bootstrap: str,
        store_path: Path,
        topic: str,
        dlq: str,
        group: str,
        log_path: Path,
        extra_env: dict[str, str] | None = None,
        module: str = "agents.cli",
        cwd: Path | None = None,
    ) -> None:
        #: the source tree the worker runs from (``python -m`` imports from it): this one, or another checkout
        self.cwd = cwd or ROOT
        #: ``python -m <module> worker``: the product's command, or a test-side entry point around it
        self.module = module
        self.metrics_port = free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            "PYTHONPATH": str(self.cwd),
            "VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "VECTORSTREAM_KAFKA__DOCUMENTS_TOPIC": topic,
            "VECTORSTREAM_KAFKA__DEAD_LETTER_TOPIC": dlq,
            "VECTORSTREAM_KAFKA__GROUP_ID": group,
            "VECTORSTREAM_KAFKA__PARTITIONS": "3",
            "VECTORSTREAM_STORE__PATH": str(store_path),
            "VECTORSTREAM_METRICS__PORT": str(self.metrics_port),
            "VECTORSTREAM_METRICS__HOST": "127.0.0.1",
            "VECTORSTREAM_INGEST__MAX_BATCH_WAIT_SECONDS": "0.2",
            "VECTORSTREAM_KAFKA__SESSION_TIMEOUT_SECONDS": "3",
            "VECTORSTREAM_KAFKA__HEARTBEAT_INTERVAL_SECONDS": "1",
            # tests mint tokens with the development secret unless they configure keys of their own
            "VECTORSTREAM_QUERY__DEV_MODE": "true",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it
        log.write(f"\n===== start {time.strftime('%X')} =====\n")
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
        )
        log.close()
        return self

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def metrics(self) -> dict[str, float] | None:
        """Sample name with labels -> value, or None while the endpoint is not up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def events(self, outcome: str | None = None) -> float:
        m = self.metrics() or {}
        return sum(
            v
            for k, v in m.items()
            if k.startswith("vectorstream_events_total") and (outcome is None or f"outcome={outcome}" in k)
        )

    def wait_for(self, predicate, timeout: float = 180, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode} while waiting for {what}:\n{self.log_tail()}"
                )
            if predicate():
                return
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.log_tail()}")

    def wait_events(self, n: float, timeout: float = 180) -> None:
        self.wait_for(lambda: self.events() >= n, timeout, f"{n} events processed")

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"worker ignored SIGTERM for {timeout}s:\n{self.log_tail()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
