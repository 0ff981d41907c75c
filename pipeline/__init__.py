"""vectorstream: Kafka document events to tenant-scoped, permission-aware semantic search in Qdrant.

The library layer. It knows the wire contracts in ``schemas`` but never faust; agents live in ``agents``.
"""

__version__ = "0.1.0"
