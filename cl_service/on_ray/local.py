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


def driver_node_ip(address: str) -> str | None:
    """The ``_node_ip_address`` a driver connecting to ``address`` (``RAY_ADDRESS``) gives ``ray.init``: loopback
    for a cluster on loopback (``127.0.0.1:6379``, ``localhost:...``, ``auto``), where Ray would otherwise look
    for this host's node at its external address; None for a cluster on a real network (a launcher cluster's
    ``ray job submit`` sets ``RAY_ADDRESS`` to ``10.0.0.5:6379``), whose node Ray must find at that address."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") if ":" in address else address
    return LOOPBACK if host in ("auto", "localhost") or host.startswith("127.") else None


def ray_env() -> dict[str, str]:
    """Environment for ``ray`` commands: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every address on
    loopback (extra nodes join through :func:`add_node`)."""
    env = dict(os.environ)
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": env.get("RAY_AUTH_MODE", "token")})
    return env


def _ray_bin() -> str:
    cand = Path(sys.executable).with_name("ray")
    return str(cand) if cand.exists() else (shutil.which("ray") or "ray")


def _run(args: list[str], timeout: float, new_session: bool = False) -> subprocess.CompletedProcess:
    """``new_session``: run it as a session leader (``ray start``: see :func:`stop_cluster`)."""
    try:
        return subprocess.run(args, env=ray_env(), capture_output=True, text=True, timeout=timeout,
                              start_new_session=new_session)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(args)}` did not finish within {timeout:.0f} s") from None


def ensure_auth_token(timeout: float = 60) -> None:
    """Make sure a Ray auth token exists when token auth is on (the default). ``ray start`` refuses to start
    without one and, unlike ``ray.init``, does not create it: on a machine that never ran Ray the demo and
    the two-node cluster would fail. Creates ``~/.ray/auth_token`` only if no token is set or stored."""
    env = ray_env()
    if env.get("RAY_AUTH_MODE") != "token" or env.get("RAY_AUTH_TOKEN"):
        return
    res = _run([_ray_bin(), "get-auth-token", "--generate"], timeout)
    if res.returncode != 0:
        raise RuntimeError(f"ray get-auth-token --generate failed:\n{res.stdout}\n{res.stderr}")


def start_head(temp_dir: str, num_cpus: int | None = None, port: int = 6379, dashboard_port: int = 8265,
               timeout: float = 120, client_port: int = 10001) -> str:
    """Start a head node on loopback; returns the GCS address. Raises on failure with Ray's output."""
    ensure_auth_token()
    args = [_ray_bin(), "start", "--head", f"--node-ip-address={LOOPBACK}", f"--port={port}",
            f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={client_port}", "--disable-usage-stats"]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    res = _run(args, timeout, new_session=True)
    if res.returncode != 0:
        raise RuntimeError(f"ray start --head failed:\n{res.stdout}\n{res.stderr}")
    return f"{LOOPBACK}:{port}"


def add_node(address: str, num_cpus: int, timeout: float = 120) -> None:
    """Join another node (same machine, loopback) to the cluster at ``address`` with Ray's ``ray start``.

    Ray's CLI refuses extra nodes while clustering is disabled — and disabling it
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) is what keeps every address on loopback: enabling it makes
    Ray rewrite 127.0.0.1 to the machine's external address. So the node is started by ``ray start``
    itself with only that one refusal lifted (:mod:`cl_service.on_ray._join`); everything else is Ray's
    own code path, pinned to ``--node-ip-address=127.0.0.1``."""
    res = _run([sys.executable, "-m", "cl_service.on_ray._join", f"--address={address}",
                f"--node-ip-address={LOOPBACK}", f"--num-cpus={num_cpus}", "--disable-usage-stats"], timeout)
    if res.returncode != 0:
        raise RuntimeError(f"ray start --address failed:\n{res.stdout}\n{res.stderr}")


def stop_cluster(temp_dir: str, address: str | None = None, timeout: float = 30) -> int:
    """Stop only the processes of the cluster started with ``temp_dir`` (and GCS ``address``) — unlike
    ``ray stop``, which stops every Ray instance of the machine, and sparing whatever else names its temp dir
    (a ``tail -f`` of its logs, this command's callers). Its processes: Ray's own programs that name the cluster
    (GCS, raylets, dashboard, monitors) and their descendants (agents, workers); and the head's whole session
    when :func:`start_head` started it: ``ray start`` then runs as a session leader whose pid names the session
    folder (``<temp_dir>/session_<time>_<pid>``), and everything the head runs stays in that session. In three
    groups, as ``ray stop`` does; each gets SIGTERM and ``timeout / 3`` seconds before SIGKILL. Returns how many
    were signalled."""
    import importlib.util
    import signal

    marks = [str(temp_dir)] + ([f"--address={address}", f"--gcs-address={address}"] if address else [])
    procs: dict[int, tuple[int, str]] = {}
    sid: dict[int, int] = {}  # pid -> session id
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        procs[int(d.name)] = (int(stat[1]), cmd)
        sid[int(d.name)] = int(stat[3])
    me = os.getpid()
    spared = {me}  # this process and its ancestors (e.g. `timeout 60 python -m ... stop --temp-dir T`, whose
    pid = me       # command line names the temp dir too: killing it would kill this stop half-way)
    while pid in procs and procs[pid][0] not in spared and procs[pid][0] > 1:
        pid = procs[pid][0]
        spared.add(pid)
    ray_dir = str(Path(importlib.util.find_spec("ray").submodule_search_locations[0]))  # (ray not imported)

    def ray_program(cmd: str) -> bool:  # the GCS, raylet, dashboard, monitors, client server of this Ray
        head = " ".join(cmd.split()[:3])
        return ray_dir in head or " -m ray." in head

    daemons = {pid for pid, (_, cmd) in procs.items()
               if pid not in spared and ray_program(cmd) and any(m in cmd for m in marks)}
    made = {int(n) for n in (p.name.rsplit("_", 1)[1] for p in Path(temp_dir).glob("session_*")) if n.isdigit()}
    sessions = {sid[p] for p in daemons} & made - {0, 1}  # led by the `ray start` that made the session folder
    roots = daemons | {pid for pid in procs if sid[pid] in sessions and pid not in spared}
    victims, frontier = set(roots), set(roots)
    while frontier:  # and their descendants (dashboard modules, agents, workers)
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier and pid not in victims and pid not in spared}
        victims |= frontier
    # In Ray's own order (``ray stop``): the raylets first, then their agents and the other processes, the GCS
    # last. Signalled all at once, the raylet and the GCS wait on each other and ignore SIGTERM until killed.
    def bucket(pid: int) -> int:
        cmd = procs[pid][1]
        return 0 if "raylet/raylet" in cmd else 2 if "gcs/gcs_server" in cmd else 1

    for b in range(3):
        group = {pid for pid in victims if bucket(pid) == b}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in group:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (timeout / 3 if sig == signal.SIGTERM else 5)
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in group):
                time.sleep(0.1)
    return len(victims)


def stop(timeout: float = 60) -> None:
    """``ray stop --force``: every Ray instance of this machine. Prefer :func:`stop_cluster`."""
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


def dashboard_enabled() -> bool:
    """Whether ``clsvc run/serve/sweep`` start their local Ray with its dashboard: yes unless
    ``CLSVC_RAY_DASHBOARD=0`` (it costs ~2 s at start and a few processes on a small machine)."""
    return os.environ.get("CLSVC_RAY_DASHBOARD", "1").strip().lower() not in ("0", "false", "no", "off")


def init_local(log=print, **kw):
    """``ray.init`` of a new local Ray instance on loopback for the CLI (``clsvc run/serve/sweep`` without
    ``RAY_ADDRESS``), its dashboard on 127.0.0.1 (:func:`dashboard_enabled`) and its URL logged; ``kw`` go to
    ``ray.init``. Returns Ray's context."""
    import tempfile

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    dash = dashboard_enabled()
    ctx = ray.init(_node_ip_address=LOOPBACK, include_dashboard=dash, dashboard_host=LOOPBACK,
                   _temp_dir=tempfile.mkdtemp(prefix="clsvc-ray-", dir="/tmp"), **kw)
    if dash and getattr(ctx, "dashboard_url", None):
        log(f"Ray dashboard: http://{ctx.dashboard_url} (jobs, actors, logs, metrics; it asks for the Ray auth "
            f"token: `ray get-auth-token`; CLSVC_RAY_DASHBOARD=0 starts Ray without it)")
    return ctx


def ensure_ray(log=print, name: str = "clsvc") -> bool:
    """Connect to ``RAY_ADDRESS`` or start a local Ray on loopback (:func:`init_local`) unless Ray is initialised
    already (a ``ray job submit`` driver, a test's cluster); True when this call did it (then the caller shuts it
    down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], _node_ip_address=driver_node_ip(os.environ["RAY_ADDRESS"]))
    else:  # a local cluster on loopback
        init_local(log)  # with its dashboard on 127.0.0.1
    log(f"[{name}] ray {ray.__version__}: {ray.cluster_resources()}")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cl_service.on_ray.local", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("token", help="create the Ray auth token if token auth is on and none exists")
    s = sub.add_parser("start")
    s.add_argument("--temp-dir", default="/tmp/clsvc-ray")
    s.add_argument("--num-cpus", type=int, default=None)
    s.add_argument("--port", type=int, default=6379)
    t = sub.add_parser("stop", help="stop the cluster started with --temp-dir (only its processes)")
    t.add_argument("--temp-dir", default="/tmp/clsvc-ray")
    t.add_argument("--address", default=None, help="its GCS address, e.g. 127.0.0.1:6379")
    a = p.parse_args(argv)
    if a.cmd == "token":
        ensure_auth_token()
        return 0
    if a.cmd == "start":
        print(start_head(a.temp_dir, a.num_cpus, a.port))
    else:
        print(f"stopped {stop_cluster(a.temp_dir, a.address)} process(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
