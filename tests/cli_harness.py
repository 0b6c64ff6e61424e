"""Runs many ``vit-mqa`` command lines in one process, under a memory limit.

Usage: python tests/cli_harness.py EXTRA_BYTES CASES.json RESULTS.json

Each case is an argv list for ``vit_mqa.apps.cli.main``. The result of each is its exit code,
its stderr, and whether it raised (a traceback is a failure the tests report). Running the
real entry point in one process makes thousands of cases affordable; the address-space
limit (EXTRA_BYTES above what the process has mapped once torch is imported) turns an
unbounded allocation into a MemoryError that is reported, instead of the machine's OOM
killer.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import traceback


def main() -> None:
    extra, cases_path, results_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import torch  # noqa: F401 - imported before the limit: torch maps a lot of address space

    from vit_mqa.apps.cli import main as cli_main

    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, mapped + extra))
    with open(cases_path) as f:
        cases = json.load(f)
    results = []
    for argv in cases:
        out, err = io.StringIO(), io.StringIO()
        raised = None
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli_main(argv)
        except SystemExit as e:  # argparse: usage errors exit 2
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - any escape is what the tests look for
            code, raised = None, traceback.format_exc()
        results.append({"argv": argv, "code": code, "stderr": err.getvalue(),
                        "raised": raised})
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
