"""docker-compose.yml and the Dockerfile against what the code reads: services, ports, volumes, and every
VECTORSTREAM_* variable a real setting that Settings parses (no Docker engine here, so nothing is started)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from pipeline.settings import Settings
from pipeline.settings_doc import env_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
WORKERS = ("ingest", "query")
#: what the compose file asks of the host's environment, as an operator would export it
HOST_ENV = {"VECTORSTREAM_QUERY__HS256_SECRET": "s" * 48}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (a missing required variable fails the test)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env and (env[name] or op not in (":-", ":?")):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise AssertionError(f"compose needs ${name} from the host: {arg}")
        return ""

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, str(value)).replace("$$", "$")


def environment(service: str, host: dict[str, str] | None = None) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(v, host if host is not None else HOST_ENV) for k, v in env.items()}


def volumes(service: str) -> dict[str, str]:
    """Mount target -> source."""
    out = {}
    for v in SERVICES[service].get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out


def container_ports(service: str) -> set[int]:
    ports = {int(str(p).split(":")[-1].split("/")[0]) for p in SERVICES[service].get("ports", [])}
    return ports | {int(p) for p in SERVICES[service].get("expose", [])}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    import os

    for name in list(os.environ):
        if name.startswith("VECTORSTREAM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_the_stack_has_every_service() -> None:
    assert set(SERVICES) == {"kafka", "qdrant", "ingest", "query", "prometheus", "grafana"}
    assert not any("zookeeper" in name for name in SERVICES)


@pytest.mark.parametrize("service", list(SERVICES))
def test_every_vectorstream_variable_is_a_setting(service: str) -> None:
    unknown = {k for k in environment(service) if k.startswith("VECTORSTREAM_")} - env_names()
    assert not unknown, f"{service} sets variables no setting reads: {sorted(unknown)}"


def test_every_vectorstream_variable_of_the_image_is_a_setting() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    names = set(re.findall(r"\b(VECTORSTREAM_\w+)=", dockerfile))
    assert names, "the image sets its data paths and metrics port"
    assert names - env_names() == set()


def test_the_stack_refuses_to_start_without_a_query_secret() -> None:
    for service in WORKERS:
        with pytest.raises(AssertionError, match="VECTORSTREAM_QUERY__HS256_SECRET"):
            environment(service, host={})


@pytest.mark.parametrize("service", WORKERS)
def test_workers_read_kafka_qdrant_and_serve_metrics(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_from(environment(service), monkeypatch)
    # the shared Qdrant server: Qdrant Edge is in-process and cannot be shared between replicas
    assert s.store.backend == "qdrant"
    url = urlparse(s.store.url or "")
    assert url.hostname == "qdrant" and url.port in container_ports("qdrant")
    # Kafka's advertised in-network listener
    kafka_env = environment("kafka")
    advertised = {u.split("://", 1)[1] for u in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert set(s.kafka.bootstrap_servers.split(",")) <= advertised
    assert s.kafka.bootstrap_servers.split(":")[0] in SERVICES
    assert s.query.hs256_secret.get_secret_value() == HOST_ENV["VECTORSTREAM_QUERY__HS256_SECRET"]
    # the metrics port is the one exposed and the one Prometheus scrapes
    assert s.metrics.port != 0 and s.metrics.port in container_ports(service)
    jobs = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    scraped = [(sd["names"], sd["port"]) for j in jobs for sd in j.get("dns_sd_configs", [])]
    assert ([service], s.metrics.port) in scraped
    deps = SERVICES[service]["depends_on"]
    assert deps["kafka"]["condition"] == "service_healthy" and "qdrant" in deps


@pytest.mark.parametrize("service", WORKERS)
def test_workers_scale(service: str) -> None:
    spec = SERVICES[service]
    assert spec["build"] == "." and (ROOT / "Dockerfile").is_file()
    assert spec["deploy"]["replicas"] >= (2 if service == "ingest" else 1)
    # a fixed name or a host port would stop `--scale` at one replica
    assert "container_name" not in spec and "ports" not in spec


def test_ingest_replicas_do_not_outnumber_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_from(environment("ingest"), monkeypatch)
    assert SERVICES["ingest"]["deploy"]["replicas"] <= s.kafka.partitions


def test_kafka_runs_in_kraft_mode_and_keeps_its_data() -> None:
    env = environment("kafka")
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert not any("ZOOKEEPER" in k for k in env)
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    assert volumes("kafka")[env["KAFKA_LOG_DIRS"]] == "kafka-data"
    assert "healthcheck" in SERVICES["kafka"]
    # clients on the host get a listener they can reach
    host_port = next(int(str(p).split(":")[0]) for p in SERVICES["kafka"]["ports"])
    assert f"localhost:{host_port}" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_qdrant_keeps_its_data() -> None:
    assert SERVICES["qdrant"]["image"].startswith("qdrant/qdrant:")
    assert volumes("qdrant")["/qdrant/storage"] == "qdrant-data"
    assert {6333, 6334} <= container_ports("qdrant")


def test_prometheus_gets_the_config_and_the_rules() -> None:
    spec = SERVICES["prometheus"]
    mounts = volumes("prometheus")
    config_arg = next(a.split("=", 1)[1] for a in spec["command"] if a.startswith("--config.file="))
    target = str(Path(config_arg).parent)
    local = ROOT / mounts[target]
    assert (local / Path(config_arg).name).is_file()
    config = yaml.safe_load((local / Path(config_arg).name).read_text())
    for rule_file in config["rule_files"]:
        assert (local / rule_file).is_file()
    tsdb = next(a.split("=", 1)[1] for a in spec["command"] if a.startswith("--storage.tsdb.path="))
    assert mounts[tsdb] == "prometheus-data"
    assert 9090 in container_ports("prometheus")


def test_grafana_gets_the_datasource_and_the_dashboard() -> None:
    mounts = volumes("grafana")
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    providers = yaml.safe_load((provisioning / "dashboards" / "vectorstream.yml").read_text())["providers"]
    url = urlparse(datasources[0]["url"])
    assert url.hostname == "prometheus" and url.port in container_ports("prometheus")
    dashboards_dir = providers[0]["options"]["path"]
    assert (ROOT / mounts[dashboards_dir] / "vectorstream.json").is_file()
    home = environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/")
    # every panel asks the provisioned datasource
    uid = datasources[0]["uid"]
    text = (ROOT / mounts[dashboards_dir] / "vectorstream.json").read_text()
    assert set(re.findall(r'"uid": "([^"]+)"', text)) == {uid, "vectorstream"}
    assert mounts["/var/lib/grafana"] == "grafana-data"


def test_named_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for service in SERVICES:
        for source in volumes(service).values():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{service} mounts {source}, which is not in the repository"
            else:
                assert source in declared, f"{service} uses volume {source!r}, not declared"


def test_the_image_copies_what_the_package_needs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignore = (ROOT / ".dockerignore").read_text().split()
    for line in dockerfile.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore or f"!{source}/" in ignore, f".dockerignore leaves out {source}"
    assert re.search(r"^EXPOSE 9464$", dockerfile, re.M)
    assert Settings.model_fields["metrics"].default.port == 9464


def test_the_readme_says_how_to_run_the_stack() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docker compose up" in readme and "VECTORSTREAM_QUERY__HS256_SECRET" in readme


#: what a secured cluster needs, as the compose file passes it through from the host
KAFKA_SECURITY = (
    "SECURITY_PROTOCOL",
    "SASL_MECHANISM",
    "SASL_USERNAME",
    "SASL_PASSWORD",
    "SSL_CA_FILE",
    "SSL_CERT_FILE",
    "SSL_KEY_FILE",
    "SSL_KEY_PASSWORD",
    "SSL_CHECK_HOSTNAME",
)


@pytest.mark.parametrize("service", WORKERS)
def test_workers_pass_the_kafka_security_settings_through(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment(service)
    for name in ("BOOTSTRAP_SERVERS", *KAFKA_SECURITY):
        variable = f"VECTORSTREAM_KAFKA__{name}"
        raw = (SERVICES[service].get("environment") or {})[variable]
        assert f"${{{variable}" in raw, f"{service} does not take {variable} from the host"
    # unset on the host: the stack's own plaintext Kafka
    s = settings_from(env, monkeypatch)
    assert s.kafka.security_protocol == "PLAINTEXT" and s.kafka.sasl_username is None and s.kafka.ssl_ca_file is None
    # an MSK-style SCRAM login over TLS with a CA from the mounted folder, exactly as the host exported it
    tls_dir = next(t for t, src in volumes(service).items() if src == "./deploy/kafka-tls")
    host = {
        **HOST_ENV,
        "VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS": "b-1.example:9096,b-2.example:9096",
        "VECTORSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "VECTORSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "VECTORSTREAM_KAFKA__SASL_USERNAME": "svc",
        "VECTORSTREAM_KAFKA__SASL_PASSWORD": "pw-from-host",
        "VECTORSTREAM_KAFKA__SSL_CA_FILE": f"{tls_dir}/ca.pem",
    }
    s = settings_from(environment(service, host), monkeypatch)
    k = s.kafka
    assert (k.bootstrap_servers, k.security_protocol, k.sasl_mechanism) == (
        "b-1.example:9096,b-2.example:9096",
        "SASL_SSL",
        "SCRAM-SHA-512",
    )
    assert k.sasl_username == "svc" and k.sasl_password is not None
    assert k.sasl_password.get_secret_value() == "pw-from-host"
    assert k.ssl_ca_file == Path(tls_dir) / "ca.pem" and k.ssl_check_hostname is True
    assert volumes(service)[tls_dir] == "./deploy/kafka-tls" and SERVICES[service]["volumes"][0].endswith(":ro")


def test_the_tls_folder_keeps_keys_out_of_git() -> None:
    ignore = (ROOT / "deploy/kafka-tls/.gitignore").read_text().split()
    assert ignore[0] == "*" and "!README.md" in ignore
