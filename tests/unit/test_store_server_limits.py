"""Store settings against what a real Qdrant server accepts: every default is inside the server's ranges, and
a value only local mode or Qdrant Edge tolerates is refused at start-up, naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.settings import (
    QDRANT_COLLECTION_NAME_FORBIDDEN,
    QDRANT_COLLECTION_NAME_MAX,
    QDRANT_SERVER_LIMITS,
    REGISTRY_SUFFIX,
    StoreSettings,
)
from pipeline.store.base import HnswParams

ROOT = Path(__file__).resolve().parents[2]
#: numeric store settings that never reach the server (client-side timings and the worker's index timer)
CLIENT_SIDE = {"timeout_seconds", "index_idle_seconds", "index_max_unindexed_points", "grpc_port"}
#: numeric store settings of the pgvector backend only (PostgreSQL validates its own GUCs)
PGVECTOR_ONLY = {"pgvector_max_scan_tuples", "postgres_pool_size"}
#: numeric store settings of the Qdrant Edge backend only (in-process: no server sees them)
EDGE_ONLY = {"edge_search_threads", "edge_shard_threads"}


def _numeric_fields() -> set[str]:
    return {
        name
        for name, field in StoreSettings.model_fields.items()
        if field.annotation in (int, float) and not isinstance(field.default, bool)
    }


def test_every_numeric_store_setting_is_classified() -> None:
    # a new setting must say whether the server validates it
    assert _numeric_fields() == set(QDRANT_SERVER_LIMITS) | CLIENT_SIDE | PGVECTOR_ONLY | EDGE_ONLY


@pytest.mark.parametrize("name", sorted(QDRANT_SERVER_LIMITS))
def test_the_default_is_inside_the_servers_range(name: str) -> None:
    _, low, high = QDRANT_SERVER_LIMITS[name]
    default = StoreSettings.model_fields[name].default
    assert default >= low and (high is None or default <= high), (name, default, low, high)
    StoreSettings(backend="qdrant", url="http://qdrant:6333")  # and the defaults pass the check as a whole


def test_the_adapters_own_defaults_are_inside_the_servers_range() -> None:
    assert HnswParams().full_scan_threshold_kb >= QDRANT_SERVER_LIMITS["full_scan_threshold_kb"][1]
    assert HnswParams().ef_construct >= QDRANT_SERVER_LIMITS["hnsw_ef_construct"][1]


def test_the_registry_suffix_is_the_adapters() -> None:
    from pipeline.store import registry

    assert registry.REGISTRY_SUFFIX == REGISTRY_SUFFIX
    assert registry.registry_name("c") == "c" + REGISTRY_SUFFIX


@pytest.mark.parametrize("name", sorted(n for n, (_, low, _h) in QDRANT_SERVER_LIMITS.items() if low > 0))
def test_below_the_servers_minimum_is_refused_for_qdrant_only(name: str) -> None:
    _, low, _high = QDRANT_SERVER_LIMITS[name]
    field = StoreSettings.model_fields[name]
    own_min = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
    step = 1 if field.annotation is int else 0.25
    value = low - step
    if own_min is not None and value < own_min:
        # the setting's own bound is already at or above the server's: no backend accepts the value
        with pytest.raises(ValidationError):
            StoreSettings(**{name: value})
        assert own_min >= low
        return
    StoreSettings(backend="edge", **{name: value})  # Qdrant Edge accepts it
    with pytest.raises(ValidationError, match=rf"store\.{name}=.*refused by the Qdrant server"):
        StoreSettings(backend="qdrant", url="http://qdrant:6333", **{name: value})
    with pytest.raises(ValidationError, match=rf"VECTORSTREAM_STORE__{name.upper()}"):
        StoreSettings(backend="qdrant", local_path=Path("/tmp/x"), **{name: value})  # local mode too


def test_the_full_scan_threshold_the_issue_met() -> None:
    assert StoreSettings().full_scan_threshold_kb == 10
    with pytest.raises(ValidationError, match="hnsw_config.full_scan_threshold must be at least 10"):
        StoreSettings(backend="qdrant", url="http://qdrant:6333", full_scan_threshold_kb=1)


def test_write_consistency_above_replication_is_refused() -> None:
    StoreSettings(backend="qdrant", url="http://q:6333", replication_factor=3, write_consistency_factor=2)
    with pytest.raises(ValidationError, match="write_consistency_factor=3 is above store.replication_factor=2"):
        StoreSettings(backend="qdrant", url="http://q:6333", replication_factor=2, write_consistency_factor=3)


@pytest.mark.parametrize(
    "collection",
    ["", "a/b", "what?", "x" * (QDRANT_COLLECTION_NAME_MAX - len(REGISTRY_SUFFIX) + 1)],
)
def test_collection_names_the_server_refuses(collection: str) -> None:
    with pytest.raises(ValidationError, match="is not a Qdrant collection name"):
        StoreSettings(backend="qdrant", url="http://q:6333", collection=collection)
    assert all(c not in QDRANT_COLLECTION_NAME_FORBIDDEN for c in "vectorstream_chunks")
    StoreSettings(backend="qdrant", url="http://q:6333", collection="x" * (255 - len(REGISTRY_SUFFIX)))


def test_the_worker_refuses_to_start_naming_the_setting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VECTORSTREAM_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "VECTORSTREAM_STORE__BACKEND": "qdrant",
            "VECTORSTREAM_STORE__URL": "http://127.0.0.1:1",
            "VECTORSTREAM_STORE__FULL_SCAN_THRESHOLD_KB": "5",
            "VECTORSTREAM_DATA_DIR": str(tmp_path),
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "agents.cli", "worker"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    errors = [line for line in (done.stdout + done.stderr).splitlines() if " ERROR " in line]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(errors) == 1 and "VECTORSTREAM_STORE__FULL_SCAN_THRESHOLD_KB" in errors[0], errors
    assert "store.full_scan_threshold_kb" in errors[0] and "Traceback" not in done.stderr
