"""cluster/local_demo.sh (make demo, demo-acl, study, table, table-acl) hands the job the command it means: the
arguments are expanded where the script runs, not left for the job's shell (where CONFIG, OUT and METHODS are
unset)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _job(**env: str) -> list[str]:
    out = subprocess.run(["bash", "cluster/local_demo.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**{k: v for k, v in os.environ.items() if k not in ("CONFIG", "OUT", "METHODS",
                                                                                 "EXTRA", "DEMO_JOB")},
                              "PRINT_JOB": "1", **env}, check=True)
    return out.stdout.splitlines()


def test_the_demo_job_names_its_config_output_and_methods():
    argv = _job()
    assert argv[:5] == ["workloads/run_stream.py", "--config", "workloads/configs/dcl_mini.yaml", "--out",
                        "runs/dcl-mini"], argv
    assert argv[5] == "--methods" and "mrlora" in argv[6].split(","), argv


def test_an_empty_methods_list_runs_the_configs_own_methods_and_overrides_come_last():
    argv = _job(CONFIG="workloads/configs/acl_mini.yaml", OUT="runs/x", METHODS="", EXTRA="seed=1 data.test_per_task=5")
    assert argv == ["workloads/run_stream.py", "--config", "workloads/configs/acl_mini.yaml", "--out", "runs/x",
                    "seed=1", "data.test_per_task=5"], argv


def test_every_make_target_of_the_script_names_a_config_that_exists():
    make = (ROOT / "Makefile").read_text()
    configs = re.findall(r"CONFIG=(\S+)", make) + re.findall(r"--config (\S+)", make)
    assert len(configs) >= 3, configs
    for c in configs:
        assert (ROOT / c).is_file(), c
