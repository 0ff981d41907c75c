"""docker-compose.pgvector.yml (the pgvector variant) against the code: merged over docker-compose.yml, the
workers parse to the pgvector backend on the postgres service, as a role the row-level security binds."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from pipeline.settings_doc import env_names
from tests.unit.test_compose import HOST_ENV, SERVICES, WORKERS, environment, interpolate, settings_from

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = yaml.safe_load((ROOT / "docker-compose.pgvector.yml").read_text())
OVERRIDES: dict[str, dict[str, Any]] = OVERRIDE["services"]
HOST = {**HOST_ENV, "POSTGRES_PASSWORD": "p" * 32, "PGVECTOR_APP_PASSWORD": "a" * 32}


def merged_environment(service: str, host: dict[str, str] = HOST) -> dict[str, str]:
    """What compose gives the service with both files: the base environment, the override's keys on top."""
    env = environment(service, host)
    for key, value in (OVERRIDES[service].get("environment") or {}).items():
        env[key] = interpolate(value, host)
    return env


def test_the_variant_adds_postgres_and_repoints_the_workers() -> None:
    assert set(OVERRIDES) == {"postgres", *WORKERS}
    assert set(OVERRIDES) <= set(SERVICES) | {"postgres"}
    assert OVERRIDES["postgres"]["image"].startswith("pgvector/pgvector:")
    assert "postgres-data" in OVERRIDE["volumes"]


@pytest.mark.parametrize("service", WORKERS)
def test_workers_use_the_shared_pgvector_store_as_the_app_role(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = merged_environment(service)
    assert {k for k in env if k.startswith("VECTORSTREAM_")} <= env_names()
    s = settings_from(env, monkeypatch)
    assert s.store.backend == "pgvector"
    assert s.store.postgres_url is not None
    url = urlparse(s.store.postgres_url.get_secret_value())
    pg = OVERRIDES["postgres"]
    assert url.hostname == "postgres" and url.port == int(pg["ports"][0].split(":")[-1].strip('"'))
    assert url.path.lstrip("/") == pg["environment"]["POSTGRES_DB"]
    # not the superuser: row-level security does not bind superusers
    assert url.username == "vectorstream" != pg["environment"]["POSTGRES_USER"]
    assert url.password == HOST["PGVECTOR_APP_PASSWORD"]
    assert OVERRIDES[service]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_variant_refuses_to_start_without_its_passwords() -> None:
    for missing, service in (
        ("POSTGRES_PASSWORD", "postgres"),
        ("PGVECTOR_APP_PASSWORD", "postgres"),
        ("PGVECTOR_APP_PASSWORD", "ingest"),
        ("PGVECTOR_APP_PASSWORD", "query"),
    ):
        host = {k: v for k, v in HOST.items() if k != missing}
        with pytest.raises(AssertionError, match=missing):
            if service in WORKERS:
                merged_environment(service, host)
            else:
                {k: interpolate(v, host) for k, v in OVERRIDES[service]["environment"].items()}


def test_the_init_script_creates_the_extension_and_an_ordinary_role() -> None:
    mounts = {v.split(":")[1]: v.split(":")[0] for v in OVERRIDES["postgres"]["volumes"]}
    folder = ROOT / mounts["/docker-entrypoint-initdb.d"]
    script = (folder / "10-vectorstream.sh").read_text()
    assert "CREATE EXTENSION IF NOT EXISTS vector" in script
    assert "CREATE ROLE vectorstream LOGIN NOSUPERUSER NOBYPASSRLS" in script
    assert "PASSWORD :'app_password'" in script  # a psql variable, quoted by psql, not spliced by the shell
    assert (folder / "10-vectorstream.sh").stat().st_mode & 0o111
