"""The Apache Kafka broker (KRaft, one node) that tests and benchmarks run against, its jars resolved by Maven.

A test harness, not product code: the product runs against any Kafka cluster, and embeds only Tansu.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.embedded_broker import LOCALHOST as _LOCALHOST
from pipeline.embedded_broker import BrokerStartError, BrokerUnavailable, LocalBroker, _free_port
from pipeline.settings import KafkaSettings

__all__ = ["KAFKA_VERSION", "ApacheKafka", "TestPki", "kafka_classpath", "kraft_cluster_id", "make_test_pki"]

#: the Apache Kafka release the harness runs; kafka-pom.xml next to this file takes it as ``-Dkafka.version``
KAFKA_VERSION = "3.9.1"
#: the app's default record limit is 1,000,000 bytes; the broker takes 4 MiB so that oversize records
#: can be produced (with a producer ``max_request_size`` above the record) and dead-lettered by the app
BROKER_MESSAGE_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_POM = Path(__file__).resolve().parent / "kafka-pom.xml"


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


# --- certificates made at test time ----------------------------------------------------------------------


@dataclass(frozen=True)
class TestPki:
    """PEM files of a throw-away PKI: a CA, the broker's certificate (SAN 127.0.0.1 and localhost) and a client
    certificate for mutual TLS, all signed by the CA, and a second CA that signed nothing of the broker's."""

    ca_file: Path
    broker_keystore: Path  #: the broker's private key followed by its certificate (Kafka's PEM keystore)
    client_cert_file: Path
    client_key_file: Path
    other_ca_file: Path  #: a CA the broker's certificate does not chain to ("unknown CA")

    __test__ = False  # not a pytest test class


def make_test_pki(folder: Path, *, host: str = _LOCALHOST) -> TestPki:
    """Write a fresh PKI under ``folder`` with ``cryptography`` (RSA 2048, SHA-256, valid for two days)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vectorstream tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    def builder(subject: str, issuer: x509.Name, public_key: rsa.RSAPublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    def ca(cn: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
        k = key()
        cert = (
            builder(cn, name(cn), k.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def leaf(
        cn: str, ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate, *, server: bool
    ) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
        k = key()
        b = builder(cn, ca_cert.subject, k.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(host))]),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def pkcs8(k: rsa.RSAPrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key, ca_cert = ca("vectorstream test CA")
    broker_key, broker_cert = leaf("kafka-broker", ca_key, ca_cert, server=True)
    client_key, client_cert = leaf("vectorstream-client", ca_key, ca_cert, server=False)
    _, other_ca = ca("some other CA")
    files = TestPki(
        ca_file=folder / "ca.pem",
        broker_keystore=folder / "broker-keystore.pem",
        client_cert_file=folder / "client.pem",
        client_key_file=folder / "client.key",
        other_ca_file=folder / "other-ca.pem",
    )
    files.ca_file.write_bytes(pem(ca_cert))
    files.broker_keystore.write_bytes(pkcs8(broker_key) + pem(broker_cert))
    files.client_cert_file.write_bytes(pem(client_cert))
    files.client_key_file.write_bytes(pkcs8(client_key))
    files.other_ca_file.write_bytes(pem(other_ca))
    for path in (files.broker_keystore, files.client_key_file):
        path.chmod(0o600)
    return files


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

    ``secured=True`` adds two listeners beside PLAINTEXT (which the harness itself and the broker's own
    replication keep using), both on TLS with certificates made at start (:func:`make_test_pki`, PEM
    keystores as Kafka 3.9 reads them):

    * ``SASL_SSL`` (:attr:`sasl_ssl_bootstrap`): SASL over TLS with SCRAM-SHA-512 and SCRAM-SHA-256, the user
      :attr:`scram_user` created with the storage (``StorageTool format --add-scram``), and PLAIN with the
      same user and password (a Confluent Cloud-style login);
    * ``MTLS`` (:attr:`mtls_bootstrap`): TLS with ``ssl.client.auth=required``: only a client presenting a
      certificate signed by the test CA gets in.

    :meth:`client_settings` gives the matching ``KafkaSettings`` for each listener.

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
        secured: bool = False,
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
        self.secured = secured
        self.sasl_ssl_port = _free_port(host, avoid=(self.port, self.controller_port)) if secured else 0
        self.mtls_port = _free_port(host, avoid=(self.port, self.controller_port, self.sasl_ssl_port)) if secured else 0
        #: the SCRAM (and PLAIN) user of the SASL_SSL listener and its password
        self.scram_user = "vectorstream"
        self.scram_password = secrets.token_urlsafe(18)
        self._pki: TestPki | None = None
        self.partitions = partitions
        self.auto_create_topics = auto_create_topics
        self.heap = heap
        self.extra_config = dict(extra_config or {})
        self._classpath: str | None = None
        self._java: str | None = None

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def pki(self) -> TestPki:
        """The certificates of the TLS listeners (``secured=True``), made on first use."""
        if not self.secured:
            raise RuntimeError("the broker was started without secured=True: it has no TLS listeners")
        if self._pki is None:
            self._pki = make_test_pki(self.data_dir / "pki", host=self.host)
        return self._pki

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return f"{self.host}:{self.sasl_ssl_port}"

    @property
    def mtls_bootstrap(self) -> str:
        return f"{self.host}:{self.mtls_port}"

    def client_settings(self, listener: str = "plaintext", **overrides: object) -> KafkaSettings:
        """``KafkaSettings`` that connect to ``listener`` ("plaintext", "sasl_ssl" or "mtls") as a good client."""
        from pydantic import SecretStr

        base: dict[str, object]
        if listener == "plaintext":
            base = {"bootstrap_servers": self.bootstrap_servers}
        elif listener == "sasl_ssl":
            base = {
                "bootstrap_servers": self.sasl_ssl_bootstrap,
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": self.scram_user,
                "sasl_password": SecretStr(self.scram_password),
                "ssl_ca_file": self.pki.ca_file,
            }
        elif listener == "mtls":
            base = {
                "bootstrap_servers": self.mtls_bootstrap,
                "security_protocol": "SSL",
                "ssl_ca_file": self.pki.ca_file,
                "ssl_cert_file": self.pki.client_cert_file,
                "ssl_key_file": self.pki.client_key_file,
            }
        else:
            raise ValueError(f"unknown listener {listener!r}")
        return KafkaSettings.model_validate({**base, **overrides})

    @staticmethod
    def worker_env(k: KafkaSettings) -> dict[str, str]:
        """``k``'s connection settings as the VECTORSTREAM_KAFKA__* variables of a worker process."""
        env = {}
        for name in (
            "bootstrap_servers",
            "security_protocol",
            "sasl_mechanism",
            "sasl_username",
            "sasl_password",
            "ssl_ca_file",
            "ssl_cert_file",
            "ssl_key_file",
            "ssl_key_password",
            "ssl_check_hostname",
        ):
            value = getattr(k, name)
            if value is None:
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            env[f"VECTORSTREAM_KAFKA__{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def _security_properties(self) -> dict[str, str]:
        pki = self.pki
        jaas_scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        jaas_plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{self.scram_user}="{self.scram_password}";'
        )
        return {
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(pki.broker_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(pki.ca_file),
            "sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256,PLAIN",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas_scram,
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": jaas_scram,
            "listener.name.sasl_ssl.plain.sasl.jaas.config": jaas_plain,
            "listener.name.mtls.ssl.client.auth": "required",
        }

    def server_properties(self) -> dict[str, str]:
        cport = self.controller_port
        listeners = [f"PLAINTEXT://{self.host}:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        if self.secured:
            listeners += [f"SASL_SSL://{self.host}:{self.sasl_ssl_port}", f"MTLS://{self.host}:{self.mtls_port}"]
            protocols += ["SASL_SSL:SASL_SSL", "MTLS:SSL"]
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{cport}",
            "listeners": ",".join([*listeners, f"CONTROLLER://{self.host}:{cport}"]),
            "advertised.listeners": ",".join(listeners),
            "listener.security.protocol.map": ",".join(protocols),
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
        if self.secured:
            props.update(self._security_properties())
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
                    *self._scram_arguments(),
                ],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
            )
            if result.returncode != 0:
                raise BrokerStartError(f"formatting Kafka storage failed:\n{(result.stdout + result.stderr)[-3000:]}")

    def _scram_arguments(self) -> list[str]:
        """``--add-scram`` of the SASL_SSL user (KRaft keeps SCRAM credentials in the metadata log)."""
        if not self.secured:
            return []
        return [
            arg
            for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256")
            for arg in ("--add-scram", f"{mechanism}=[name={self.scram_user},password={self.scram_password}]")
        ]

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
