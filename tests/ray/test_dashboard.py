"""The local Ray of ``clsvc run/serve/sweep`` starts with its dashboard on loopback (``CLSVC_RAY_DASHBOARD=0``: without)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

_CODE = """
import json, os
import ray
from ray.job_submission import JobSubmissionClient
from cl_service.on_ray.local import init_local

os.environ.pop("CLSVC_RAY_DASHBOARD", None)  # the default: on
lines = []
ctx = init_local(lines.append, num_cpus=1, log_to_driver=False)
jobs = JobSubmissionClient(f"http://{ctx.dashboard_url}").list_jobs()
print(json.dumps({"url": ctx.dashboard_url, "lines": lines, "jobs": [str(j.type) for j in jobs]}))
ray.shutdown()
"""


def test_cli_ray_serves_its_dashboard_on_loopback_and_says_where():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    res = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=150, env=env,
                         cwd=os.getcwd())
    assert res.returncode == 0, res.stderr[-3000:]
    on = json.loads(res.stdout.strip().splitlines()[-1])
    assert on["url"].startswith("127.0.0.1:")
    assert on["jobs"] == ["JobType.DRIVER"]  # its job API answers (auth token sent), listing this very driver
    assert len(on["lines"]) == 1 and on["lines"][0].startswith(f"Ray dashboard: http://{on['url']} ")


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("off", False), ("false", False)])
def test_dashboard_switch(monkeypatch, value, on):
    from cl_service.on_ray.local import dashboard_enabled

    if value is None:
        monkeypatch.delenv("CLSVC_RAY_DASHBOARD", raising=False)
    else:
        monkeypatch.setenv("CLSVC_RAY_DASHBOARD", value)
    assert dashboard_enabled() is on
