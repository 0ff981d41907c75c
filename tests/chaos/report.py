"""``python -m tests.chaos.report``: run the chaos scenarios and write RELIABILITY.md, a table of what each one
did to real processes and what the consistency checker and the query audit found afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tests.chaos.harness import RESULTS_ENV
from tests.integration.workers import ROOT


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    #: the test functions that make up the scenario (tests/chaos/<module>::<function>)
    tests: tuple[str, ...]
    slow: bool = False


SCENARIOS = [
    Scenario(
        "sigkill",
        "SIGKILL of a worker at random moments during ingest (6 kills), restarted each time",
        ("test_kill.py::test_sigkill_at_random_moments_then_restart",),
    ),
    Scenario(
        "sigkill-20",
        "the same with 20 kills in one run",
        ("test_kill.py::test_sigkill_at_random_moments_twenty_times",),
        slow=True,
    ),
    Scenario(
        "sigterm-mid-batch",
        "SIGTERM with a large batch in flight, then a restart",
        ("test_kill.py::test_sigterm_mid_batch_finishes_or_gives_back_the_batch",),
    ),
    Scenario(
        "store-outage",
        "vector store unavailable for a while (fault file in front of Qdrant Edge)",
        ("test_outages.py::test_store_outage_pauses_consumption_then_catches_up",),
    ),
    Scenario(
        "sigterm-during-outage",
        "SIGTERM while the batch waits for an unavailable store",
        ("test_outages.py::test_sigterm_during_store_outage_gives_the_batch_back",),
        slow=True,
    ),
    Scenario(
        "store-outage-server-proxy",
        "Qdrant server behind a TCP proxy that drops every connection",
        ("test_server_store.py::test_server_store_behind_a_dropping_proxy",),
    ),
    Scenario(
        "broker-restart",
        "Apache Kafka stopped and restarted mid-ingest",
        ("test_outages.py::test_broker_restart_mid_ingest_worker_recovers_by_itself",),
    ),
    Scenario(
        "broker-kill",
        "Apache Kafka SIGKILLed and restarted mid-ingest",
        ("test_outages.py::test_broker_killed_mid_ingest_worker_recovers_by_itself",),
        slow=True,
    ),
    Scenario(
        "scale-1-2-1",
        "two workers on one Qdrant server, scaled 1 -> 2 -> 1 during ingest",
        ("test_server_store.py::test_two_workers_scaled_one_two_one_consume_every_partition",),
    ),
    Scenario(
        "pgvector-scale-1-2-1",
        "two workers on one PostgreSQL + pgvector store, 4 partitions, scaled 1 -> 2 -> 1 during ingest",
        ("test_pgvector_scale.py::test_two_workers_on_pgvector_scaled_one_two_one_each_partition_consumed_by_both",),
    ),
    Scenario(
        "pgvector-sigkill-one-of-two",
        "one of two workers on one pgvector store SIGKILLed mid-ingest and not restarted",
        ("test_pgvector_scale.py::test_one_of_two_workers_sigkilled_the_other_takes_over",),
    ),
    Scenario(
        "pgvector-db-restart",
        "PostgreSQL stopped and started again mid-ingest under two workers",
        ("test_pgvector_scale.py::test_database_restarted_mid_ingest_nothing_dead_lettered",),
    ),
    Scenario(
        "duplicates-out-of-order",
        "duplicates and out-of-order versions; full replay by a new group",
        ("test_versions.py::test_duplicates_and_out_of_order_versions_newest_wins",),
    ),
    Scenario(
        "hostile-input",
        "hostile input drawn by hypothesis, interleaved with good events",
        (
            "test_hostile.py::test_hostile_input_is_dead_lettered_with_its_reason",
            "test_hostile.py::test_zz_after_hostile_input_nothing_lost_or_left",
        ),
    ),
    Scenario(
        "breaker-bad-deploy",
        "a bad deploy that fails every record trips the breaker",
        ("test_hostile.py::test_bad_deploy_trips_the_breaker_instead_of_draining_the_topic",),
    ),
    Scenario(
        "query-flood",
        "query flood far beyond capacity",
        ("test_query_stress.py::test_flood_beyond_capacity_is_shed_in_bounded_memory",),
    ),
    Scenario(
        "query-replay",
        "replayed query requests",
        ("test_query_stress.py::test_replayed_requests_get_equivalent_replies",),
    ),
    Scenario(
        "query-expired",
        "query requests past their deadline",
        ("test_query_stress.py::test_expired_requests_are_dropped_and_counted",),
    ),
    Scenario(
        "query-slow-store",
        "slow store under queries with deadlines",
        ("test_query_stress.py::test_slow_store_times_out_as_errors_within_the_deadline",),
    ),
    Scenario(
        "query-attacks",
        "hostile query requests (issue 12) while two other tenants ask",
        ("test_query_attacks.py::test_hostile_requests_cost_the_other_tenants_nothing",),
    ),
]

SECURITY_HEADING = "## Security: hostile query requests"
SECURITY_TEST = "tests/chaos/test_query_attacks.py"


def security_section(rows: list[dict]) -> list[str]:
    """The security table, from the newest ``query-attacks`` result: one row per attack."""
    runs = [r for r in rows if r["scenario"] == "query-attacks" and r.get("details", {}).get("attacks")]
    if not runs:
        return []
    run = runs[-1]
    lines = [
        SECURITY_HEADING,
        "",
        f"From `{SECURITY_TEST}` ({run['time']}): one real worker on Apache Kafka configured with an RS256 public",
        "key only, while tenants acme and globex each ask valid questions in a loop (deadline 10 s). **served to",
        "the attacker** = results (status ok) for attack requests, plus replies to a verified attacker outside its",
        "own reply topic; **replies lost by others** = the other tenants' questions without a result within their",
        "deadline while the attack ran; **topics created** = topics that appeared while the attack ran.",
        f"{run['notes']}.",
        "",
        "| attack | what it tries | attempts | served to the attacker | replies lost by others | topics created |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for a in run["details"]["attacks"]:
        lines.append(
            f"| {a['attack']} | {a['what']} | {a['attempts']} | {a['served'] + a['foreign_replies']} | "
            f"{a['lost_by_others']} | {a['topics_created']} |"
        )
    return [*lines, ""]


def replace_security_section(text: str, section: list[str]) -> str:
    """``text`` (a RELIABILITY.md) with its security section replaced by ``section`` (or inserted before the
    notes)."""
    lines = text.splitlines()
    if SECURITY_HEADING in lines:
        start = lines.index(SECURITY_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = next((i for i, line in enumerate(lines) if line == "## What each run did"), len(lines))
    return "\n".join([*lines[:start], *section, *lines[end:]]) + "\n"


COUNTS = ("events", "lost", "duplicated", "stale", "leaked")


def run_pytest(junit: Path, results: Path, *, slow: bool, extra: list[str]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/chaos",
        "-p",
        "no:cacheprovider",
        "-rfEsxX",
        f"--junitxml={junit}",
        "-m",
        "" if slow else "not slow",
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env={**os.environ, RESULTS_ENV: str(results)})


def outcomes(junit_files: list[Path]) -> dict[str, list[tuple[str, str]]]:
    """test id (module::function) -> [(outcome, message)] over every run: passed, failed, skipped or xfailed."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path in junit_files:
        if not path.is_file():
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            module = case.get("classname", "").rsplit(".", 1)[-1]
            name = case.get("name", "").split("[", 1)[0]
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, message = "failed", child.get("message", "")
                elif child.tag == "skipped":
                    xfail = child.get("type") == "pytest.xfail"
                    outcome, message = ("xfailed" if xfail else "skipped"), child.get("message", "")
            out[f"{module}.py::{name}"].append((outcome, message))
    return out


def machine() -> str:
    cpu = "unknown CPU"
    mem = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}"
    )


def qdrant_server(url: str | None = None) -> str | None:
    """The Qdrant server the server scenarios run on (VECTORSTREAM_TEST_QDRANT_URL): its version as it
    reports it at ``GET /``, or why it could not be asked; None when no server is configured."""
    import urllib.request

    url = (url if url is not None else os.environ.get("VECTORSTREAM_TEST_QDRANT_URL", "")).strip()
    if not url:
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/", timeout=5) as response:
            info = json.loads(response.read())
        return f"Qdrant {info.get('version', '(version not reported)')} at {url}"
    except (OSError, ValueError) as exc:
        return f"a Qdrant server at {url} that did not answer GET / ({exc})"


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def render(
    rows: list[dict],
    results: dict[str, list[tuple[str, str]]],
    *,
    command: str,
    started: float,
    seconds: float,
    load: tuple[float, ...],
    slow: bool,
    commit: str,
    server: str | None = None,
) -> str:
    from pipeline.settings import Settings
    from tests.support.apache_kafka import KAFKA_VERSION

    by_scenario: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_scenario[row["scenario"]].append(row)
    lines = [
        "# Reliability",
        "",
        "What the chaos suite (`tests/chaos`) did to real processes on a real broker, and what was lost, duplicated,",
        "left stale or leaked afterwards. Generated by the command below; do not edit by hand.",
        "",
        f"- command: `{command}`",
        f"- run: {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))}, {seconds / 60:.1f} min, "
        f"commit {commit}",
        f"- machine: {machine()}; load average at the start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(the machine is shared)",
        f"- broker: Apache Kafka {KAFKA_VERSION} (KRaft, one node) started by `tests.support.apache_kafka`; "
        "workers: real "
        f"`vectorstream worker` processes; store: Qdrant Edge; embeddings: all-MiniLM-L6-v2 on "
        f"{Settings(_env_file=None).model.backend}",
        (
            f"- Qdrant server (the server scenarios, over REST): {server}"
            if server
            else "- Qdrant server: none (VECTORSTREAM_TEST_QDRANT_URL not set; the server scenarios are skipped)"
        ),
        "",
        "Columns: **runs** = executions of the scenario in this report; **events** = records produced to the "
        "documents topic (or query requests); **lost** = chunks of a live document's newest version missing from "
        "the store, plus bad records missing from the dead-letter topic, plus query requests left without a reply; "
        "**duplicated** = chunks stored twice, plus dead letters or replies delivered twice where exactly one is "
        "expected; **stale** = chunks of an older version or of a deleted document (the checker's stale + extra); "
        "**leaked** = query hits from another tenant or from a document the caller may not read. The consistency "
        "checker (`vectorstream check`, `pipeline/consistency.py`) replays the whole topic with the ingest rules "
        "and compares every stored chunk.",
        "",
        "| scenario | set | runs | result | events | lost | duplicated | stale | leaked |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    notes, blocked, issues = [], [], []
    for sc in SCENARIOS:
        runs = [o for t in sc.tests for o in results.get(t, [])]
        primary = results.get(sc.tests[-1], [])
        executed = [o for o in primary if o[0] != "skipped"]
        got = by_scenario.get(sc.id, [])
        sums = {c: sum(r[c] for r in got) for c in COUNTS}
        if not primary:
            result = "not run" + ("" if slow or not sc.slow else " (slow set)")
        elif not executed:
            result = "**blocked**"
            blocked.append(f"- **{sc.id}** ({sc.title}): {primary[0][1] or 'skipped'}")
        elif any(o[0] == "failed" for o in runs):
            failed = sum(o[0] == "failed" for o in runs)
            result = f"**FAILED** {failed} of {len(runs)}"
        elif any(o[0] == "xfailed" for o in runs):
            result = "**known issue**"
            issues.append(f"- **{sc.id}**: {next(o[1] for o in runs if o[0] == 'xfailed')}")
        else:
            result = "pass"
        cells = [str(sums[c]) if got else "–" for c in COUNTS]
        lines.append(
            f"| {sc.id}: {sc.title} | {'slow' if sc.slow else 'fast'} | {len(executed)} | {result} | "
            + " | ".join(cells)
            + " |"
        )
        for r in got:
            notes.append(f"- **{sc.id}**: {r['notes']}" + (f" — checker: {r['checker']}" if r.get("checker") else ""))
    lines += ["", *security_section(rows)]
    lines += ["## What each run did", "", *notes]
    if issues:
        lines += ["", "## Known issues (tests marked xfail, strict)", "", *issues]
    if blocked:
        lines += ["", "## Blocked here", "", *blocked]
    lines += [
        "",
        "## Commands",
        "",
        "- fast set (part of the default `python -m pytest`): `python -m pytest tests/chaos`",
        "- slow set (the long variants): `python -m pytest tests/chaos -m slow`",
        "- this report, fast and slow: `python -m tests.chaos.report --slow` (fast only: without `--slow`)",
        "- the server scenarios: set `VECTORSTREAM_TEST_QDRANT_URL=http://host:6333` (a Qdrant server)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.report", description=__doc__)
    parser.add_argument("--slow", action="store_true", help="also run the long variants (marked slow)")
    parser.add_argument("--runs", type=int, default=1, help="run the suite this many times (default %(default)s)")
    parser.add_argument("--output", type=Path, default=ROOT / "RELIABILITY.md")
    parser.add_argument(
        "--security-only",
        action="store_true",
        help=f"run only {SECURITY_TEST} and rewrite only the security section of the existing report",
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. -k sigkill)")
    args = parser.parse_args(argv)
    if args.security_only:
        return security_only(args.output)

    started = time.time()
    load = os.getloadavg()
    commit = git("rev-parse", "--short", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    work = ROOT / ".vectorstream" / "reliability" / time.strftime("run-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.jsonl"
    junits = [work / f"junit-{i}.xml" for i in range(args.runs)]
    codes = []
    for i, junit in enumerate(junits):
        print(f"=== chaos suite, run {i + 1} of {args.runs} (results in {work})", flush=True)
        codes.append(run_pytest(junit, results, slow=args.slow, extra=args.pytest_args))
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    command = (
        "python -m tests.chaos.report"
        + (" --slow" if args.slow else "")
        + (f" --runs {args.runs}" if args.runs != 1 else "")
        + (" -- " + shlex.join(args.pytest_args) if args.pytest_args else "")
    )
    text = render(
        rows,
        outcomes(junits),
        command=command,
        started=started,
        seconds=time.time() - started,
        load=load,
        slow=args.slow,
        commit=commit,
        server=qdrant_server(),
    )
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(rows)} scenario runs); pytest exit codes {codes}")
    return max(codes) if codes else 1


def security_only(output: Path) -> int:
    work = ROOT / ".vectorstream" / "reliability" / time.strftime("security-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.jsonl"
    cmd = [sys.executable, "-m", "pytest", SECURITY_TEST, "-p", "no:cacheprovider", "-rfEsxX"]
    print("$", " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=ROOT, env={**os.environ, RESULTS_ENV: str(results)})
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    section = security_section(rows)
    if not section:
        print(f"no query-attacks result in {results}; {output} left as it is")
        return code or 1
    output.write_text(replace_security_section(output.read_text() if output.is_file() else "", section))
    print(f"rewrote the security section of {output}; pytest exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
