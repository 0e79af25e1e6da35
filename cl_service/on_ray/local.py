"""Start/stop a local Ray head (and extra nodes) on loopback, with timeouts on every wait.

Used by ``make demo`` and the two-node test. Ray stays on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
``--node-ip-address=127.0.0.1``, dashboard on 127.0.0.1); clients need ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def ray_env(multi_node: bool = False) -> dict[str, str]:
    """Environment for ``ray`` commands. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps a single node on
    loopback; a multi-node cluster needs it at 1 (Ray refuses extra nodes otherwise), and every node is
    still pinned to 127.0.0.1 by ``--node-ip-address``."""
    env = dict(os.environ)
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multi_node else "0", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": env.get("RAY_AUTH_MODE", "token")})
    return env


def _ray_bin() -> str:
    cand = Path(sys.executable).with_name("ray")
    return str(cand) if cand.exists() else (shutil.which("ray") or "ray")


def _run(args: list[str], timeout: float, multi_node: bool = False) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, env=ray_env(multi_node), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(args)}` did not finish within {timeout:.0f} s") from None


def start_head(temp_dir: str, num_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265,
               timeout: float = 120, multi_node: bool = False) -> str:
    """Start a head node on loopback; returns the GCS address. Raises on failure with Ray's output."""
    args = [_ray_bin(), "start", "--head", f"--node-ip-address={LOOPBACK}", f"--port={port}",
            f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
            "--disable-usage-stats"]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    res = _run(args, timeout, multi_node)
    if res.returncode != 0:
        raise RuntimeError(f"ray start --head failed:\n{res.stdout}\n{res.stderr}")
    return f"{LOOPBACK}:{port}"


def add_node(address: str, num_cpus: int, timeout: float = 120) -> None:
    """Join another node (same machine, loopback) to the cluster at ``address``."""
    res = _run([_ray_bin(), "start", f"--address={address}", f"--node-ip-address={LOOPBACK}",
                f"--num-cpus={num_cpus}", "--disable-usage-stats"], timeout, multi_node=True)
    if res.returncode != 0:
        raise RuntimeError(f"ray start --address failed:\n{res.stdout}\n{res.stderr}")


def stop(timeout: float = 60) -> None:
    _run([_ray_bin(), "stop", "--force"], timeout)


def wait_for_nodes(n: int, timeout: float = 60) -> None:
    """Wait (bounded) until the connected cluster has ``n`` alive nodes."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for node in ray.nodes() if node["Alive"]) >= n:
            return
        time.sleep(0.5)
    raise TimeoutError(f"cluster did not reach {n} nodes within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cl_service.on_ray.local", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--temp-dir", default="/tmp/clsvc-ray")
    s.add_argument("--num-cpus", type=int, default=None)
    s.add_argument("--port", type=int, default=6379)
    sub.add_parser("stop")
    a = p.parse_args(argv)
    if a.cmd == "start":
        print(start_head(a.temp_dir, a.num_cpus, a.port))
    else:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
