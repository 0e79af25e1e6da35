"""stop_cluster signals the processes that name the cluster's temp dir, and never its own caller chain."""

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_stop_cluster_spares_its_callers_and_kills_the_cluster_processes(tmp_path):
    mark = str(tmp_path / f"clsvc-ray-{uuid.uuid4().hex[:8]}")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", mark])
    try:
        time.sleep(0.5)
        # as cluster/local_demo.sh calls it: under `timeout`, whose command line names the temp dir too
        code = ("import sys; from cl_service.on_ray.local import stop_cluster; "
                "print('stopped', stop_cluster(sys.argv[1], timeout=10))")
        out = subprocess.run(["timeout", "30", sys.executable, "-c", code, mark], cwd=REPO, capture_output=True,
                             text=True, timeout=45)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "stopped 1"
        assert sleeper.wait(timeout=10) != 0  # signalled, not finished
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
