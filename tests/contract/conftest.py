"""The contract suite's PostgreSQL + pgvector server, started once per session; each test gets a database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresServer, session_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    yield from session_server()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database (pgvector installed) of the session's server, as the application role's URL."""
    name = postgres.create_database()
    yield postgres.app_url(name)
    postgres.drop_database(name)
