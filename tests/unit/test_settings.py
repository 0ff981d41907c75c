"""One settings tree from environment variables, with nested groups and secrets."""

import pytest
from pydantic import ValidationError

from pipeline.settings import PACKAGED_MODEL, Settings


def test_defaults_work_on_a_laptop(monkeypatch):
    for var in [v for v in __import__("os").environ if v.startswith("VECTORSTREAM_")]:
        monkeypatch.delenv(var)
    s = Settings()
    assert s.store.backend == "edge" and s.model.name == PACKAGED_MODEL
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"


def test_nested_environment_variables(monkeypatch):
    monkeypatch.setenv("VECTORSTREAM_STORE__HNSW_M", "32")
    monkeypatch.setenv("VECTORSTREAM_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("VECTORSTREAM_STORE__API_KEY", "s3cret")
    s = Settings()
    assert s.store.hnsw_m == 32
    assert s.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert s.store.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


def test_explicit_arguments_beat_environment(monkeypatch):
    monkeypatch.setenv("VECTORSTREAM_LOG_LEVEL", "DEBUG")
    assert Settings(log_level="WARNING").log_level == "WARNING"


def test_invalid_values_are_refused(monkeypatch):
    monkeypatch.setenv("VECTORSTREAM_STORE__HNSW_M", "2")
    with pytest.raises(ValidationError):
        Settings()


def test_overlap_must_be_below_chunk_size(monkeypatch):
    monkeypatch.setenv("VECTORSTREAM_MODEL__CHUNK_TOKENS", "32")
    monkeypatch.setenv("VECTORSTREAM_MODEL__CHUNK_OVERLAP_TOKENS", "32")
    with pytest.raises(ValidationError):
        Settings()


def test_packaged_model_resolves_to_a_local_folder():
    from pathlib import Path

    path = Path(Settings().model_path)
    assert (path / "config.json").exists() or (path / "modules.json").exists()


def test_roles_select_the_agents(monkeypatch):
    assert Settings().role_set == {"ingest", "query"}
    monkeypatch.setenv("VECTORSTREAM_ROLES", "query")
    assert Settings().role_set == {"query"}
    monkeypatch.setenv("VECTORSTREAM_ROLES", "search")
    with pytest.raises(ValidationError):
        Settings()


def test_metadata_indexes_are_parsed_and_validated_with_a_clear_error():
    from pydantic import ValidationError

    from pipeline.settings import StoreSettings

    ok = StoreSettings(metadata_indexes=" lang:keyword, year:INTEGER,tags:keyword ,score:float,draft:bool,")
    assert ok.metadata_index_map == {
        "lang": "keyword",
        "year": "integer",
        "tags": "keyword",
        "score": "float",
        "draft": "bool",
    }
    assert StoreSettings().metadata_index_map == {}
    for bad, says in (
        ("lang", "is not field:type"),
        ("lang:", "is not field:type"),
        ("Lang:keyword", "is not a metadata key"),
        ("meta.lang:keyword", "is not a metadata key"),
        ("lang:text", "the type must be one of keyword, integer, float, bool"),
        ("lang:keyword,lang:integer", "declared more than once"),
    ):
        with pytest.raises(ValidationError) as caught:
            StoreSettings(metadata_indexes=bad)
        message = str(caught.value)
        assert says in message and "VECTORSTREAM_STORE__METADATA_INDEXES" in message, message
