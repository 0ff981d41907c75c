"""Fixtures of the chaos scenarios: a session Apache Kafka of their own (they restart it) and the integration
fixtures' name factory; every test under tests/chaos is marked ``integration``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import _session_broker, unique_name  # noqa: F401 - unique_name is a fixture
from tests.support.apache_kafka import ApacheKafka
from tests.support.postgres import PostgresServer, session_server

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[ApacheKafka]:
    """Not the integration tests' broker: these scenarios restart theirs, and no other test should see that."""
    yield from _session_broker(ApacheKafka())


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """PostgreSQL + pgvector for the scenarios that share one store between workers (one restarts it)."""
    yield from session_server()
