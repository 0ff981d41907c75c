"""Every collection the Qdrant adapter creates, the document registry included, is created with the configured
sharding, replication and write consistency (a registry with a single replica stopped all ingest while one
node of a 3-node cluster was down)."""

from __future__ import annotations

from typing import Any

from qdrant_client import AsyncQdrantClient

from pipeline.settings import REGISTRY_SUFFIX, StoreSettings
from pipeline.store.qdrant import QdrantStore


class RecordingClient(AsyncQdrantClient):
    """qdrant-client's local mode, recording what every create_collection was asked for (local mode itself
    keeps only the vectors' config), then creating the collection as usual."""

    created: dict[str, dict[str, Any]] = {}

    async def create_collection(self, collection_name: str, **kwargs: Any) -> bool:  # type: ignore[override]
        RecordingClient.created[collection_name] = kwargs
        return await super().create_collection(collection_name, **kwargs)


async def test_every_collection_gets_the_configured_sharding_and_replication(tmp_path, monkeypatch) -> None:
    import pipeline.store.qdrant as adapter

    monkeypatch.setattr(adapter, "AsyncQdrantClient", RecordingClient)
    RecordingClient.created = {}
    settings = StoreSettings(
        backend="qdrant",
        local_path=tmp_path / "local",
        collection="chunks",
        shard_number=3,
        replication_factor=2,
        write_consistency_factor=2,
    )
    store = QdrantStore.from_settings(settings)
    try:
        await store.open(model="m", dim=8)
    finally:
        await store.close()
    assert set(RecordingClient.created) == {"chunks", "chunks" + REGISTRY_SUFFIX}
    for name, config in RecordingClient.created.items():
        cluster = {k: config.get(k) for k in ("shard_number", "replication_factor", "write_consistency_factor")}
        assert cluster == {"shard_number": 3, "replication_factor": 2, "write_consistency_factor": 2}, name
    assert RecordingClient.created["chunks"]["hnsw_config"].full_scan_threshold == 10
