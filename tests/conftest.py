"""Shared fixtures: the real packaged model, loaded once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def settings():
    from pipeline.settings import Settings

    return Settings(_env_file=None)


@pytest.fixture(scope="session")
def embedder(settings):
    from pipeline.embedding import Embedder

    emb = Embedder(settings)
    yield emb
    emb.close()
