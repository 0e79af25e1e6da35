"""``clsvc study`` (the parser is :mod:`cl_service.cli`): the grid of (order, seed) cells of a CL config on Ray, or
its plan with ``--dry-run``. Ray is imported only when cells run."""

from __future__ import annotations

import argparse
import sys

from cl_service._cli_base import CLIError


def study_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared with ``workloads/run_study.py``."""
    from cl_service.study.args import add_arguments

    add_arguments(p)


def cmd_study(a: argparse.Namespace) -> int:
    from cl_service.on_ray.study import describe, plan, run_study, setup
    from cl_service.study.orders import OrderError
    from cl_service.study.plan import StudyMismatch

    try:
        if a.dry_run:
            s = setup(a.config, a.data, a.methods, a.orders, a.seeds, a.out, a.overrides, dry_run=True)
            for line in describe(s, plan(s)):
                print(line)
            return 0
        result = run_study(a.config, a.data, a.methods, a.orders, a.seeds, a.out, a.overrides,
                           log=lambda m: print(m, flush=True), command=" ".join(["clsvc", *sys.argv[1:]]),
                           max_concurrent=a.max_concurrent)
    except (OrderError, StudyMismatch) as e:
        raise CLIError(str(e)) from None
    return int(result["exit"])
