"""The vector-store package: the port (``base``), the adapters (``edge``, ``qdrant``, ``pgvector``), the document
registry layout the Qdrant adapters share (``registry``), the helpers they share (``common``), and ``open_store``
to pick an adapter by settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import ConfigurationError

if TYPE_CHECKING:
    from pipeline.settings import StoreSettings
    from pipeline.store.base import VectorStore

__all__ = ["open_store"]


def open_store(settings: StoreSettings) -> VectorStore:
    """Build the adapter that ``settings.backend`` names; the caller still has to ``await open(...)``.

    Adapters are imported here, not at the top: a worker on Qdrant Edge never loads qdrant-client, and back.
    """
    if settings.backend == "edge":
        from pipeline.store.edge import EdgeStore

        return EdgeStore.from_settings(settings)
    if settings.backend == "qdrant":
        from pipeline.store.qdrant import QdrantStore

        return QdrantStore.from_settings(settings)
    if settings.backend == "pgvector":
        from pipeline.store.pgvector import PgVectorStore

        return PgVectorStore.from_settings(settings)
    raise ConfigurationError(f"unknown store backend {settings.backend!r}: use 'edge', 'qdrant' or 'pgvector'")
