"""The worker, the Python client and the CLI on a secured Apache Kafka: ingest and query end to end over
SASL_SSL (SCRAM-SHA-512) and over mutual TLS, and a worker that refuses to start, in seconds and with one line
naming the setting, on a wrong password, an unknown CA or a plaintext client pointed at a TLS listener.

The broker (``ApacheKafka(secured=True)``) has a PLAINTEXT listener beside the two TLS ones; nothing here
uses it, except the harness's own readiness check.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from pipeline.auth import mint_token
from pipeline.client import DocumentPublisher, QueryClient, read_records
from pipeline.kafka import KafkaConnectError, check_connection
from pipeline.settings import KafkaSettings, QuerySettings
from schemas.dead_letter import DEAD_LETTER_HEADERS
from schemas.events import DocumentUpsert
from tests.integration.conftest import _session_broker
from tests.integration.workers import ROOT, WorkerProcess
from tests.support.apache_kafka import ApacheKafka

pytestmark = pytest.mark.integration

SECRET = "secured-kafka-test-secret-0123456789abcdef"
AUTH = QuerySettings(hs256_secret=SECRET)

DOCS = [
    ("acme", "pw", "Resetting your password", "Open the account settings, choose 'Forgot password', follow the link."),
    ("acme", "vpn", "VPN setup", "Install the VPN client, import the company profile and sign in."),
    ("globex", "pw", "Globex passwords", "Globex staff reset passwords at the Globex help desk."),
]


@pytest.fixture(scope="module")
def secured_kafka() -> Iterator[ApacheKafka]:
    yield from _session_broker(ApacheKafka(secured=True))


def _worker(tmp: Path, k: KafkaSettings, run: str, **extra: str) -> WorkerProcess:
    return WorkerProcess(
        bootstrap=k.bootstrap_servers,
        store_path=tmp / "edge",
        topic=f"docs-{run}",
        dlq=f"docs-{run}.dlq",
        group=f"g-{run}",
        log_path=tmp / "worker.log",
        extra_env={
            **ApacheKafka.worker_env(k),
            "VECTORSTREAM_KAFKA__QUERIES_TOPIC": f"queries-{run}",
            "VECTORSTREAM_KAFKA__REPLIES_TOPIC": f"replies-{run}",
            "VECTORSTREAM_QUERY__HS256_SECRET": SECRET,
            **extra,
        },
    )


@pytest.mark.parametrize("listener", ["sasl_ssl", "mtls"])
async def test_ingest_and_query_end_to_end(secured_kafka, tmp_path, listener):
    """Everything a deployment does goes over the secured listener: topic creation, the faust agents, the
    dead-letter producer, the query replies, the publisher, the query client and reading a topic back."""
    k = secured_kafka.client_settings(listener)
    run = f"{listener}-{uuid.uuid4().hex[:8]}"
    worker = _worker(tmp_path, k, run).start()
    try:
        await asyncio.to_thread(worker.wait_for, lambda: worker.metrics() is not None, 180, "the worker's /metrics")
        async with DocumentPublisher(k, f"docs-{run}") as pub:
            await pub.publish_many(
                DocumentUpsert(
                    type="upsert", tenant_id=t, doc_id=d, version=1, title=title, text=text, access={"public": True}
                )
                for t, d, title, text in DOCS
            )
            await pub.send_raw(b"acme/broken", b"{not json")  # a dead letter, produced by faust's producer
            await pub.flush()
        await asyncio.to_thread(worker.wait_events, len(DOCS) + 1, 240)

        token = mint_token(AUTH, tenant="acme", user="alice", groups=[])
        async with QueryClient(
            k, queries_topic=f"queries-{run}", replies_topic=f"replies-{run}", tenant="acme", token=token
        ) as client:
            result = await client.ask("how do I reset my password", top_k=2, timeout=60)
        assert [h.doc_id for h in result.hits][0] == "pw"
        assert {h.doc_id for h in result.hits} <= {"pw", "vpn"}  # never globex's document

        dead = await read_records(k, f"docs-{run}.dlq", timeout=60)
        assert [r.key for r in dead] == [b"acme/broken"]
        assert dict(dead[0].headers)[DEAD_LETTER_HEADERS["reason"]] == b"invalid_json"
        assert len(await read_records(k, f"docs-{run}", timeout=60)) == len(DOCS) + 1
    finally:
        code = await asyncio.to_thread(worker.terminate)
    assert code == 0, worker.log_tail()
    log = worker.log_path.read_text()
    assert secured_kafka.scram_password not in log  # the password never reaches a log line


def _refused(tmp: Path, k: KafkaSettings) -> tuple[int, list[str], str]:
    """Run ``vectorstream worker`` with ``k`` until it exits; its exit code, its ERROR lines and its whole log."""
    worker = _worker(tmp, k, uuid.uuid4().hex[:8])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agents.cli", "worker"],
            env=worker.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,  # a bound for a hang, not a timing assertion
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the worker kept running with bad Kafka settings:\n{exc.stderr}") from None
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if " ERROR " in line]
    return done.returncode, errors, output


def _bad_settings(broker: ApacheKafka, case: str) -> KafkaSettings:
    if case == "wrong password":
        return broker.client_settings("sasl_ssl", sasl_password=SecretStr("not-the-password"))
    if case == "unknown CA":
        return broker.client_settings("sasl_ssl", ssl_ca_file=broker.pki.other_ca_file)
    assert case == "plaintext client on a TLS listener"
    return KafkaSettings(bootstrap_servers=broker.sasl_ssl_bootstrap)


FAIL_FAST = {
    "wrong password": ("kafka.sasl_password", "refused the SASL SCRAM-SHA-512 login"),
    "unknown CA": ("kafka.ssl_ca_file", "is not trusted"),
    "plaintext client on a TLS listener": ("kafka.security_protocol", "is a TLS listener"),
}


@pytest.mark.parametrize("case", list(FAIL_FAST))
def test_the_worker_refuses_to_start_with_one_line_naming_the_setting(secured_kafka, tmp_path, case):
    setting, reason = FAIL_FAST[case]
    code, errors, output = _refused(tmp_path, _bad_settings(secured_kafka, case))
    assert code == 2, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert "refusing to start: cannot connect to Kafka" in errors[0]
    assert setting in errors[0] and reason in errors[0], errors[0]
    assert "Traceback" not in output
    assert "not-the-password" not in output and secured_kafka.scram_password not in output
    # it stopped before loading the model or opening the store
    assert not (tmp_path / "edge").exists()


@pytest.mark.parametrize(
    ("case", "setting"),
    [
        ("no client certificate on the mTLS listener", "kafka.ssl_cert_file"),
        ("TLS client on the plaintext listener", "kafka.security_protocol"),
        ("SCRAM-SHA-256 with the wrong password", "kafka.sasl_password"),
    ],
)
async def test_check_connection_names_the_setting(secured_kafka, case, setting):
    b = secured_kafka
    k = {
        "no client certificate on the mTLS listener": lambda: b.client_settings(
            "mtls", ssl_cert_file=None, ssl_key_file=None
        ),
        "TLS client on the plaintext listener": lambda: b.client_settings(
            "mtls", bootstrap_servers=b.bootstrap_servers
        ),
        "SCRAM-SHA-256 with the wrong password": lambda: b.client_settings(
            "sasl_ssl", sasl_mechanism="SCRAM-SHA-256", sasl_password=SecretStr("wrong")
        ),
    }[case]()
    with pytest.raises(KafkaConnectError, match=setting.replace(".", r"\.")):
        await check_connection(k)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_every_sasl_mechanism_logs_in(secured_kafka, mechanism):
    k = secured_kafka.client_settings("sasl_ssl", sasl_mechanism=mechanism)
    await check_connection(k)
    topic = f"mech-{mechanism.lower()}-{uuid.uuid4().hex[:6]}"
    from pipeline.kafka import create_topics

    await create_topics(k, {topic: 1})
    async with DocumentPublisher(k, topic) as pub:
        await pub.send_raw(b"k", b"v")
        await pub.flush()
    assert [(r.key, r.value) for r in await read_records(k, topic, timeout=60)] == [(b"k", b"v")]


def test_the_cli_query_command_reports_a_bad_login(secured_kafka, monkeypatch):
    """``vectorstream query`` goes through the same settings: a wrong password is one line, exit 2."""
    k = secured_kafka.client_settings("sasl_ssl", sasl_password=SecretStr("not-the-password"))
    env = {**ApacheKafka.worker_env(k), "VECTORSTREAM_QUERY__HS256_SECRET": SECRET}
    done = subprocess.run(
        [sys.executable, "-m", "agents.cli", "query", "--tenant", "acme", "password reset"],
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot connect to Kafka" in done.stderr and "kafka.sasl_password" in done.stderr
    assert "Traceback" not in done.stderr


async def test_one_reachable_bootstrap_server_is_enough(secured_kafka):
    """A cluster with one bootstrap server down still starts: the check tries the next one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    k = secured_kafka.client_settings(
        "sasl_ssl", bootstrap_servers=f"127.0.0.1:{dead},{secured_kafka.sasl_ssl_bootstrap}"
    )
    await check_connection(k)
