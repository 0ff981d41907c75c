# The two commands of the README, plus helpers. Every target installs what it needs first, so each
# works on a fresh clone (Python 3.11+, Java 17 and Maven for the Apache Kafka broker used by tests).
PYTHON ?= python3
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: install demo test test-slow test-all reliability lint schemas bench dashboard clean

install:
	$(PYTHON) -m pip install $(PIP_FLAGS) -e '.[test]'

## the main job on the embedded defaults: Tansu broker + worker + Qdrant Edge, indexing this repo's docs
demo: install
	$(PYTHON) -m agents.cli demo

## the whole default test suite (unit, contract, component, integration on Apache Kafka and Tansu)
test: install
	$(PYTHON) -m pytest

## the long chaos variants (20 SIGKILLs in one run, broker SIGKILL, SIGTERM during an outage)
test-slow: install
	$(PYTHON) -m pytest -m slow

## the default suite plus the long variants marked slow
test-all: install
	$(PYTHON) -m pytest -m ''

## run every chaos scenario (fast and slow) and rewrite RELIABILITY.md from what they counted
reliability: install
	$(PYTHON) -m tests.chaos.report --slow

## the benchmark suite: prints tables, writes benchmarks/results/*.md and SUMMARY.md (about 30 min)
bench: install
	$(PYTHON) -m benchmarks

## ruff (lint and format), mypy, the layer contracts (import-linter), the settings table and the JSON Schemas
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	lint-imports
	$(PYTHON) -m pipeline.settings_doc --check
	$(PYTHON) -m agents.cli schemas --check

## docs/dashboard.png: a real workload scraped by a real Prometheus, every dashboard panel plotted
dashboard: install
	$(PYTHON) -m pip install $(PIP_FLAGS) -e '.[dashboard]'
	bash deploy/prometheus/install.sh
	$(PYTHON) -m benchmarks.dashboard

schemas: install
	$(PYTHON) -m agents.cli schemas

clean:
	rm -rf .vectorstream .pytest_cache .hypothesis
