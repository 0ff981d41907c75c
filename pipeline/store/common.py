"""What the store adapters share that is not part of the port: the vector layout read from settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.store.base import VectorLayout

if TYPE_CHECKING:
    from pipeline.settings import StoreSettings


def layout_from_settings(settings: StoreSettings) -> VectorLayout:
    return VectorLayout(
        quantization=settings.quantization,
        oversampling=settings.quantization_oversampling,
        vectors_on_disk=settings.vectors_on_disk,
        hnsw_on_disk=settings.hnsw_on_disk,
        max_segment_size_kb=settings.max_segment_size_kb,
    )
