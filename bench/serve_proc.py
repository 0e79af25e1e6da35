"""`clsvc serve` in a child process for the serving benches (:mod:`bench.serve_faults`, :mod:`bench.soak`).

The child starts its own Ray on loopback (``RAY_ADDRESS`` unset, no dashboard) with a fresh random shared
token and free gRPC/HTTP ports. Its Serve replicas are found among the child's descendants by their process
title (``ray::ServeReplica:<app>:<deployment>``), so a bench never touches another Ray on the machine (a test
run's app is also called ``clsvc``).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import free_port  # noqa: F401  (re-exported for the benches)

REPO = Path(__file__).resolve().parent.parent


def test_items(results: Path) -> list[Any]:
    """The run's test samples of every task, in stream order (``Sample`` objects: ``.images``, ``.question``)."""
    from cl_service.data.shards import ShardDataset

    from cl_service.resolved import read_resolved

    resolved = read_resolved(results)
    ds = ShardDataset(resolved["dataset"])
    return [s for t in resolved["tasks"] for s in ds.iter_samples(t, "test")]


class ServeProcess:
    """``clsvc serve --results RESULTS`` in a child process; a context manager (stopped on exit, bounded)."""

    def __init__(self, results: Path, overrides: list[str] = (), ready_timeout: float = 300.0,
                 log_file: Path | None = None) -> None:
        self.results = Path(results).resolve()
        self.port, self.http_port = free_port(), free_port()
        self.token = secrets.token_urlsafe(24)
        self.app = "clsvc"
        self.overrides = list(overrides)
        self.ready_timeout = ready_timeout
        self.log_file = log_file
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kw: Any):
        from cl_service.serve.client import Client

        return Client(self.address, token=self.token, application=self.app, **kw)

    def __enter__(self) -> "ServeProcess":
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(CLSVC_TOKEN=self.token, CLSVC_RAY_DASHBOARD="0", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "cl_service.cli", "serve", "--results", str(self.results), "--port",
               str(self.port), "--http-port", str(self.http_port), *self.overrides]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        ready = threading.Event()

        def read() -> None:
            out = open(self.log_file, "a") if self.log_file else None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if out:
                    out.write(line)
                    out.flush()
                if line.startswith("serving "):
                    ready.set()
            if out:
                out.close()

        threading.Thread(target=read, daemon=True).start()
        deadline = t0 + self.ready_timeout + 30
        while not ready.wait(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.lines[-20:])
                self.__exit__()
                raise RuntimeError(f"clsvc serve did not become ready (exit {self.proc.returncode}):\n{tail}")
        self.ready_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc: Any) -> None:
        """SIGTERM (clsvc serve shuts Serve and its Ray down, bounded), then SIGKILL of its process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(150)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this bench started (start_new_session)
            self.proc.wait(30)

    # ------------------------------------------------------------------ the app's processes
    def _titled(self, prefix: str) -> list[tuple[psutil.Process, str]]:
        """``(process, title)`` of the child's descendants whose title starts with ``prefix``."""
        out = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                title = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if title.startswith(prefix):
                out.append((p, title))
        return out

    def replicas(self, deployment: str | None = None) -> list[psutil.Process]:
        """Live replica processes of this child's app (``deployment``: ``Router``, ``Expert``, ``Ingress``; None:
        all), found among the child's descendants by their title."""
        return [p for p, _ in self._titled(f"ray::ServeReplica:{self.app}:" + (deployment or ""))]

    def replica_rss(self) -> dict[str, float]:
        """``{deployment: RSS in MiB}`` summed over its live replicas, and ``Proxy``: Serve's proxy actor."""
        out: dict[str, float] = {}
        prefix = f"ray::ServeReplica:{self.app}:"
        found = [(re.match(r"\w+", t[len(prefix):]), p) for p, t in self._titled(prefix)]
        found += [(re.match(r"\w+", "Proxy"), p) for p, _ in self._titled("ray::ProxyActor")]
        for m, p in found:
            try:
                if m:
                    out[m.group(0)] = out.get(m.group(0), 0.0) + p.memory_info().rss / 2 ** 20
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def kill_replica(self, deployment: str, timeout: float = 30.0) -> int:
        """SIGKILL one live replica process of ``deployment`` (a crash: Serve's controller replaces it); its pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.replicas(deployment)
            if found:
                found[0].kill()
                found[0].wait(10)
                return found[0].pid
            time.sleep(0.2)
        raise RuntimeError(f"no live {deployment} replica of this app within {timeout:.0f} s")
