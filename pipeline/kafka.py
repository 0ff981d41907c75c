"""Kafka in one place: the connection settings of every Kafka client the product builds, the clients
themselves, the check that the broker can be reached (with an error that names the setting to fix), and
creating the project's topics, which the worker and the test harness share.

Every AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient of ``pipeline`` and ``agents`` is made by
:func:`producer`, :func:`consumer` or :func:`admin_client` here (the faust app gets the same TLS context and
SASL settings from :func:`ssl_context` in ``agents/app.py``); tests/unit/test_kafka_clients.py checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
    for_code,
)

from pipeline.errors import ConfigurationError
from pipeline.settings import KafkaSettings, Settings

KafkaTarget = str | KafkaSettings
"""What a client is pointed at: bootstrap servers (a plaintext cluster) or the whole connection settings."""


class KafkaConnectError(ConfigurationError):
    """The broker cannot be reached or refuses this client; the message names the setting to fix."""


def kafka_settings(target: KafkaTarget) -> KafkaSettings:
    """``target`` as connection settings: a bare ``host:port[,host:port]`` string means PLAINTEXT."""
    return target if isinstance(target, KafkaSettings) else KafkaSettings(bootstrap_servers=target)


def ssl_context(k: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of ``k`` (None for PLAINTEXT / SASL_PLAINTEXT): the brokers' certificates are verified
    against ``ssl_ca_file`` (or the system's CAs), their host names checked unless ``ssl_check_hostname`` is
    off, and the client certificate of ``ssl_cert_file`` / ``ssl_key_file`` presented when one is set."""
    if k.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    for name in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file"):
        path = getattr(k, name)
        if path is not None and not path.is_file():
            raise ConfigurationError(f"kafka.{name}: {path} is not a readable file")
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(k.ssl_ca_file) if k.ssl_ca_file else None
        )
    except ssl.SSLError as exc:
        raise ConfigurationError(f"kafka.ssl_ca_file: {k.ssl_ca_file} holds no usable PEM certificate ({exc})") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = k.ssl_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if k.ssl_cert_file is not None:
        password = k.ssl_key_password.get_secret_value() if k.ssl_key_password is not None else None
        try:
            context.load_cert_chain(
                str(k.ssl_cert_file), str(k.ssl_key_file) if k.ssl_key_file else None, password=password or None
            )
        except (ssl.SSLError, ValueError) as exc:
            what = "kafka.ssl_key_password" if "password" in str(exc).lower() else "kafka.ssl_cert_file/ssl_key_file"
            raise ConfigurationError(f"{what}: the client certificate and key cannot be loaded ({exc})") from exc
    return context


def client_options(k: KafkaSettings) -> dict[str, Any]:
    """The aiokafka keyword arguments that connect a client as ``k`` says (bootstrap, TLS, SASL, timeout)."""
    options: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "security_protocol": k.security_protocol,
        "request_timeout_ms": int(k.request_timeout_seconds * 1000),
    }
    context = ssl_context(k)
    if context is not None:
        options["ssl_context"] = context
    if k.security_protocol.startswith("SASL_"):
        assert k.sasl_password is not None  # KafkaSettings checks it
        options["sasl_mechanism"] = k.sasl_mechanism
        options["sasl_plain_username"] = k.sasl_username
        options["sasl_plain_password"] = k.sasl_password.get_secret_value()
    return options


def producer(target: KafkaTarget, **options: Any) -> AIOKafkaProducer:
    """An (unstarted) producer connected as ``target`` says; ``options`` are aiokafka producer settings."""
    return AIOKafkaProducer(**{**client_options(kafka_settings(target)), **options})


def consumer(target: KafkaTarget, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """An (unstarted) consumer connected as ``target`` says; ``options`` are aiokafka consumer settings."""
    return AIOKafkaConsumer(*topics, **{**client_options(kafka_settings(target)), **options})


def admin_client(target: KafkaTarget, **options: Any) -> AIOKafkaAdminClient:
    """An (unstarted) admin client connected as ``target`` says."""
    return AIOKafkaAdminClient(**{**client_options(kafka_settings(target)), **options})


async def start_client(client: AIOKafkaProducer | AIOKafkaConsumer | AIOKafkaAdminClient, target: KafkaTarget) -> None:
    """``client.start()``; when it cannot bootstrap, :func:`check_connection` says why (KafkaConnectError)."""
    try:
        await client.start()
    except KafkaConnectionError:
        await check_connection(target)
        raise


# --- failing fast: can this client talk to the broker at all? ------------------------------------------------


def _hosts(k: KafkaSettings) -> list[tuple[str, int]]:
    out = []
    for entry in (h.strip() for h in k.bootstrap_servers.split(",")):
        if entry:
            host, _, port = entry.rpartition(":")
            out.append((host.strip("[]"), int(port)) if host and port.isdigit() else (entry, 9092))
    return out


async def _speaks_tls(host: str, port: int, seconds: float) -> bool:
    """Whether ``host:port`` completes a TLS handshake (certificates not checked: only the protocol matters)."""
    probe = ssl.create_default_context()
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(seconds):
            _, writer = await asyncio.open_connection(host, port, ssl=probe)
    except ssl.SSLError as exc:
        # an alert from the server (e.g. "certificate required") is TLS too; garbage back is not
        return "alert" in str(exc).lower() or "certificate" in str(exc).lower()
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


def _diagnosis(k: KafkaSettings, where: str, exc: BaseException) -> str:
    """One line saying what went wrong and which setting to fix."""
    protocol = k.security_protocol
    if isinstance(exc, ssl.SSLCertVerificationError):
        # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        if exc.verify_code in (62, 64) or "mismatch" in str(exc).lower():
            return (
                f"the TLS certificate of {where} does not name that host ({exc.verify_message}): fix "
                "kafka.bootstrap_servers to a name the certificate carries (kafka.ssl_check_hostname=false "
                "skips the check, unsafe)"
            )
        ca = str(k.ssl_ca_file) if k.ssl_ca_file else "the system's trust store (kafka.ssl_ca_file is not set)"
        return (
            f"the TLS certificate of {where} is not trusted ({exc.verify_message}): kafka.ssl_ca_file must be "
            f"the CA that signed it; the certificates were checked against {ca}"
        )
    if isinstance(exc, SaslAuthenticationFailed | IllegalSaslStateError):
        return (
            f"{where} refused the SASL {k.sasl_mechanism} login of user {k.sasl_username!r}: check "
            f"kafka.sasl_username and kafka.sasl_password (and kafka.sasl_mechanism) [{exc}]"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return f"{where} does not accept SASL {k.sasl_mechanism}: fix kafka.sasl_mechanism [{exc}]"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower()
        if "certificate" in reason or "handshake failure" in reason:
            return (
                f"{where} refused the TLS handshake ({exc.reason or exc}): it probably requires a client "
                "certificate; set kafka.ssl_cert_file and kafka.ssl_key_file"
            )
        return (
            f"{where} does not speak TLS ({exc.reason or exc}): kafka.security_protocol={protocol} expects a TLS "
            "listener; set it to PLAINTEXT or SASL_PLAINTEXT, or point kafka.bootstrap_servers at the TLS listener"
        )
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens on {where}: fix kafka.bootstrap_servers"
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
        return f"cannot reach {where} ({exc}): fix kafka.bootstrap_servers"
    return f"cannot talk to {where} with kafka.security_protocol={protocol} ({exc!r}): check kafka.bootstrap_servers"


async def check_connection(target: KafkaTarget) -> None:
    """Connect (and log in) to the bootstrap servers in turn until one works; when none does,
    KafkaConnectError names the setting to fix (from the first server's failure).

    aiokafka's clients retry a refused login or a failed handshake and report only "Unable to bootstrap",
    so the worker and the CLI call this first: a wrong password, an untrusted CA or a plaintext client on a
    TLS listener is one clear line within seconds, never a retry loop.
    """
    k = kafka_settings(target)
    failures = []
    for host, port in _hosts(k):
        failure = await _probe(k, host, port)
        if failure is None:
            return  # one reachable bootstrap server is enough: it names the others
        failures.append(failure)
    if not failures:
        raise KafkaConnectError("kafka.bootstrap_servers names no host:port")
    first = failures[0]
    if len(failures) > 1:
        raise KafkaConnectError(f"{first} (and the other {len(failures) - 1} bootstrap servers failed too)") from first
    raise first


async def _probe(k: KafkaSettings, host: str, port: int) -> KafkaConnectError | None:
    """Connect (and log in) to ``host:port`` once: None when that worked, else what to fix."""
    from aiokafka.conn import create_conn

    options = client_options(k)
    options.pop("bootstrap_servers")
    where = f"{host}:{port}"
    seconds = k.request_timeout_seconds
    try:
        async with asyncio.timeout(seconds):
            conn = await create_conn(host, port, client_id="vectorstream-check", **options)
    except (OSError, EOFError, KafkaError, TimeoutError) as exc:
        return _explain(k, where, exc, await _speaks_tls(host, port, 5.0) if _dropped(exc) else None)
    conn.close()
    return None


def _cause(exc: BaseException) -> BaseException:
    if isinstance(exc, KafkaConnectionError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def _dropped(exc: BaseException) -> bool:
    """The broker closed (or never answered) the connection: the usual sign of a protocol mismatch."""
    cause = _cause(exc)
    return not isinstance(cause, ssl.SSLError | ConnectionRefusedError | socket.gaierror) and isinstance(
        cause, KafkaConnectionError | ConnectionError | EOFError | TimeoutError
    )


def _explain(k: KafkaSettings, where: str, exc: BaseException, listener_tls: bool | None) -> KafkaConnectError:
    cause = _cause(exc)
    if listener_tls is not None:
        tls = k.security_protocol in ("SSL", "SASL_SSL")
        if not tls and listener_tls:
            return KafkaConnectError(
                f"{where} is a TLS listener but kafka.security_protocol={k.security_protocol}: set it to "
                "SSL or SASL_SSL (with kafka.ssl_ca_file)"
            )
        if tls and not listener_tls:
            return KafkaConnectError(
                f"{where} does not speak TLS but kafka.security_protocol={k.security_protocol}: set it to "
                "PLAINTEXT or SASL_PLAINTEXT, or point kafka.bootstrap_servers at the TLS listener"
            )
        if tls and k.ssl_cert_file is None:
            return KafkaConnectError(
                f"{where} closed the TLS connection: it probably requires a client certificate "
                "(set kafka.ssl_cert_file and kafka.ssl_key_file)"
            )
        if isinstance(cause, TimeoutError):
            return KafkaConnectError(
                f"{where} did not answer within kafka.request_timeout_seconds={k.request_timeout_seconds:g}: "
                "check kafka.bootstrap_servers and kafka.security_protocol"
            )
    return KafkaConnectError(_diagnosis(k, where, cause))


#: the dead-letter topic holds whole rejected records, including oversize ones
DLQ_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


async def create_topics(
    target: KafkaTarget,
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
    admin = admin_client(target, request_timeout_ms=int(timeout * 1000))
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


async def ensure_topics(settings: Settings) -> None:
    """Create the documents, dead-letter and queries topics of ``settings`` if they do not exist.

    Reply topics are per tenant (``<replies_topic>.<tenant>``) and are never created by the worker: a client (or
    the deployment, with per-tenant ACLs) creates its tenant's topic."""
    k = settings.kafka
    await create_topics(k, {k.documents_topic: k.partitions}, k.replication_factor)
    # a request's timestamp is the broker's append time: the worker's ``consume`` stage (that timestamp to the
    # agent, vectorstream_query_stage_seconds) then measures its own fetch path, not the client's clock or
    # its producer's queue
    await create_topics(
        k, {k.queries_topic: k.partitions}, k.replication_factor, configs={"message.timestamp.type": "LogAppendTime"}
    )
    await create_topics(
        k,
        {k.dead_letter_topic: k.partitions},
        k.replication_factor,
        configs={"max.message.bytes": str(DLQ_MAX_MESSAGE_BYTES)},
    )
