"""The options of ``clsvc study`` and ``workloads/run_study.py`` (argparse only: building the CLI's parser imports
nothing heavy)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``clsvc study`` and ``workloads/run_study.py``."""
    p.add_argument("--config", default=None, help="RunCfg YAML, the config of every cell")
    p.add_argument("--data", default=None, help="shard dataset (default: the config's, or its built-in benchmark "
                                                "generated once into OUT/data)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: the config's)")
    p.add_argument("--orders", default="3", help="K (the benchmark's order, then K-1 rows of a cyclic Latin square "
                                                 "in a seeded order) or a file of orders, one per line (default 3)")
    p.add_argument("--seeds", default="2", help="N (seeds 0..N-1) or a comma-separated list (default 2)")
    p.add_argument("--out", default=None, help="study folder; rerun with the same folder to resume (default: the "
                                               "config's out + '-study')")
    p.add_argument("--max-concurrent", type=int, default=None, help="at most this many cells at once (default: "
                                                                    "as the cluster's resources allow)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the config")
