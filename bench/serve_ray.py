"""Two-stage serving at LLaVA-1.5-7B shapes through the Ray Serve gRPC path (Ingress -> Router -> Expert).

The same nine rank-64 experts (``--experts N``: more) + router adapter and the same requests as :mod:`bench.serve`
(random weights), laid out as a run results folder (``config.resolved.json``, ``base/``, ``adapters/``,
``routers/prototype/``, ``routers/knn/``)
that :func:`cl_service.on_ray.serve.build_app` serves unchanged. A local Ray on 127.0.0.1 runs the app with
the Router and the Expert replica sharing one GPU (``router.num_gpus=expert.num_gpus=0.5``); concurrent gRPC
clients (``cl_service.serve.client.Client``) drive it through Serve's gRPC proxy.

    python -m bench.serve_ray                     # H100: build, deploy, drive (~6 min)
    python -m bench.serve_ray --profile tiny --device cpu --batch 4 --clients 8 --seconds 5 --duration 4 \\
        --rate 2 --words 8                        # CPU smoke

Figures (``$OUT/serve_ray.json``), per router kind (``--kinds``: ``mllm``, ``knn``, ``prototype``): closed-loop requests/s with
``--clients`` concurrent clients, p50/p90/p99 latency at ``--rate`` req/s (open loop, arrival to answer),
the Expert's batch sizes, and a check that single requests through Serve give exactly the engine's answers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

for _k, _v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "token"}.items():  # read when ray is imported: loopback, token-auth clients
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
TOKEN = secrets.token_urlsafe(24)  # Serve's gRPC proxy binds all interfaces: never served open
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import POOL, bench_model, free_port, model_args, pct, pool, requests, start, write_json  # noqa: E402
from bench.serve import make_adapters  # noqa: E402
from cl_service.adapters.registry import finalize_adapter  # noqa: E402
from cl_service.engine.engine import Engine  # noqa: E402
from cl_service.routers.base import over_states  # noqa: E402
from cl_service.routers.nearest import NearestRouter  # noqa: E402
from cl_service.routers.prompt import Pool  # noqa: E402
from cl_service.routers.prototype import PrototypeRouter  # noqa: E402
from cl_service.routers.store import save_router  # noqa: E402


def make_run(mllm, root: Path, rank: int, targets: tuple[str, ...], words: int, experts_pool: Pool = POOL
             ) -> dict[str, Any]:
    """A results folder the Serve app loads: the base, the pool's experts (nine by default), the MLLM router of
    the last stage, and the prototype and knn routers fitted on 4 requests per expert. Also returns the
    engine over ``mllm``."""
    tasks = list(experts_pool.experts)
    t0 = time.perf_counter()
    mllm.save(root / "base")
    saved_s = time.perf_counter() - t0
    experts, router = make_adapters(mllm, root / "adapters" / "experts", rank, targets, experts_pool)
    last = f"stage-{len(tasks) - 1}-{tasks[-1]}"
    router_dir = root / "adapters" / "router" / last
    router_dir.parent.mkdir(parents=True)
    shutil.move(router, router_dir)
    finalize_adapter(router_dir, id=f"router:{last}", kind="router", task="*", description="MLLM router",
                     base="random", job_key="router")
    engine = Engine(mllm, fused_lora=True)
    engine.max_new_tokens, engine.router_max_new_tokens = 16, 1
    per_task = {e: requests(4, mllm.image_size, n_words=words, seed=10 + i) for i, e in enumerate(tasks)}
    proto = PrototypeRouter.fit(engine, per_task)
    save_router(proto, root / "routers" / "prototype" / last)
    knn = NearestRouter.fit(engine, per_task)
    save_router(knn, root / "routers" / "knn" / last)
    (root / "config.resolved.json").write_text(json.dumps({
        "tasks": tasks, "base": str(root / "base"), "dataset": "", "seed": 0,
        "config": {"eval": {"max_new_tokens": 16}, "router": {"max_new_tokens": 1}}}, indent=2))
    return {"experts": experts, "router": str(router_dir), "proto": proto, "knn": knn, "pool": experts_pool,
            "base_save_s": saved_s, "engine": engine}


def references(engine: Engine, run: dict[str, Any], reqs: list) -> dict[str, list]:
    """Single requests through the engine exactly as a Serve batch of one runs them (CLIP once, then the
    router, then the chosen expert): ``{kind: [(expert, answer)]}``."""
    out: dict[str, list] = {"mllm": [], "prototype": [], "knn": []}
    feature = {"prototype": run["proto"], "knn": run["knn"]}
    for s in reqs:
        vs = engine.vision_states([s])
        for kind in out:
            if kind == "mllm":
                e = engine.route_mllm([s], run["router"], run["pool"], vision_states=vs)[0].expert
            else:
                e = over_states(feature[kind], engine, vs).route([s])[0].expert
            out[kind].append((e, engine.answer_mixed([s], [run["experts"][e]], 16, vision_states=vs)[0]))
    return out


class Load:
    """gRPC clients over a few channels to Serve's proxy (loopback)."""

    def __init__(self, address: str, app: str, reqs: list, channels: int = 16, timeout: float = 300.0) -> None:
        from cl_service.serve.client import Client

        self.clients = [Client(address, token=TOKEN, application=app) for _ in range(channels)]
        self.clients[0].wait_ready(60)
        self.reqs, self.timeout = reqs, timeout

    def one(self, k: int, i: int, expert: str | None = None) -> Any:
        s = self.reqs[i % len(self.reqs)]
        return self.clients[k % len(self.clients)].predict(s.images, s.question, expert=expert, timeout=self.timeout)

    def burst(self, n: int) -> None:
        with ThreadPoolExecutor(n) as ex:
            list(ex.map(lambda i: self.one(i, i), range(n)))

    def closed_loop(self, clients: int, seconds: float, warm_s: float) -> dict[str, Any]:
        """``clients`` threads, each sending its next request when the last is answered; requests/s over the
        ``seconds`` after ``warm_s``."""
        t0 = time.perf_counter()
        stop = t0 + warm_s + seconds
        done: list[tuple[float, float, float, float]] = []  # (t_done, latency, route_ms, answer_ms)
        errors: list[str] = []
        lock = threading.Lock()

        def worker(k: int) -> None:
            i = k * 101
            while time.perf_counter() < stop:
                t1 = time.perf_counter()
                try:
                    r = self.one(k, i)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                    time.sleep(0.1)
                    continue
                t2 = time.perf_counter()
                with lock:
                    done.append((t2, t2 - t1, r.latency.route_ms, r.latency.answer_ms))
                i += 1

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=warm_s + seconds + self.timeout + 30)
        w0, w1 = t0 + warm_s, t0 + warm_s + seconds
        win = [d for d in done if w0 <= d[0] < w1]
        lat = [d[1] for d in win]
        return {"clients": clients, "req_per_s": len(win) / seconds, "requests_in_window": len(win),
                "p50_s": pct(lat, 50), "p99_s": pct(lat, 99), "errors": len(errors), "error_examples": errors[:3],
                "mean_route_ms": statistics.mean(d[2] for d in win) if win else None,
                "mean_answer_ms": statistics.mean(d[3] for d in win) if win else None}

    def fixed_rate(self, rate: float, duration: float) -> dict[str, Any]:
        """Open loop: a request every ``1/rate`` s for ``duration`` s; latency = arrival to answer."""
        n = int(rate * duration)
        lat: list[float] = [float("nan")] * n
        errors: list[str] = []

        def call(i: int, due: float) -> None:
            try:
                self.one(i, 7 * i)
                lat[i] = time.perf_counter() - due
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(8, int(rate * 30))) as ex:
            futs = []
            for i in range(n):
                due = t0 + i / rate
                time.sleep(max(0.0, due - time.perf_counter()))
                futs.append(ex.submit(call, i, due))
            for f in futs:
                f.result(timeout=self.timeout + 60)
        served = time.perf_counter() - t0
        ok = [x for x in lat if x == x]
        return {"rate": rate, "requests": n, "p50_s": pct(ok, 50), "p90_s": pct(ok, 90), "p99_s": pct(ok, 99),
                "achieved_req_per_s": len(ok) / served, "errors": len(errors), "error_examples": errors[:3]}

    def close(self) -> None:
        for c in self.clients:
            c.close()


def _stages(handles: dict[str, Any], t_from: float, t_to: float) -> dict[str, Any]:
    """Per deployment, over the batches that started in ``[t_from, t_to)``: mean batch size and the fraction of
    the window the replica spent computing (busy ~1: that stage limits throughput; both low: the requests
    are held up between them)."""
    out: dict[str, Any] = {}
    for name, h in handles.items():
        log = (h.batch_log.remote() if not isinstance(h, tuple) else h[0].batch_log.remote(h[1])).result(timeout_s=60)
        rows = [b for b in log if t_from <= b[0] < t_to]
        key = name.lower()
        out[f"{key}_batches"] = len(rows)
        out[f"{key}_mean_batch"] = statistics.mean(b[2] for b in rows) if rows else None
        out[f"{key}_busy"] = sum(min(b[1], t_to) - b[0] for b in rows) / (t_to - t_from)
        out[f"{key}_mean_batch_s"] = statistics.mean(b[1] - b[0] for b in rows) if rows else None
        if name == "Expert":  # continuous batching: the decode steps between the joins (empty otherwise)
            steps = [b for b in (h[0] if isinstance(h, tuple) else h).step_log.remote().result(timeout_s=60)
                     if t_from <= b[0] < t_to]
            if steps:
                out["expert_steps"] = len(steps)
                out["expert_mean_rows_per_step"] = statistics.mean(b[2] for b in steps)
                out["expert_step_ms"] = 1000 * statistics.mean(b[1] - b[0] for b in steps)
                out["expert_busy"] += sum(min(b[1], t_to) - b[0] for b in steps) / (t_to - t_from)
    return out


def _plan(args: Any) -> list[tuple[str, bool, bool]]:
    """``(router kind, colocate, continuous)`` per configuration to serve, in order."""
    if args.plan:
        out = []
        for entry in args.plan.split(","):
            kind, *flags = entry.strip().split("+")
            if set(flags) - {"colocate", "continuous"}:
                raise SystemExit(f"--plan {entry!r}: flags are +colocate and +continuous")
            out.append((kind, "colocate" in flags, "continuous" in flags))
        return out
    modes = {"false": [False], "true": [True], "both": [False, True]}
    return [(k, c, n) for k in args.kinds.split(",") for c in modes[args.colocate] for n in modes[args.continuous]]


def _stage_line(d: dict[str, Any]) -> str:
    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)
    line = ", ".join(f"{k} batch {f(d[f'{k}_mean_batch'], '.1f')} ({f(d[f'{k}_mean_batch_s'], '.2f')} s), "
                     f"busy {f(d[f'{k}_busy'], '.0%')}" for k in ("router", "expert"))
    if "expert_steps" in d:
        line += (f"; {d['expert_steps']} decode steps of {d['expert_mean_rows_per_step']:.1f} rows, "
                 f"{d['expert_step_ms']:.1f} ms each")
    return line


def _probe_warnings(temp_dir: str) -> int:
    """How many times Serve's request router gave up waiting for a replica's queue length (it then backs off
    before sending): counted in the session's logs."""
    n = 0
    for f in Path(temp_dir).glob("session_latest/logs/**/*"):
        if f.is_file() and f.suffix in (".log", ".err", ".out"):
            n += f.read_text(errors="replace").count("Failed to get queue length")
    return n


def _log_tail(temp_dir: str, out: Path) -> None:
    """The replicas' logs (the last 4 kB of each serve/worker log with an error) into one file under $OUT."""
    parts = []
    for f in sorted(Path(temp_dir).glob("session_latest/logs/**/*")):
        if f.is_file() and f.suffix in (".log", ".err", ".out"):
            text = f.read_text(errors="replace")
            if "Error" in text or "Traceback" in text or f.parent.name == "serve":
                parts.append(f"===== {f.name}\n{text[-4000:]}")
    out.write_text(portable("\n".join(parts)[-2_000_000:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(ap)
    ap.add_argument("--batch", type=int, default=64, help="router/expert max_batch_size (@serve.batch)")
    ap.add_argument("--batch-wait-ms", type=float, default=25.0)
    ap.add_argument("--clients", type=int, default=192, help="concurrent clients of the closed loop")
    ap.add_argument("--seconds", type=float, default=30.0, help="closed-loop measurement window")
    ap.add_argument("--warm", type=float, default=10.0, help="closed-loop seconds before the window")
    ap.add_argument("--rate", default="10", help="arrival rates of the latency runs (req/s, comma-separated)")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--words", type=int, default=54)
    ap.add_argument("--kinds", default="mllm,knn", help="router kinds, comma-separated: mllm, prototype, knn")
    ap.add_argument("--experts", type=int, default=9, help="experts in the run (9: the bench's nine domains)")
    ap.add_argument("--work", default=None, help="where the results folder is written (default: a temp dir)")
    ap.add_argument("--no-share-vision", action="store_true", help="each stage runs CLIP itself")
    ap.add_argument("--colocate", default="false",
                    help="serve colocate: false, true, or both (each router kind twice: separate, then one replica)")
    ap.add_argument("--continuous", default="false",
                    help="serve continuous (stage two joins the running decode): false, true, or both")
    ap.add_argument("--plan", default=None,
                    help="exact configurations instead of --kinds x --colocate x --continuous, comma-separated "
                         "KIND[+colocate][+continuous], e.g. mllm+continuous,knn+colocate+continuous")
    ap.add_argument("--deploy-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out, res = start(args, "serve_ray.json")
    cuda = args.device == "cuda"

    def save() -> None:
        write_json(out, res)

    t0 = time.perf_counter()
    mcfg, mllm = bench_model(args.profile, args.device)
    root = Path(args.work or tempfile.mkdtemp(prefix="clsvc-serve-ray-")) / "run"
    root.mkdir(parents=True)
    run = make_run(mllm, root, args.rank, tuple(args.targets.split(",")), args.words, pool(args.experts))
    res["experts"] = args.experts
    reqs = requests(4 * args.batch, mcfg.image_size, n_words=args.words)
    engine = run.pop("engine")
    refs = references(engine, run, reqs[:4])
    res["setup_s"] = time.perf_counter() - t0
    res["base_save_s"] = run["base_save_s"]
    print(f"run folder ready in {res['setup_s']:.0f} s (base saved in {run['base_save_s']:.0f} s)", flush=True)
    del engine, mllm, run
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    import ray
    from ray import serve

    from cl_service.on_ray import serve_start as clserve
    from cl_service.on_ray.serve_start import _bounded
    from cl_service.serve.config import load_serve_cfg

    tmp = tempfile.mkdtemp(prefix="clsvc-ray-", dir="/tmp")
    pypath = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count() if cuda else 0,
             _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pypath, "TOKENIZERS_PARALLELISM": "false"}})
    gpus = 0.5 if cuda else 0.0
    cpus = 2 if (os.cpu_count() or 1) >= 8 else 0.2
    runs: dict[str, Any] = {}
    res["serve"] = runs

    def measure(kind: str, cfg: Any, r: dict[str, Any]) -> None:
        t1 = time.perf_counter()
        clserve.start(cfg, TOKEN, timeout_s=args.deploy_timeout)
        r["deploy_s"] = time.perf_counter() - t1
        print(f"[{kind}] app RUNNING in {r['deploy_s']:.0f} s", flush=True)
        load = Load(f"127.0.0.1:{cfg.grpc_port}", cfg.app_name, reqs)
        # Exactness: one request at a time is a Serve batch of one, computed as the engine does.
        got = [(x.expert, x.answer) for x in (load.one(0, i) for i in range(4))]
        ref = refs[cfg.router_kind]
        r["single_requests_equal_engine"] = got == [tuple(x) for x in ref]
        r["single_routes_equal_engine"] = [e for e, _ in got] == [x[0] for x in ref]
        r["single_requests"] = {"serve": got, "engine": ref}
        t1 = time.perf_counter()
        load.burst(2 * args.batch)  # full batches in both replicas once (allocations, kernels)
        r["warm_burst_s"] = time.perf_counter() - t1
        if cfg.colocate:  # one Stages deployment keeps both stages' batch logs
            both = serve.get_deployment_handle("Stages", app_name=cfg.app_name)
            handles = {st: (both, st) for st in ("Router", "Expert")}
        else:
            handles = {st: serve.get_deployment_handle(st, app_name=cfg.app_name) for st in ("Router", "Expert")}
        probes0 = _probe_warnings(tmp)
        t_from = time.time() + args.warm
        r["closed_loop"] = load.closed_loop(args.clients, args.seconds, args.warm)
        c = r["closed_loop"]
        c.update(_stages(handles, t_from, t_from + args.seconds))
        c["queue_probe_timeouts"] = _probe_warnings(tmp) - probes0
        print(f"[{kind}] closed loop {args.clients} clients: {c['req_per_s']:.2f} req/s, p50 {c['p50_s']:.2f} s, "
              f"{_stage_line(c)}, probe timeouts {c['queue_probe_timeouts']}, errors {c['errors']}, "
              f"exact singles {r['single_requests_equal_engine']} (routes {r['single_routes_equal_engine']})", flush=True)
        save()
        for rate in [float(x) for x in args.rate.split(",")]:
            time.sleep(2.0)
            probes0, t_from = _probe_warnings(tmp), time.time()
            f = load.fixed_rate(rate, args.duration)
            f.update(_stages(handles, t_from, time.time()))
            f["queue_probe_timeouts"] = _probe_warnings(tmp) - probes0
            r[f"fixed_rate@{rate:g}"] = f
            print(f"[{kind}] fixed rate {rate:g} req/s: p50 {f['p50_s']:.2f} s p90 {f['p90_s']:.2f} s "
                  f"p99 {f['p99_s']:.2f} s, {_stage_line(f)}, probe timeouts {f['queue_probe_timeouts']}, "
                  f"errors {f['errors']}", flush=True)
            save()
        load.close()
        serve.delete(cfg.app_name)
        if cuda:  # the replicas' GPU memory goes back before the next app loads
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and torch.cuda.mem_get_info()[0] < 0.9 * torch.cuda.mem_get_info()[1]:
                time.sleep(1.0)

    grpc_port, http_port = free_port(), free_port()  # Serve's proxies start once, with the first app
    failed = []
    try:
        for kind, colocate, continuous in _plan(args):
            name = kind + ("-colocated" if colocate else "") + ("-continuous" if continuous else "")
            cfg = load_serve_cfg(None, [
                f"results={root}", f"grpc_port={grpc_port}", f"http_port={http_port}", f"router_kind={kind}",
                "watch_s=0", f"max_loaded_adapters={max(32, args.experts + 1)}", f"continuous={continuous}",
                f"share_vision_states={not args.no_share_vision}", f"colocate={colocate}", f"app_name=clsvc-{name}",
                f"route_prefix=/clsvc-{name}", "request_timeout_s=300", f"ingress_num_cpus={min(cpus, 1)}",
                *[f"{st}.{k}={v}" for st in ("router", "expert") for k, v in (
                    ("num_gpus", gpus), ("num_cpus", cpus), ("max_batch_size", args.batch),
                    ("batch_wait_ms", args.batch_wait_ms), ("torch_threads", 4))]])
            r: dict[str, Any] = {"router_kind": kind, "colocate": colocate, "continuous": continuous}
            runs[name] = r
            try:
                measure(name, cfg, r)
            except Exception as e:  # noqa: BLE001 - recorded; the next router kind still runs
                r["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                failed.append(name)
                print(f"[{name}] FAILED: {r['error'][:500]}", flush=True)
                _log_tail(tmp, out.with_name(f"serve_ray_logs_{name}.txt"))
                _bounded(lambda: serve.delete(cfg.app_name), 60)
            save()
        if failed:
            raise RuntimeError(f"router kinds failed: {failed}")
    finally:
        save()
        _bounded(serve.shutdown, 60)
        _bounded(ray.shutdown, 60)
        res["total_s"] = time.perf_counter() - t0
        save()


if __name__ == "__main__":
    main()
