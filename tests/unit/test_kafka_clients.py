"""One place builds Kafka clients: the connection settings of ``pipeline.kafka`` (TLS, SASL) reach every
aiokafka client and the faust app, and nothing in ``pipeline`` or ``agents`` constructs a Kafka client past it."""

from __future__ import annotations

import ast
import socket
import ssl
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from pipeline.errors import ConfigurationError
from pipeline.kafka import admin_client, client_options, consumer, producer, ssl_context
from pipeline.settings import KafkaSettings, Settings
from tests.support.apache_kafka import make_test_pki

ROOT = Path(__file__).resolve().parents[2]
KAFKA_CLASSES = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "create_conn"}
#: file -> the functions allowed to construct a Kafka client there
ALLOWED = {
    "pipeline/kafka.py": {"producer", "consumer", "admin_client", "_probe"},
    "agents/app.py": {"make_app"},
}


def kafka_constructions(source: str) -> list[tuple[str, str, int]]:
    """(enclosing function, what is constructed, line) for every AIOKafka* / create_conn / faust.App call."""
    tree = ast.parse(source)
    faust_app_names = {"App"} if "from faust import" in source and "App" in source else set()
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            scope = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call):
                f = child.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in KAFKA_CLASSES:
                    found.append((scope, name, child.lineno))
                elif isinstance(f, ast.Attribute) and f.attr == "App" and ast.unparse(f.value) == "faust":
                    found.append((scope, "faust.App", child.lineno))
                elif isinstance(f, ast.Name) and f.id in faust_app_names:
                    found.append((scope, "faust.App", child.lineno))
            visit(child, scope)

    visit(tree, "<module>")
    return found


def test_the_scanner_finds_every_form_of_construction() -> None:
    source = """
import faust
from aiokafka import AIOKafkaProducer
import aiokafka
def a(): return AIOKafkaProducer(bootstrap_servers="x")
async def b(): return aiokafka.AIOKafkaConsumer("t")
class C:
    def m(self): self.admin = aiokafka.admin.AIOKafkaAdminClient()
def d(): return faust.App("id")
"""
    assert [(f, what) for f, what, _ in kafka_constructions(source)] == [
        ("a", "AIOKafkaProducer"),
        ("b", "AIOKafkaConsumer"),
        ("m", "AIOKafkaAdminClient"),
        ("d", "faust.App"),
    ]


def test_no_kafka_client_is_constructed_outside_the_builders() -> None:
    """The product (pipeline/, agents/) and the test harness helpers build every client through pipeline.kafka."""
    offenders = []
    seen = set()
    helpers = [ROOT / "tests/chaos/harness.py", ROOT / "tests/integration/workers.py"]
    for path in [
        *sorted((ROOT / "pipeline").rglob("*.py")),
        *sorted((ROOT / "agents").rglob("*.py")),
        *sorted((ROOT / "tests/support").rglob("*.py")),
        *helpers,
    ]:
        rel = path.relative_to(ROOT).as_posix()
        for function, what, line in kafka_constructions(path.read_text()):
            seen.add((rel, function))
            if function not in ALLOWED.get(rel, set()):
                offenders.append(f"{rel}:{line} {function}() constructs {what}")
    assert not offenders, "build Kafka clients with pipeline.kafka (producer/consumer/admin_client):\n" + "\n".join(
        offenders
    )
    # and the builders are still where this test expects them (a rename would make the check vacuous)
    assert {("pipeline/kafka.py", f) for f in ALLOWED["pipeline/kafka.py"]} | {("agents/app.py", "make_app")} <= seen


def test_plaintext_by_default() -> None:
    options = client_options(KafkaSettings())
    assert options["security_protocol"] == "PLAINTEXT" and options["bootstrap_servers"] == "127.0.0.1:9092"
    assert "ssl_context" not in options and "sasl_mechanism" not in options
    assert client_options(KafkaSettings(bootstrap_servers="k1:9092,k2:9092"))["bootstrap_servers"] == "k1:9092,k2:9092"


def test_sasl_ssl_verifies_the_broker_and_logs_in() -> None:
    k = KafkaSettings(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p"
    )
    options = client_options(k)
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "u",
        "p",
    )
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_sasl_plaintext_has_no_tls() -> None:
    k = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p")
    options = client_options(k)
    assert "ssl_context" not in options and options["sasl_mechanism"] == "PLAIN"


def test_mutual_tls_loads_the_ca_and_the_client_certificate(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path)
    k = KafkaSettings(
        security_protocol="SSL",
        ssl_ca_file=pki.ca_file,
        ssl_cert_file=pki.client_cert_file,
        ssl_key_file=pki.client_key_file,
    )
    context = ssl_context(k)
    assert context is not None
    assert context.cert_store_stats()["x509_ca"] == 1  # the test CA only, not the system's
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("organizationName", "vectorstream tests"),), (("commonName", "vectorstream test CA"),))
    ]
    assert ssl_context(k.model_copy(update={"ssl_check_hostname": False})).check_hostname is False  # type: ignore[union-attr]


def test_bad_tls_files_name_the_setting(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path)
    with pytest.raises(ConfigurationError, match=r"kafka\.ssl_ca_file"):
        ssl_context(KafkaSettings(security_protocol="SSL", ssl_ca_file=tmp_path / "missing.pem"))
    with pytest.raises(ConfigurationError, match=r"kafka\.ssl_ca_file"):
        ssl_context(KafkaSettings(security_protocol="SSL", ssl_ca_file=pki.client_key_file))  # a key, not a CA
    with pytest.raises(ConfigurationError, match=r"kafka\.ssl_cert_file"):
        ssl_context(
            KafkaSettings(security_protocol="SSL", ssl_cert_file=pki.client_cert_file, ssl_key_file=pki.ca_file)
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "needs kafka.sasl_username and kafka.sasl_password"),
        ({"security_protocol": "PLAINTEXT", "ssl_ca_file": "/ca.pem"}, "kafka.ssl_ca_file is set but"),
        ({"security_protocol": "SSL", "sasl_username": "u", "sasl_password": "p"}, "does not use SASL"),
        ({"security_protocol": "SSL", "ssl_key_file": "/k.pem"}, "kafka.ssl_cert_file"),
        ({"sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
    ],
)
def test_incomplete_security_settings_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaSettings.model_validate(fields)


def test_secrets_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VECTORSTREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("VECTORSTREAM_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("VECTORSTREAM_KAFKA__SASL_PASSWORD", "hunter2-kafka")
    monkeypatch.setenv("VECTORSTREAM_KAFKA__SSL_KEY_PASSWORD", "hunter2-key")
    monkeypatch.setenv("VECTORSTREAM_KAFKA__SSL_CERT_FILE", "/c.pem")
    s = Settings()
    assert isinstance(s.kafka.sasl_password, SecretStr) and isinstance(s.kafka.ssl_key_password, SecretStr)
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "hunter2" not in text


async def test_the_builders_pass_the_connection_settings_through() -> None:
    k = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p", bootstrap_servers="h:1")
    p = producer(k, acks="all")
    c = consumer(k, "topic", group_id=None)
    a = admin_client("h:2")
    for client in (p.client, c._client):
        assert client._security_protocol == "SASL_PLAINTEXT" and client._sasl_plain_username == "u"
        assert client._bootstrap_servers == "h:1"
    assert a._client._security_protocol == "PLAINTEXT" and a._client._bootstrap_servers == "h:2"
    await p.stop()
    await c.stop()
    await a.close()


def test_faust_gets_the_same_tls_context_and_login(tmp_path: Path) -> None:
    import faust
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from agents.app import broker_credentials, make_app

    pki = make_test_pki(tmp_path)
    assert broker_credentials(KafkaSettings()) is None
    tls = broker_credentials(KafkaSettings(security_protocol="SSL", ssl_ca_file=pki.ca_file))
    assert isinstance(tls, faust.SSLCredentials) and tls.context.check_hostname
    for protocol in ("SASL_SSL", "SASL_PLAINTEXT"):
        k = KafkaSettings(
            security_protocol=protocol, sasl_mechanism="SCRAM-SHA-256", sasl_username="u", sasl_password="p"
        )
        auth = credentials_to_aiokafka_auth(broker_credentials(k))
        ours = client_options(k)
        for key in ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
            assert auth[key] == ours[key], key
        assert (auth["ssl_context"] is None) == (protocol == "SASL_PLAINTEXT")
    settings = Settings(
        data_dir=tmp_path,
        kafka=KafkaSettings(security_protocol="SASL_SSL", sasl_username="u", sasl_password="p"),
    )
    assert isinstance(make_app(settings).conf.broker_credentials, faust.SASLCredentials)


def test_invalid_settings_are_one_line_each_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.worker import invalid_settings

    monkeypatch.setenv("VECTORSTREAM_STORE__HNSW_M", "2")
    with pytest.raises(ValidationError) as info:
        Settings()
    (line,) = invalid_settings(info.value)
    assert line.startswith("invalid setting store.hnsw_m (VECTORSTREAM_STORE__HNSW_M): ")


async def test_the_broker_certificate_must_name_the_host(tmp_path: Path) -> None:
    """Host-name verification is on by default: a certificate for 127.0.0.2 and localhost, served on
    127.0.0.1 (a plain TLS server: this checks the client's TLS context, not Kafka), is refused when the
    client dials 127.0.0.1, accepted for "localhost", and accepted for 127.0.0.1 only with the check off."""
    import asyncio

    from pipeline.kafka import KafkaConnectError, check_connection

    pki = make_test_pki(tmp_path, host="127.0.0.2")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pki.broker_keystore)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    k = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", security_protocol="SSL", ssl_ca_file=pki.ca_file)

    async def handshake(settings: KafkaSettings, name: str) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context(settings), server_hostname=name)
        writer.close()

    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch|hostname mismatch"):
            await handshake(k, "127.0.0.1")
        with pytest.raises(KafkaConnectError, match=r"does not name that host.*kafka\.bootstrap_servers"):
            await check_connection(k)
        await handshake(k, "localhost")
        await handshake(k.model_copy(update={"ssl_check_hostname": False}), "127.0.0.1")
    finally:
        server.close()
        await server.wait_closed()


async def test_no_reachable_bootstrap_server_is_one_error_naming_the_setting() -> None:
    from pipeline.kafka import KafkaConnectError, check_connection

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])  # closed again: nothing listens there
    k = KafkaSettings(bootstrap_servers=",".join(f"127.0.0.1:{p}" for p in ports))
    with pytest.raises(KafkaConnectError) as info:
        await check_connection(k)
    assert str(info.value) == (
        f"nothing listens on 127.0.0.1:{ports[0]}: fix kafka.bootstrap_servers "
        "(and the other 1 bootstrap servers failed too)"
    )


async def test_the_worker_consumer_waits_at_most_kafka_consumer_fetch_max_wait_ms(tmp_path):
    """faust fixes its worker consumer's fetch wait at 1,500 ms; a fetch held that long on the idle documents
    topic holds back the queries topic too. The app factory gives the consumer faust makes the configured
    wait, per app, and leaves faust's factory working for other apps."""
    from agents.app import make_app
    from pipeline.settings import Settings

    short = make_app(Settings(_env_file=None, data_dir=tmp_path / "a", kafka={"consumer_fetch_max_wait_ms": 77}))
    default = make_app(Settings(_env_file=None, data_dir=tmp_path / "b", kafka={"group_id": "other"}))
    made = []
    try:
        for app in (short, default):
            made.append(app.consumer._thread._create_worker_consumer(app.transport))
        assert made[0]._fetch_max_wait_ms == 77
        assert made[1]._fetch_max_wait_ms == Settings(_env_file=None).kafka.consumer_fetch_max_wait_ms == 100
    finally:
        for consumer in made:
            await consumer.stop()
