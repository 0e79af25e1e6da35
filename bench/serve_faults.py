"""A Serve replica killed under a bounded load: requests failed, requests retried, recovery time (loopback only).

    python bench/serve_faults.py --results runs/dcl-mini --kill Expert,Router --clients 8 --requests 240 \\
        --json bench/results/local/serve_faults.json [serve key=value ...]

Starts ``clsvc serve`` on the run (a child process with its own Ray on loopback, :mod:`bench.serve_proc`),
answers every test item once (the reference), then for each deployment in ``--kill`` runs one round: half of
``--clients`` threads send ``--requests`` Predicts in all through a client that retries ``UNAVAILABLE``
(:class:`~cl_service.serve.client.Client`, jittered exponential backoff), the other half the same requests
through a client that never retries (pausing ``--raw-pause`` s after a failure) for as long as the retrying
ones run; once ``--kill-after`` requests are answered, one replica process of the deployment gets SIGKILL
(a crash; Serve's controller starts a new one), timed to find requests inside that deployment. Per round: raw failures by status, retries and failures of
the retrying client (the claim: zero failures), answers that differ from the reference (the claim: none),
recovery time (kill -> first answer to a raw request sent after the kill) and the slowest retried call.
Writes JSON (``--json``), prints a one-line summary per round; exits 1 when the claim fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.paths import portable  # noqa: E402

from bench.serve_proc import ServeProcess, test_items  # noqa: E402


def _round(sp: ServeProcess, deployment: str, items: list, ref: dict, a: argparse.Namespace) -> dict:
    import grpc

    n_raw = a.clients // 2
    n_retry = a.clients - n_raw
    retrying = sp.client(**{k: v for k, v in (("retries", a.retries), ("retry_deadline_s", a.retry_deadline))
                            if v is not None})
    raw = sp.client(retries=0)
    lock = threading.Condition()
    calls: list[dict] = []  # one per call: kind, start, end, ok, code, item, route_ms, answer_ms
    done = threading.Event()
    remaining = [a.requests]

    def call(client, kind: str, s) -> bool:
        t0 = time.monotonic()
        try:
            r = client.predict(s.images, s.question, timeout=a.timeout)
            rec = {"ok": True, "code": "OK", "same": (r.answer, r.expert, r.router.raw_output) == ref[s.id],
                   "route_ms": r.latency.route_ms, "answer_ms": r.latency.answer_ms}
        except grpc.RpcError as e:
            rec = {"ok": False, "code": e.code().name, "details": (e.details() or "")[:200]}
        rec.update(kind=kind, start=t0, end=time.monotonic(), item=s.id)
        with lock:
            calls.append(rec)
            lock.notify_all()
        return rec["ok"]

    def retry_worker(k: int) -> None:
        i = k * 7
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            call(retrying, "retrying", items[i % len(items)])
            i += 1

    def raw_worker(k: int) -> None:
        i = k * 11 + 3
        while not done.is_set():
            if not call(raw, "raw", items[i % len(items)]):
                done.wait(a.raw_pause)
            i += 1

    killed: dict = {}

    def killer() -> None:
        """After ``kill_after`` answers, at the next answer + an offset that puts the requests sent right after it
        inside the target's stage (clients in step send together): half the median routing time for the Router
        (and the Ingress), the routing time + half the answering time for the Expert."""
        with lock:
            ok = lock.wait_for(lambda: sum(c["ok"] for c in calls) >= a.kill_after, a.timeout * 4)
            if not ok:
                return
            n = len(calls)
            lock.wait_for(lambda: len(calls) > n and calls[-1]["ok"], a.timeout)
            route = statistics.median(c["route_ms"] for c in calls if c["ok"]) / 1000
            answer = statistics.median(c["answer_ms"] for c in calls if c["ok"]) / 1000
        killed["offset_s"] = round(route + answer / 2 if deployment == "Expert" else route / 2, 3)
        time.sleep(killed["offset_s"])
        killed["t"] = time.monotonic()
        killed["pid"] = sp.kill_replica(deployment)

    with ThreadPoolExecutor(a.clients + 1) as pool:
        kill = pool.submit(killer)
        raws = [pool.submit(raw_worker, k) for k in range(n_raw)]
        retries = [pool.submit(retry_worker, k) for k in range(n_retry)]
        for f in retries:
            f.result(timeout=a.requests * a.timeout)
        done.set()
        for f in raws + [kill]:
            f.result(timeout=a.timeout + 60)
    retrying.close()
    raw.close()
    if "t" not in killed:
        raise RuntimeError(f"round {deployment}: fewer than {a.kill_after} answers, no kill")
    tk = killed["t"]
    by = {k: [c for c in calls if c["kind"] == k] for k in ("raw", "retrying")}
    raw_fail = [c for c in by["raw"] if not c["ok"]]
    codes: dict[str, int] = {}
    for c in raw_fail:
        codes[c["code"]] = codes.get(c["code"], 0) + 1
    after = [c["end"] for c in by["raw"] if c["ok"] and c["start"] > tk]
    spanning = [c["end"] - c["start"] for c in by["retrying"] if c["start"] <= tk <= c["end"]]
    if a.debug:
        for c in calls:
            if c["start"] <= tk + 1 and c["end"] >= tk - 1:
                print(f"  {c['kind']:8s} {c['start'] - tk:+7.3f} .. {c['end'] - tk:+7.3f} {c['code']} "
                      f"route {c.get('route_ms', 0):.0f} answer {c.get('answer_ms', 0):.0f}", file=sys.stderr)
    return {
        "deployment": deployment, "killed_pid": killed["pid"], "kill_offset_s": killed["offset_s"],
        "retrying": {"requests": len(by["retrying"]), "failed": sum(not c["ok"] for c in by["retrying"]),
                     "retries": retrying.retried, "retried_calls": retrying.retried_calls,
                     "mismatches": sum(c["ok"] and not c["same"] for c in by["retrying"]),
                     "slowest_call_across_kill_s": round(max(spanning, default=0.0), 2),
                     "failures": sorted({f"{c['code']}: {c['details']}" for c in by["retrying"] if not c["ok"]})[:5]},
        "raw": {"requests": len(by["raw"]), "failed": len(raw_fail), "codes": codes,
                "mismatches": sum(c["ok"] and not c["same"] for c in by["raw"]),
                "failed_window_s": round(max((c["end"] for c in raw_fail), default=tk) - tk, 2),
                "examples": sorted({f"{c['code']}: {c['details']}" for c in raw_fail})[:3]},
        "recovery_s": round(min(after) - tk, 2) if after else None,
        "wall_s": round(max(c["end"] for c in calls) - min(c["start"] for c in calls), 1),
    }


def summary(r: dict) -> str:
    rt, raw = r["retrying"], r["raw"]
    return (f"{r['deployment']} replica killed: retrying client {rt['requests']} requests, {rt['failed']} failed, "
            f"{rt['retries']} retries ({rt['retried_calls']} calls), {rt['mismatches']} mismatches; raw client "
            f"{raw['failed']}/{raw['requests']} failed {raw['codes']}; recovery {r['recovery_s']} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="a finished run's results folder")
    p.add_argument("--kill", default="Expert,Router", help="deployments to kill a replica of, one round each "
                   "(Router, Expert; Ingress too, though the proxy answers its loss with INTERNAL)")
    p.add_argument("--clients", type=int, default=8, help="client threads (half retrying, half raw)")
    p.add_argument("--requests", type=int, default=240, help="requests of the retrying clients per round")
    p.add_argument("--kill-after", type=int, default=16, help="answers in a round before the kill")
    p.add_argument("--items", type=int, default=24, help="distinct test items used")
    p.add_argument("--timeout", type=float, default=60.0, help="per-attempt deadline")
    p.add_argument("--retries", type=int, default=None, help="the retrying client's retries (default: Client's)")
    p.add_argument("--retry-deadline", type=float, default=None, help="its retry deadline, s (default: Client's)")
    p.add_argument("--raw-pause", type=float, default=0.25, help="the raw client's pause after a failure")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--debug", action="store_true", help="print the calls around each kill")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="ServeCfg overrides for clsvc serve")
    a = p.parse_args(argv)
    results = Path(a.results).resolve()
    everything = test_items(results)
    items = everything[:: max(1, len(everything) // a.items)][: a.items]
    fig: dict = {"results": str(results), "args": vars(a)}
    with ServeProcess(results, a.overrides) as sp:
        fig["ready_s"] = round(sp.ready_s, 1)
        with sp.client() as c:
            with ThreadPoolExecutor(4) as pool:
                refs = list(pool.map(lambda s: c.predict(s.images, s.question, timeout=a.timeout), items))
        ref = {s.id: (r.answer, r.expert, r.router.raw_output) for s, r in zip(items, refs)}
        fig["rounds"] = []
        for dep in [d.strip() for d in a.kill.split(",") if d.strip()]:
            r = _round(sp, dep, items, ref, a)
            print(summary(r), flush=True)
            fig["rounds"].append(r)
        fig["replica_rss_mib_end"] = sp.replica_rss()
    print(json.dumps(fig, indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(portable(fig), indent=2))
    bad = [r for r in fig["rounds"] if r["retrying"]["failed"] or r["retrying"]["mismatches"] or r["raw"]["mismatches"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
