"""``python -m tests.support.faulty_worker``: the real ``vectorstream worker`` with its store wrapped in
:class:`~tests.support.faulty_store.FaultyStore`, switched by the file ``VECTORSTREAM_TEST_FAULT_FILE`` names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agents.worker import run_worker
from tests.support.faulty_store import FaultyStore

FAULT_FILE_ENV = "VECTORSTREAM_TEST_FAULT_FILE"


def main() -> int:
    fault_file = os.environ.get(FAULT_FILE_ENV)
    if not fault_file:
        print(f"{FAULT_FILE_ENV} must name the fault file", file=sys.stderr)
        return 2
    return run_worker(wrap_store=lambda store: FaultyStore(store, Path(fault_file)))


if __name__ == "__main__":
    sys.exit(main())
