"""Bounded soak of `clsvc serve` on loopback: a fixed request rate for N minutes, a hot add in the middle.

    python bench/soak.py --results runs/dcl-mini --minutes 10 --rate 4 --json bench/results/local/soak.json \\
        [serve key=value ...]

The run is copied to a temporary folder with its last task's expert held back (so its latest router is not
usable yet either: the catalog serves the stage before). ``clsvc serve`` (a child process with its own Ray on
loopback, :mod:`bench.serve_proc`) serves the copy while an open-loop client offers ``--rate`` requests/s over
the run's test items (all tasks; latency runs from the scheduled arrival, so a server that falls behind shows
it). Half-way, the held-back expert is published into the copy the way a run publishes (a staging folder,
then an atomic rename); the soak waits until ``ListExperts`` lists it, then checks that requests naming it are
answered by it. Every answer must equal the answer the same item got at the start of its phase (before the hot
add, or once it is live; requests between publication and visibility are only checked for errors).
Every ``--sample-s`` seconds the RSS of the app's replicas (and Serve's proxy) is sampled.

Prints a per-minute table (requests, errors, p50/p99 latency, RSS) and the totals; writes JSON with
``--json``. Exits 1 on any error, mismatch or a hot add that did not go live.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.paths import portable  # noqa: E402

from bench.serve_proc import ServeProcess, test_items  # noqa: E402


def held_back_copy(results: Path, dest: Path) -> tuple[Path, str, Path]:
    """``results`` copied to ``dest`` without the last task's expert (kept aside): ``(run copy, task, expert)``."""
    from cl_service.resolved import RESOLVED, read_resolved

    resolved = read_resolved(results)  # base and dataset as absolute paths: the copy lies elsewhere
    task = resolved["tasks"][-1]
    run = dest / results.name
    run.mkdir(parents=True)
    (run / RESOLVED).write_text(json.dumps(resolved, indent=2))
    for sub in ("adapters", "routers"):
        if (results / sub).is_dir():
            shutil.copytree(results / sub, run / sub)
    held = dest / "held" / task
    held.parent.mkdir()
    shutil.move(str(run / "adapters" / "experts" / task), held)
    return run, task, held


def publish(held: Path, final: Path) -> None:
    """Publish the expert folder ``held`` at ``final`` as a run does: a hidden staging folder, then a rename."""
    from cl_service.adapters.registry import commit_dir, publish_dir

    stage = publish_dir(final)
    for f in held.iterdir():
        shutil.copy2(f, stage / f.name)
    commit_dir(stage, final)


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 1) if xs else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="runs/dcl-mini", help="a finished run's results folder (not modified)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second offered (open loop)")
    p.add_argument("--items", type=int, default=40, help="distinct test items cycled through")
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--settle-s", type=float, default=60.0, help="RSS growth is also reported from this time on "
                   "(after warm-up), with a linear fit in MiB/hour")
    p.add_argument("--timeout", type=float, default=60.0, help="per-attempt deadline of a request")
    p.add_argument("--workers", type=int, default=64, help="most requests in flight (client threads)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="ServeCfg overrides for clsvc serve")
    a = p.parse_args(argv)
    results = Path(a.results).resolve()
    everything = test_items(results)
    items = everything[:: max(1, len(everything) // a.items)][: a.items]
    tmp = Path(tempfile.mkdtemp(prefix="clsvc-soak-"))
    try:
        run, task, held = held_back_copy(results, tmp)
        with ServeProcess(run, a.overrides) as sp, sp.client() as client:
            fig = _soak(sp, client, run, task, held, items, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_table(fig)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(portable(fig), indent=2))
    t = fig["totals"]
    return 1 if t["errors"] or t["mismatches"] or not fig["hot_add"]["live"] or not fig["hot_add"]["answered"] else 0


def _soak(sp: ServeProcess, client, run: Path, task: str, held: Path, items: list, a: argparse.Namespace) -> dict:
    import grpc

    def ask(s, expert=None):
        r = client.predict(s.images, s.question, expert=expert, timeout=a.timeout)
        return r.answer, r.expert, r.router.raw_output

    with ThreadPoolExecutor(4) as pool:  # phase A's reference answers (and the warm-up)
        refs = {"A": dict(zip([s.id for s in items], pool.map(ask, items)))}
    before = [e.task for e in client.list_experts().experts]
    lock = threading.Lock()
    recs: list[dict] = []
    mem: list[dict] = []
    hot: dict = {"task": task, "experts_before": before, "live": False, "answered": False}
    duration = a.minutes * 60
    t0 = time.monotonic() + 1.0
    stop = threading.Event()

    def one(k: int, sched: float) -> None:
        s = items[k % len(items)]
        start = time.monotonic()
        try:
            got = ask(s)
            rec = {"ok": True, "got": got}
        except grpc.RpcError as e:
            rec = {"ok": False, "error": f"{e.code().name}: {(e.details() or '')[:160]}"}
        rec.update(k=k, item=s.id, sched=sched - t0, start=start - t0, ms=(time.monotonic() - sched) * 1000)
        with lock:
            recs.append(rec)

    def sampler() -> None:
        while True:
            mem.append({"t": round(time.monotonic() - t0, 1), **sp.replica_rss()})
            if stop.wait(a.sample_s):
                return

    def hot_add() -> None:
        if stop.wait(max(0.0, t0 + duration / 2 - time.monotonic())):
            return
        hot["published_at"] = round(time.monotonic() - t0, 2)
        publish(held, run / "adapters" / "experts" / task)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stop.is_set():
            now = [e.task for e in client.list_experts().experts]
            if task in now:
                hot.update(live=True, visible_at=round(time.monotonic() - t0, 2), experts_after=now)
                break
            time.sleep(0.25)
        if not hot["live"]:
            return
        hot["visible_after_s"] = round(hot["visible_at"] - hot["published_at"], 2)
        mine = [s for s in items if s.task == task] or items[:4]
        named = [ask(s, expert=task) for s in mine]
        hot["answered"] = all(e == task for _, e, _ in named)
        hot["named_requests"] = len(named)
        with ThreadPoolExecutor(4) as pool:  # phase B's reference answers
            refs["B"] = dict(zip([s.id for s in items], pool.map(ask, items)))
        hot["routed_to_new_expert"] = sum(refs["B"][s.id][1] == task for s in mine)
        hot["items_of_task"] = len(mine)

    threads = [threading.Thread(target=f, daemon=True) for f in (sampler, hot_add)]
    for t in threads:
        t.start()
    n = int(duration * a.rate)
    with ThreadPoolExecutor(a.workers) as pool:
        for k in range(n):
            sched = t0 + k / a.rate
            time.sleep(max(0.0, sched - time.monotonic()))
            pool.submit(one, k, sched)
    wall = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(a.timeout + 30)
    mem.append({"t": round(time.monotonic() - t0, 1), **sp.replica_rss()})
    return _figures(recs, mem, refs, hot, wall, client.retried, a)


def _figures(recs: list[dict], mem: list[dict], refs: dict, hot: dict, wall: float, retries: int,
             a: argparse.Namespace) -> dict:
    pub, vis = hot.get("published_at", float("inf")), hot.get("visible_at", float("inf"))
    mismatches, errors = [], [r for r in recs if not r["ok"]]
    for r in recs:
        phase = "A" if r["start"] < pub else "B" if r["start"] > vis else None
        if r["ok"] and phase in refs and r["got"] != refs[phase][r["item"]]:
            mismatches.append(f"{r['item']} (phase {phase}): {r['got']} != {refs[phase][r['item']]}")
    minutes = []
    for m in range(int(np.ceil(a.minutes))):
        rows = [r for r in recs if m * 60 <= r["sched"] < (m + 1) * 60]
        ms = [r["ms"] for r in rows if r["ok"]]
        rss = [x for x in mem if x["t"] <= (m + 1) * 60]
        minutes.append({"minute": m + 1, "requests": len(rows), "errors": sum(not r["ok"] for r in rows),
                        "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99), "max_ms": _pct(ms, 100),
                        "rss_mib": {k: v for k, v in (rss[-1] if rss else {}).items() if k != "t"}})
    names = sorted({k for x in mem for k in x if k != "t"})
    growth = {}
    for k in names:
        pts = [(x["t"], x[k]) for x in mem if k in x]
        settled = [(t, v) for t, v in pts if t >= a.settle_s]  # past warm-up (caches, allocator pools)
        slope = np.polyfit(*zip(*settled), 1)[0] * 3600 if len(settled) > 2 else None
        if len(pts) >= 2:
            growth[k] = {"first_mib": pts[0][1], "last_mib": pts[-1][1], "max_mib": max(v for _, v in pts),
                         "growth_mib": round(pts[-1][1] - pts[0][1], 1),
                         "settled_growth_mib": round(settled[-1][1] - settled[0][1], 1) if len(settled) > 1 else None,
                         "settled_fit_mib_per_hour": round(float(slope), 1) if slope is not None else None}
    ms = [r["ms"] for r in recs if r["ok"]]
    return {"args": vars(a), "offered_rps": a.rate, "wall_s": round(wall, 1), "hot_add": hot,
            "totals": {"requests": len(recs), "ok": len(ms), "errors": len(errors), "retries": retries,
                       "mismatches": len(mismatches), "achieved_rps": round(len(ms) / wall, 2),
                       "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99), "max_ms": _pct(ms, 100)},
            "minutes": minutes, "memory": {"samples": mem, "growth": growth},
            "examples": {"errors": sorted({r["error"] for r in errors})[:5], "mismatches": mismatches[:5]}}


def _print_table(fig: dict) -> None:
    names = sorted(fig["memory"]["growth"])
    print(f"{'min':>3} {'req':>5} {'err':>4} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  " +
          " ".join(f"{n + ' MiB':>12}" for n in names))
    for m in fig["minutes"]:
        print(f"{m['minute']:>3} {m['requests']:>5} {m['errors']:>4} {m['p50_ms'] or 0:>8.0f} {m['p99_ms'] or 0:>8.0f} "
              f"{m['max_ms'] or 0:>8.0f}  " + " ".join(f"{m['rss_mib'].get(n, 0):>12.0f}" for n in names))
    t, h = fig["totals"], fig["hot_add"]
    print(f"total: {t['requests']} requests at {fig['offered_rps']} req/s offered, {t['errors']} errors, {t['retries']} "
          f"retries, {t['mismatches']} mismatches; p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms")
    print(f"hot add of {h['task']}: published at {h.get('published_at')} s, listed {h.get('visible_after_s')} s later, "
          f"named requests answered by it: {h['answered']}, routed to it: {h.get('routed_to_new_expert')}/"
          f"{h.get('items_of_task')} of its items")
    print("replica RSS: " + ", ".join(f"{k} {g['first_mib']:.0f} -> {g['last_mib']:.0f} MiB ({g['growth_mib']:+.0f}; "
                                     f"after {fig['args']['settle_s']:.0f} s {g['settled_growth_mib']}, fit "
                                     f"{g['settled_fit_mib_per_hour']} MiB/h)"
                                     for k, g in fig["memory"]["growth"].items()))
    for line in fig["examples"]["errors"] + fig["examples"]["mismatches"]:
        print("  " + line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
