"""Load test of a served run over gRPC, loopback only: N concurrent clients for M seconds (bounded).

    # against a running `clsvc serve --results runs/dcl-mini`:
    python bench/serve_load.py --results runs/dcl-mini --clients 8 --seconds 30
    # self-contained: start a local Ray + the Serve app first, shut both down after
    python bench/serve_load.py --results runs/dcl-mini --serve --clients 8 --seconds 30 [serve key=value ...]

Each client cycles through the run's test items (all tasks). Every answer is compared with the answer the
run's offline evaluation wrote for the same item (``predictions/<method>/stage-<last>/<task>.jsonl``): the
expert, the router's raw output and the text must be equal. Prints requests, errors, mismatches, p50/p90/p99
latency and throughput (also as JSON with ``--json``); exits non-zero on any error or mismatch.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.paths import portable  # noqa: E402


def offline_answers(results: Path, method: str) -> tuple[str, dict[str, dict]]:
    """The last stage's offline predictions of ``method``: ``(stage folder name, {question_id: record})``."""
    root = results / "predictions" / method
    stages = sorted((p for p in root.glob("stage-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    if not stages:
        raise SystemExit(f"no offline predictions under {root}")
    out = {}
    for f in sorted(stages[-1].glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[r["question_id"]] = r
    return stages[-1].name, out


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="the served run's results folder")
    p.add_argument("--address", default="127.0.0.1:9000")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests in total")
    p.add_argument("--method", default="mrlora", help="offline predictions to compare with")
    p.add_argument("--warmup", type=int, default=4, help="requests before the clock starts")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline")
    p.add_argument("--retries", type=int, default=None, help="retries of UNAVAILABLE per request (default: the "
                   "client's; 0 = none): every retry is counted in the figures")
    p.add_argument("--token-env", default="CLSVC_TOKEN")
    p.add_argument("--serve", action="store_true", help="start a local Ray and the app first (then stop them)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="ServeCfg overrides with --serve")
    a = p.parse_args(argv)
    if not _loopback(a.address):
        raise SystemExit(f"{a.address} is not a loopback address: this load test only runs on loopback")
    results = Path(a.results).resolve()
    stage, offline = offline_answers(results, a.method)

    from cl_service.data.shards import ShardDataset
    from cl_service.serve.client import Client

    from cl_service.resolved import read_resolved

    resolved = read_resolved(results)
    ds = ShardDataset(resolved["dataset"])
    items = [s for t in resolved["tasks"] for s in ds.iter_samples(t, "test") if s.id in offline]
    if not items:
        raise SystemExit("no test item of the run has an offline prediction")

    cleanup = None
    if a.serve:
        cleanup = _start_local(results, a.address, a.overrides)
    try:
        token = os.environ.get(a.token_env) or None
        retry = {} if a.retries is None else {"retries": a.retries}
        clients = [Client(a.address, token=token, **retry) for _ in range(a.clients)]
        clients[0].wait_ready(60)
        for i in range(a.warmup):
            clients[0].predict(items[i % len(items)].images, items[i % len(items)].question, timeout=a.timeout)
        lat: list[float] = []
        errors: list[str] = []
        mismatches: list[str] = []
        lock = threading.Lock()
        count = [0]
        deadline = time.monotonic() + a.seconds

        def worker(k: int) -> None:
            i = k * 7919  # spread the clients over the items
            while time.monotonic() < deadline:
                with lock:
                    if count[0] >= a.max_requests:
                        return
                    count[0] += 1
                s = items[i % len(items)]
                i += 1
                t0 = time.perf_counter()
                try:
                    r = clients[k].predict(s.images, s.question, timeout=a.timeout)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{s.id}: {getattr(e, 'code', lambda: type(e).__name__)()}: "
                                      f"{getattr(e, 'details', lambda: str(e))()}")
                    continue
                ms = (time.perf_counter() - t0) * 1000
                ref = offline[s.id]
                got = (r.answer, r.expert, r.router.raw_output)
                want = (ref["text"], ref["metadata"]["expert"], ref["metadata"]["router_raw"])
                with lock:
                    lat.append(ms)
                    if got != want:
                        mismatches.append(f"{s.id}: live {got} != offline {want}")

        t_start = time.monotonic()
        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(a.seconds + a.timeout + 30)
        wall = time.monotonic() - t_start
        retried = sum(c.retried for c in clients)
        for c in clients:
            c.close()
    finally:
        if cleanup:
            cleanup()
    arr = np.array(lat) if lat else np.array([float("nan")])
    fig = {"address": a.address, "clients": a.clients, "seconds": round(wall, 2), "requests": len(lat) + len(errors),
           "ok": len(lat), "errors": len(errors), "retries": retried, "mismatches": len(mismatches), "compared_with": f"{a.method}/{stage}",
           "distinct_items": len(items), "p50_ms": round(float(np.percentile(arr, 50)), 1),
           "p90_ms": round(float(np.percentile(arr, 90)), 1), "p99_ms": round(float(np.percentile(arr, 99)), 1),
           "throughput_rps": round(len(lat) / wall, 2)}
    print(json.dumps(fig, indent=2))
    for line in (errors[:5] + mismatches[:5]):
        print("  " + line, file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(portable(fig), indent=2))
    return 1 if errors or mismatches or not lat else 0


def _start_local(results: Path, address: str, overrides: list[str]):
    """A local Ray on loopback with the app deployed on ``address``'s port; returns the stop function."""
    import tempfile

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from cl_service.on_ray.serve_start import start
    from cl_service.serve.config import load_serve_cfg

    cfg = load_serve_cfg(None, [f"results={results}", f"grpc_port={address.rsplit(':', 1)[1]}", *overrides])
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="clsvc-load-", dir="/tmp"))
    t0 = time.perf_counter()
    start(cfg, os.environ.get(cfg.auth_token_env) or None, timeout_s=300)
    print(f"app RUNNING in {time.perf_counter() - t0:.1f} s: {cfg.router.replicas} router / {cfg.expert.replicas} "
          f"expert replica(s), batch {cfg.router.max_batch_size}/{cfg.expert.max_batch_size}", file=sys.stderr)

    def stop() -> None:
        serve.shutdown()
        ray.shutdown()

    return stop


if __name__ == "__main__":
    sys.exit(main())
