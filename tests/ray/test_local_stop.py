"""stop_cluster stops the cluster's own processes: never a process that merely names its temp dir, nor its own
caller chain."""

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_stop_cluster_spares_its_callers_and_what_only_names_the_temp_dir(tmp_path):
    mark = str(tmp_path / f"clsvc-ray-{uuid.uuid4().hex[:8]}")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", mark])  # e.g. `tail -f` of a log
    try:
        time.sleep(0.5)
        # as cluster/local_demo.sh calls it: under `timeout`, whose command line names the temp dir too
        code = ("import sys; from cl_service.on_ray.local import stop_cluster; "
                "print('stopped', stop_cluster(sys.argv[1], timeout=10))")
        out = subprocess.run(["timeout", "30", sys.executable, "-c", code, mark], cwd=REPO, capture_output=True,
                             text=True, timeout=45)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "stopped 0"
        assert bystander.poll() is None  # not a process of the cluster: still running
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


def _alive_in(proc: Path, session: int) -> bool:
    """``/proc/<pid>`` is a live process of session ``session``."""
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3]) == session
    except (OSError, ValueError, IndexError):
        return False


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_stop_cluster_stops_a_real_head_in_rays_order_without_waiting_out_sigterm():
    """Signalled all at once, the raylet and the GCS waited on each other and ignored SIGTERM until the
    30 s deadline; in Ray's order (raylet, agents, GCS) each exits at its SIGTERM, in seconds. Only the head's
    processes are stopped: the session `ray start` led, named by the session folder."""
    import socket
    import tempfile

    from cl_service.on_ray.local import start_head, stop_cluster

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    tmp = tempfile.mkdtemp(prefix="clsvc-stop-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    bystander = subprocess.Popen(["tail", "-F", f"{tmp}/session_latest/logs/raylet.out"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:
            start_head(tmp, num_cpus=1, port=port, dashboard_port=free_port(), client_port=free_port(), timeout=90)
            (session,) = [int(p.name.rsplit("_", 1)[1]) for p in Path(tmp).glob("session_2*")]
            members = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _alive_in(p, session)}
        finally:
            t0 = time.monotonic()
            n = stop_cluster(tmp, f"127.0.0.1:{port}", timeout=45)  # 15 s of SIGTERM grace per group
            elapsed = time.monotonic() - t0
        leftover = subprocess.run(["pgrep", "-f", tmp], capture_output=True, text=True)
        assert leftover.stdout.split() == [str(bystander.pid)]  # the log reader is not the cluster's
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(timeout=10)
    assert len(members) >= 3 and n >= len(members)  # at least the GCS, the raylet and the dashboard
    assert not [p for p in members if Path(f"/proc/{p}").exists()]
    assert elapsed < 15, f"a group ignored SIGTERM and was killed after its grace period ({elapsed:.1f} s)"
