"""A small stream on a local two-node Ray cluster: a head plus a second ``ray start --address`` node,
both on 127.0.0.1 and 1 CPU each, so the 2 Ray Train workers (1 CPU each) must span both nodes."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cl_service.on_ray.local import add_node, ray_env, start_head, stop_cluster

pytestmark = [pytest.mark.ray, pytest.mark.long, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stream_on_two_local_nodes(tmp_path, tiny_base, dcl_shards):
    tmp = tempfile.mkdtemp(prefix="clsvc-2n-", dir="/tmp")  # Ray's socket paths must stay short
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = ray_env() | {"RAY_ADDRESS": address, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    try:
        start_head(tmp, num_cpus=1, port=port, dashboard_port=_free_port(), client_port=_free_port(), timeout=120)
        add_node(address, num_cpus=1, timeout=120)
        probe = subprocess.run(
            [sys.executable, "-c", "import json, ray; ray.init(address='auto', _node_ip_address='127.0.0.1', "
             "log_to_driver=False); print(json.dumps([[n['NodeManagerAddress'], n['Resources'].get('CPU')] "
             "for n in ray.nodes() if n['Alive']]))"],
            env=env, capture_output=True, text=True, timeout=120)
        nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        assert nodes == [["127.0.0.1", 1.0], ["127.0.0.1", 1.0]], probe.stderr[-2000:]

        out = tmp_path / "run"
        run = subprocess.run(
            [sys.executable, str(ROOT / "workloads" / "run_stream.py"), "--out", str(out), "--methods", "mrlora,oracle,lora_ft",
             f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]", "data.test_limit=6",
             "expert.train.max_steps=3", "expert.train.batch_size=4", "expert.lora.rank=4",
             "router.train.max_steps=2", "router.samples_per_task=3", "router.lora.rank=4", "eval.max_new_tokens=3",
             "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.stall_timeout_s=400"],
            env=env, capture_output=True, text=True, timeout=540, cwd=str(ROOT))
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics["methods"]) == {"mrlora", "oracle", "lora_ft"} and metrics["tasks"] == ["RS", "Med"]
        for folder in ("experts/RS", "experts/Med", "router/stage-1-Med", "lora_ft/stage-1-Med"):
            log = json.loads((out / "adapters" / folder / "train_log.json").read_text())
            assert log["world_size"] == 2  # one worker per node: each node has a single CPU
        # lora_ft stage 1 continues stage 0's adapter: the worker on the other node got it through the object
        # store (exactly one of the two workers is not on the driver's node), not from the driver's folder
        shipped = "lora_ft/stage-1: starts from a copy of"
        # (a worker line can reach this loopback cluster's driver log twice: count the workers, by pid)
        copied = {line.split("pid=")[1].split(")")[0] for line in run.stdout.splitlines() if shipped in line}
        assert len(copied) == 1, run.stdout[-3000:]
    finally:
        stop_cluster(tmp, address)
    leftover = subprocess.run(["pgrep", "-f", tmp], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
