"""Fixtures for tests against real brokers: Apache Kafka and Tansu, each started at most once per session.

``broker`` runs a test on both; every test under tests/integration is marked ``integration``.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from pipeline.embedded_broker import BrokerUnavailable, LocalBroker, Tansu
from tests.support.apache_kafka import ApacheKafka

_HERE = Path(__file__).resolve().parent
_B = TypeVar("_B", bound=LocalBroker)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _session_broker(broker: _B) -> Iterator[_B]:
    """Start ``broker`` for the session; a missing prerequisite skips, except under CI, where it fails."""
    try:
        broker.start()
    except BrokerUnavailable as exc:
        broker.close()
        if _in_ci():
            pytest.fail(f"{broker.label} is required when CI=true but cannot start: {exc}", pytrace=False)
        pytest.skip(f"{broker.label} unavailable here: {exc}")
    except BaseException:
        broker.close()  # BrokerStartError carries the tail of the broker's log
        raise
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[ApacheKafka]:
    yield from _session_broker(ApacheKafka())


@pytest.fixture(scope="session")
def tansu() -> Iterator[Tansu]:
    yield from _session_broker(Tansu())


_BROKER_FIXTURES = {"apache": "apache_kafka", "tansu": "tansu"}


@pytest.fixture(params=list(_BROKER_FIXTURES))
def broker(request: pytest.FixtureRequest) -> str:
    """The bootstrap servers of the session's Apache Kafka or Tansu; only the broker needed is started."""
    return request.getfixturevalue(_BROKER_FIXTURES[request.param]).bootstrap_servers


@pytest.fixture
def broker_name(request: pytest.FixtureRequest) -> str:
    """``"apache"`` or ``"tansu"`` in a test that uses ``broker`` (for broker-specific expectations)."""
    return request.node.callspec.params["broker"]


def _unique_names(node_name: str) -> Callable[[str], str]:
    base = re.sub(r"[^A-Za-z0-9.-]+", "-", node_name).strip("-.")[:100]
    salt = uuid.uuid4().hex[:8]
    counter = itertools.count()

    def make(kind: str = "topic") -> str:
        # only "." and "-": Kafka warns about topic names mixing "." and "_" (they collide in metric names)
        return f"{base}.{salt}.{kind}{next(counter)}"

    return make


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of names unique to this test run: ``unique_name("topic")``, ``unique_name("group")``."""
    return _unique_names(request.node.name)
