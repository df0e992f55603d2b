"""``jaxft suite run | status | report``: the command line's side of the suite layer."""

from __future__ import annotations

import argparse

from jaxft.suite import runner
from jaxft.suite.spec import load_suite


def suite_command(args: argparse.Namespace) -> int:
    """Exit status: 0; 1 when a run failed; 75 / 130 when a run was preempted / interrupted."""
    suite = load_suite(args.suite)
    if args.suite_command == "run" and (args.dry_run or args.emit_commands):
        print(runner.plan_table(suite, args.only) if args.dry_run else runner.emit_commands(suite, args.only))
        return 0
    if args.suite_command == "report":
        from jaxft.suite.report import write_report

        md, files = write_report(suite, axis=args.axis, metric=args.metric)
        print(md, *(f"wrote {f}" for f in files), sep="\n")
        return 0
    result = None
    if args.suite_command == "run":
        result = runner.run_suite(suite, only=args.only, max_parallel=args.max_parallel)
    rows = runner.status_rows(suite)
    print(runner.format_status(rows))
    if result is not None and result.exit_status:
        return result.exit_status
    return int(any(r["state"] == "failed" for r in rows))
