"""Two-stage serving throughput and latency at LLaVA-1.5-7B shapes through :class:`cl_service.engine.Engine`.

Nine expert adapters plus the router adapter (random weights, rank ``--rank`` on ``--targets``, each with
its own projector copy); requests of one 336 px image + ~60 question tokens. Per batch of requests:
CLIP once (:meth:`Engine.vision_states`), stage one = the MLLM router's one letter (one prefill through the
router adapter, :meth:`Engine.route_mllm`) or the prototype router (pooled base features,
:class:`cl_service.routers.prototype.PrototypeRouter`), stage two = 16 greedy tokens from each request's
expert, all experts of the batch in one batched pass (:meth:`Engine.answer_mixed`).

    python -m bench.serve                          # H100: everything, one process (~4 min)
    python -m bench.serve --profile tiny --device cpu --batch 4 --batches 1 --duration 3   # CPU smoke
    python -m bench.serve --sections graphs          # one decode step at batch 64: eager vs CUDA graphs

Figures (``$OUT/serve.json``): closed-loop requests/s end to end (router decides; routing forced to
round-robin over the 9 experts; forced to one expert), stage two alone mixed vs single, the same
through peft one adapter at a time (on-machine anchors), p50/p99 latency at a fixed arrival rate with
dynamic batching, and a bf16 agreement check of the stacked multi-adapter path against peft.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import POOL, Timer, bench_model, model_args, pct, requests, start, write_json  # noqa: E402
from cl_service.adapters.lora import LoraCfg, attach_lora, remove_lora, save_adapter  # noqa: E402
from cl_service.adapters.registry import finalize_adapter  # noqa: E402
from cl_service.engine.continuous import ContinuousBatcher  # noqa: E402
from cl_service.engine.engine import Engine  # noqa: E402
from cl_service.engine.pipeline import Pipeline  # noqa: E402
from cl_service.routers.base import over_states  # noqa: E402
from cl_service.routers.prompt import Pool  # noqa: E402
from cl_service.routers.prototype import PrototypeRouter  # noqa: E402


def make_adapters(mllm, root: Path, rank: int, targets: tuple[str, ...], experts: Pool = POOL
                  ) -> tuple[dict[str, str], str]:
    """The pool's experts (nine by default) + a router, saved and registered like trained ones (random
    non-zero LoRA B)."""
    dirs = {}
    for i, name in enumerate([*experts.experts, "router"]):
        params = attach_lora(mllm, LoraCfg(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=targets), "x", seed=i)
        g = torch.Generator(device=mllm.device).manual_seed(i)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 0.01)
        folder = save_adapter(mllm, root / name, "x")
        desc = experts.descriptions[i] if i < len(experts.experts) else name  # what the router prompt lists
        finalize_adapter(folder, id=f"expert:{name}", kind="expert", task=name, description=desc, base="random",
                         job_key=name)
        remove_lora(mllm)
        dirs[name] = str(folder)
    router = dirs.pop("router")
    return dirs, router


class TwoStage:
    """CLIP once per batch, stage one (``mllm`` router, or a feature router: ``proto`` / ``knn``, over the
    shared CLIP states), stage two (every chosen expert in one mixed pass)."""

    def __init__(self, engine: Engine, experts: dict[str, str], router: str, proto: PrototypeRouter,
                 pool: Pool = POOL, feature_routers: dict[str, Any] | None = None) -> None:
        self.engine, self.experts, self.router, self.proto, self.experts_pool = engine, experts, router, proto, pool
        self.feature_routers = {"proto": proto, **(feature_routers or {})}
        self.pool = ThreadPoolExecutor(8)

    def vision(self, samples) -> torch.Tensor:
        # Decoding images is CPU work a server does per request; threads overlap it (PIL drops the GIL).
        mllm = self.engine.mllm
        pix = list(self.pool.map(lambda s: mllm.preprocess_images(s.images, s.id), samples))
        with torch.no_grad(), mllm.adapters_disabled():
            return mllm.vision_states(torch.cat(pix))

    def stage1(self, samples, router: str = "mllm") -> tuple[torch.Tensor, list[str]]:
        """CLIP once for the batch, then the router's choice per request."""
        vs = self.vision(samples)
        if router == "mllm":
            routes = self.engine.route_mllm(samples, self.router, self.experts_pool, vision_states=vs)
        else:
            routes = over_states(self.feature_routers[router], self.engine, vs).route(samples)
        return vs, [r.expert for r in routes]

    def stage2(self, samples, vs: torch.Tensor, experts: list[str]) -> list[str]:
        return self.engine.answer_mixed(samples, [self.experts[e] for e in experts], vision_states=vs)

    def __call__(self, samples, router: str = "mllm", force: list[str] | None = None) -> tuple[list[str], list[str]]:
        vs, chosen = self.stage1(samples, router)
        return self.stage2(samples, vs, force or chosen), chosen

    def pipeline(self, router: str, batch: int, wait_s: float = 0.0, stage2_first: bool = True,
                 continuous: ContinuousBatcher | None = None) -> Pipeline:
        """Both stages overlapped: stage one of the next batch runs while this one is answered (``continuous``:
        each routed row joins that batcher's running decode)."""
        if continuous is not None:
            def hand_on(items, mid):
                per = mid[0].split([len(s.images) for s in items])
                return [_then(continuous.submit(s, self.experts[e], vision_states=v), e)
                        for s, e, v in zip(items, mid[1], per)]

            return Pipeline(lambda items: self.stage1(items, router), hand_on, device=self.engine.mllm.device,
                            max_batch=batch, wait_s=wait_s)
        return Pipeline(lambda items: self.stage1(items, router),
                        lambda items, mid: list(zip(self.stage2(items, mid[0], mid[1]), mid[1])),
                        device=self.engine.mllm.device, max_batch=batch, wait_s=wait_s, stage2_first=stage2_first,
                        merge=lambda mids: (torch.cat([m[0] for m in mids]), [e for m in mids for e in m[1]]))


def _then(fut: Future, expert: str) -> Future:
    """A future of ``(answer, expert)`` once ``fut`` has the answer."""
    out: Future = Future()
    fut.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception() is not None
                          else out.set_result((f.result(), expert)))
    return out


#: Kernel-name fragments per category, first match wins (CUDA kernel names of cuBLAS/CUTLASS, SDPA, ATen).
_KERNEL_KINDS = (("attention", ("fmha", "flash", "attention", "attn")),
                 ("gemm", ("gemm", "sm90_", "sm80_", "cutlass", "nvjet", "cublas", "xmma", "splitk")),
                 ("copy/index", ("copy", "cat", "index", "gather", "scatter", "fill", "memcpy", "memset")),
                 ("reduce", ("reduce",)),
                 ("elementwise", ("elementwise", "vectorized", "unrolled", "triton")))


def kernel_breakdown(prof, top: int = 20) -> dict[str, Any]:
    """GPU kernel time of a ``torch.profiler`` run by category, plus the ``top`` kernels (ms)."""
    kinds: dict[str, float] = {}
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name, ms = ev.name, ev.device_time / 1000.0 if hasattr(ev, "device_time") else ev.cuda_time / 1000.0
        low = name.lower()
        kind = next((k for k, frags in _KERNEL_KINDS if any(f in low for f in frags)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
        k = kernels.setdefault(name[:120], [0.0, 0])
        k[0] += ms
        k[1] += 1
    order = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    avg = prof.key_averages()
    ops = sorted(((e.key, e.self_device_time_total / 1000.0, e.count) for e in avg
                  if e.self_device_time_total > 0), key=lambda t: -t[1])[:top]
    cpu = sorted(((e.key, e.self_cpu_time_total / 1000.0, e.count) for e in avg), key=lambda t: -t[1])[:top]
    return {"gpu_ms": sum(kinds.values()), "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": n, "ms": round(v[0], 2), "calls": v[1]} for n, v in order],
            "top_ops": [{"op": n, "self_gpu_ms": round(ms, 2), "calls": c} for n, ms, c in ops],
            "top_cpu_ops": [{"op": n, "self_cpu_ms": round(ms, 2), "calls": c} for n, ms, c in cpu]}


def profile_stages(two: "TwoStage", batch: list, cuda: bool) -> dict[str, Any]:
    """Where a batch's GPU time goes: stage one (CLIP + MLLM router) and stage two (answer, 16 tokens) each
    under ``torch.profiler`` (after a warm-up); wall times of both, and of stage two with 1 new token (prefill
    only, no cache) and 2 (the decode step = the difference to 16 tokens over 14 steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    two(batch)  # warm
    out: dict[str, Any] = {"batch": len(batch)}
    with Timer(cuda) as t1:
        vs, chosen = two.stage1(batch)
    with Timer(cuda) as t2:
        two.stage2(batch, vs, chosen)
    eng = two.engine
    keep = eng.max_new_tokens
    short = {}
    try:
        for n in (1, 2):  # 1: prefill only (no KV cache kept); 2: prefill with the cache + one decode step
            eng.max_new_tokens = n
            two.stage2(batch, vs, chosen)
            with Timer(cuda) as t:
                two.stage2(batch, vs, chosen)
            short[n] = t.s
    finally:
        eng.max_new_tokens = keep
    out["wall_s"] = {"stage1": t1.s, "stage2": t2.s, "stage2_prefill_only": short[1], "stage2_two_tokens": short[2],
                     "decode_per_step_ms": 1000 * (t2.s - short[2]) / max(1, keep - 2)}
    for name, fn in (("stage1", lambda: two.stage1(batch)), ("stage2", lambda: two.stage2(batch, vs, chosen))):
        with tprofile(activities=acts) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        out[name] = kernel_breakdown(prof)
    return out


def decode_steps(engine: Engine, experts: dict[str, str], reqs: list, batch: int, reps: int, cuda: bool,
                 hbm_tbs: float) -> dict[str, Any]:
    """One decode step of a mixed batch (experts round-robin, 16 new tokens), eager vs CUDA graphs
    (:mod:`cl_service.engine.cudagraphs`), against the time its memory traffic takes at ``hbm_tbs`` TB/s.

    Step time = (answer with 16 tokens - answer with 2 tokens) / 14, medians of ``reps`` timed calls after a
    warm-up (which captures the graphs). On a GPU also: one replay of the captured step and the same static
    step launched eagerly, each timed with CUDA events. Traffic per step = the decoder's weights and ``lm_head``
    + the stacked LoRA weights + the KV cache read (eager: ``batch`` rows x the mean context; graphs: the padded
    ``[batch bucket, length bucket]`` they read)."""
    from cl_service.engine.cudagraphs import batch_bucket, length_bucket

    mllm = engine.mllm
    items = reqs[:batch]
    names = list(experts)
    folders = [experts[names[i % len(names)]] for i in range(batch)]
    vs = engine.vision_states(items)
    keep = engine.cuda_graphs
    out: dict[str, Any] = {"batch": batch, "new_tokens": 16}
    texts = {}
    try:
        for mode in (False, True):
            engine.cuda_graphs = mode
            t = {}
            for n in (2, 16):
                texts[mode] = engine.answer_mixed(items, folders, n, vision_states=vs)  # warm-up; captures graphs
                ts = []
                for _ in range(reps):
                    with Timer(cuda) as tm:
                        engine.answer_mixed(items, folders, n, vision_states=vs)
                    ts.append(tm.s)
                t[n] = statistics.median(ts)
            out["graphs" if mode else "eager"] = {"step_ms": 1000 * (t[16] - t[2]) / 14, "answer_2_tokens_s": t[2],
                                                  "answer_16_tokens_s": t[16]}
    finally:
        engine.cuda_graphs = keep
    # bf16 rounding differs (attention length, LoRA path): random weights' near-flat logits may flip a token
    out["answers_equal_graphs_vs_eager"] = sum(a == b for a, b in zip(texts[False], texts[True]))
    lm = mllm.model.model.language_model
    elt = torch.finfo(mllm.dtype).bits // 8
    L = mllm.collate(items, train=False, pixels=False)["attention_mask"].shape[1]
    H = getattr(lm.config, "num_key_value_heads", None) or lm.config.num_attention_heads
    per_pos = len(lm.layers) * 2 * H * lm.layers[0].self_attn.head_dim * elt  # K and V of one row, one position
    Bb, Lb = batch_bucket(batch), length_bucket(L + 16)
    dec = engine._graphs
    g = dec._graphs.get((Bb, Lb, True)) if dec is not None else None
    weights = elt * (sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
                     + mllm.model.lm_head.weight.numel())
    lora = 0 if g is None else elt * sum(A.numel() + Bt.numel() for A, Bt in g.plan.stacks.values())
    kv = {"eager": batch * (L + 7.5) * per_pos, "graphs": Bb * Lb * per_pos}
    out["traffic"] = {"prompt_len": L, "buckets": [Bb, Lb], "weights_gb": weights / 1e9, "lora_gb": lora / 1e9,
                      "kv_gb": {k: v / 1e9 for k, v in kv.items()}, "hbm_tbs": hbm_tbs,
                      "time_ms": {k: 1000 * (weights + lora + v) / (hbm_tbs * 1e12) for k, v in kv.items()}}
    if cuda and g is not None and g.graph is not None:
        def events(fn, k: int) -> float:
            fn()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(k):
                fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / k

        with torch.no_grad(), mllm.adapters_disabled():  # both re-run the batch's last step (idempotent)
            out["graphs"]["replay_ms"] = events(g.graph.replay, 20)
            out["eager"]["static_step_launched_eagerly_ms"] = events(lambda: dec._forward(g), 5)
    step = out["graphs"].get("replay_ms", out["graphs"]["step_ms"])
    out["graphs_over_traffic"] = step / out["traffic"]["time_ms"]["eager"]
    out["graph_stats"] = dict(dec.stats) if dec is not None else {}
    return out


def pipelined_closed_loop(two: TwoStage, reqs: list, batch: int, clients: int, warm_s: float, seconds: float,
                          router: str, stage2_first: bool = True, continuous: ContinuousBatcher | None = None
                          ) -> dict[str, Any]:
    """``clients`` closed-loop clients (each sends its next request when its answer arrives) against a
    :class:`Pipeline`; requests/s = answers in a ``seconds`` window after ``warm_s`` of warm-up."""
    done: list[float] = []
    chosen: set[str] = set()
    stop = threading.Event()
    errors: list[BaseException] = []
    with two.pipeline(router, batch, stage2_first=stage2_first, continuous=continuous) as p:
        def send(i: int) -> None:
            f = p.submit(reqs[i % len(reqs)])
            f.add_done_callback(lambda f, i=i: landed(f, i))

        def landed(f, i: int) -> None:
            if f.exception() is not None:
                errors.append(f.exception())
                return
            done.append(time.perf_counter())
            chosen.add(f.result()[1])
            if not stop.is_set():
                try:
                    send(i + clients)
                except RuntimeError:  # the pipeline closed between the check and the send
                    pass

        t0 = time.perf_counter()
        for c in range(clients):
            send(c)
        time.sleep(warm_s + seconds)
        stop.set()
        t_end = t0 + warm_s + seconds
    log = list(p.log)  # closing the pipeline finished the requests in flight
    if errors:
        raise errors[0]
    a, b = t0 + warm_s, t_end
    # Answers land a batch at a time: count whole batches between the first and the last batch that
    # ended in the window (a count of answers in the window is quantised to +-1 batch).
    ends = sorted((y, k) for s, x, y, k in log if s == 2 and a <= y <= b)
    rate = sum(k for _, k in ends[1:]) / (ends[-1][0] - ends[0][0]) if len(ends) > 1 else float("nan")
    window = [(s, x, y, k) for s, x, y, k in log if x >= a and y <= b]
    busy = {k: sum(min(y, b) - max(x, a) for s, x, y, _ in log if s == k and y > a and x < b) / (b - a) for k in (1, 2)}
    mean = {k: statistics.mean([m for s, _, _, m in window if s == k] or [0]) for k in (1, 2)}
    dur = {k: statistics.mean([y - x for s, x, y, _ in window if s == k] or [0]) for k in (1, 2)}
    in_window = sum(a <= t < b for t in done) / (b - a)
    if continuous is not None:  # answers land a row at a time: count them; stage two's work is the batcher's
        rate = in_window
        work = [(k, x, y, n) for k, x, y, n in list(continuous.log) if x >= a and y <= b]
        busy[2] = sum(y - x for _, x, y, _ in work) / (b - a)
        joins = [n for k, _, _, n in work if k == "prefill"]
        steps = [(y - x, n) for k, x, y, n in work if k == "step"]
        mean[2] = statistics.mean(joins or [0])
        dur[2] = statistics.mean([d for d, _ in steps] or [0])
    return {"req_per_s": rate, "answers_in_window_per_s": in_window, "continuous": continuous is not None,
            "clients": clients, "batch": batch, "window_s": b - a, "batches_timed": len(ends) - 1,
            "mean_stage1_batch": mean[1], "mean_stage2_batch": mean[2], "stage1_s_per_batch": dur[1],
            "stage2_s_per_batch": dur[2], "stage1_busy": busy[1], "stage2_busy": busy[2],
            "stage2_first": stage2_first, "distinct_experts_chosen_by_router": len(chosen)}


def pipelined_fixed_rate(two: TwoStage, reqs: list, rate: float, duration: float, max_batch: int,
                         router: str, wait_s: float = 0.0, continuous: ContinuousBatcher | None = None
                         ) -> dict[str, Any]:
    """Requests submitted one by one every ``1/rate`` s to a :class:`Pipeline`; latency = arrival to answer."""
    n = int(rate * duration)
    with two.pipeline(router, max_batch, wait_s, continuous=continuous) as p:
        p.map(reqs[:max_batch], timeout_s=600)
        p.log.clear()
        lat: list[float] = []
        t0 = time.perf_counter()
        futs = []
        for i in range(n):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            arrival = time.perf_counter()
            f = p.submit(reqs[i % len(reqs)])
            f.add_done_callback(lambda _f, a=arrival: lat.append(time.perf_counter() - a))
            futs.append(f)
        for f in futs:
            f.result(timeout=600)
        served = time.perf_counter() - t0
        sizes = {k: [b for s, _, _, b in p.log if s == k] for k in (1, 2)}
        if continuous is not None:  # stage two's "batches": the joins into the running decode
            sizes[2] = [b for k, x, _, b in list(continuous.log) if k == "prefill" and x >= t0]
    return {"rate": rate, "continuous": continuous is not None, "requests": n, "wait_s": wait_s, "p50_s": pct(lat, 50), "p90_s": pct(lat, 90),
            "p99_s": pct(lat, 99), "mean_batch": statistics.mean(sizes[2]),
            "mean_stage1_batch": statistics.mean(sizes[1]), "achieved_req_per_s": n / served}


def closed_loop(fn, reqs: list, batch: int, batches: int, cuda: bool) -> dict[str, Any]:
    """Requests/s over ``batches`` full batches after one warm-up batch."""
    fn(reqs[:batch], 0)
    times = []
    for b in range(batches):
        with Timer(cuda) as t:
            fn(reqs[b * batch:(b + 1) * batch], b * batch)
        times.append(t.s)
    return {"req_per_s": batch * batches / sum(times), "batch": batch, "batch_s": [round(x, 3) for x in times]}


def fixed_rate(two: TwoStage, reqs: list, rate: float, duration: float, max_batch: int, router: str,
               cuda: bool) -> dict[str, Any]:
    """Requests arrive every ``1/rate`` s; each loop serves all that have arrived (up to ``max_batch``)."""
    n = int(rate * duration)
    arrivals = [i / rate for i in range(n)]
    lat, sizes = [], []
    t0 = time.perf_counter()
    i = 0
    while i < n:
        now = time.perf_counter() - t0
        if arrivals[i] > now:
            time.sleep(arrivals[i] - now)
            continue
        j = i
        while j < n and j - i < max_batch and arrivals[j] <= now:
            j += 1
        two([reqs[k % len(reqs)] for k in range(i, j)], router)
        if cuda:
            torch.cuda.synchronize()
        done = time.perf_counter() - t0
        lat += [done - arrivals[k] for k in range(i, j)]
        sizes.append(j - i)
        i = j
    served = time.perf_counter() - t0
    return {"rate": rate, "requests": n, "p50_s": pct(lat, 50), "p90_s": pct(lat, 90), "p99_s": pct(lat, 99),
            "mean_batch": statistics.mean(sizes), "achieved_req_per_s": n / served}


def agreement(engine: Engine, experts: dict[str, str], reqs: list) -> dict[str, Any]:
    """Last-position logits of one mixed batch vs peft with each row's adapter alone (bf16 tolerance)."""
    names = list(experts)[:4]
    rows = reqs[:len(names)]
    mixed = engine._last_logits_mixed(rows, [experts[n] for n in names])
    plain = Engine(engine.mllm)
    ref = torch.cat([plain._run(experts[n], lambda r=r: plain._first_logits([r])) for n, r in zip(names, rows)])
    remove_lora(engine.mllm)
    rel = ((mixed - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    return {"rel_err_per_row": rel, "max_rel_err": max(rel),
            "top1_agree": int((mixed.argmax(-1) == ref.argmax(-1)).sum()), "rows": len(names)}


def _rates(arg: str) -> list[float]:
    """``--rate 10,16`` -> [10.0, 16.0]; empty (or quotes only) -> none."""
    return [float(x) for x in str(arg).replace("'", "").replace('"', "").split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(ap)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--rate", default="10,16", help="arrival rates for the latency runs (req/s, comma-separated)")
    ap.add_argument("--big-batch", type=int, default=96, help="also time end to end at this batch (0: skip)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--words", type=int, default=54, help="question words (~60 tokens)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--plain-kernels", action="store_true",
                    help="transformers' own norms/rotary/SwiGLU instead of the fused kernels (MLLM.fuse_kernels)")
    ap.add_argument("--pipe-priority-off", action="store_true",
                    help="pipelined closed loop: also time it with both streams at equal priority")
    ap.add_argument("--pipe-warm", type=float, default=8.0, help="pipelined closed loop: warm-up seconds")
    ap.add_argument("--pipe-seconds", type=float, default=20.0, help="pipelined closed loop: timed window (s)")
    ap.add_argument("--pipe-wait", type=float, default=0.0, help="pipelined fixed rate: a lone request waits this "
                    "long (s) for company before it is routed")
    ap.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"),
                    help="Engine(cuda_graphs=...) for every section: decode steps as replayed CUDA graphs")
    ap.add_argument("--decode-reps", type=int, default=5, help="graphs section: timed calls per figure")
    ap.add_argument("--hbm-tbs", type=float, default=4.3, help="graphs section: memory bandwidth for the traffic "
                    "time (TB/s; 4.3 = a device-to-device copy measured on an H200, KINDS.md; datasheet 4.8)")
    ap.add_argument("--sections", default="serial,big,stage2,fixed,pipeline,continuous,peft,agree",
                    help="what to run (comma-separated): serial (closed loop, one batch at a time), big (the same "
                         "at --big-batch), stage2 (answer only), fixed (fixed-rate latency), pipeline (both stages "
                         "overlapped: closed loop at --batch and --big-batch, fixed rate), peft, agree, profile (GPU "
                         "kernel time per stage by category; not in the default), graphs (one decode step at "
                         "--batch, eager vs CUDA graphs, against its memory-traffic time; not in the default), "
                         "continuous (the pipelined closed loop and fixed rate with stage two continuously batched)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    out, res = start(args, "serve.json")
    cuda = args.device == "cuda"

    def save() -> None:
        write_json(out, res)

    t0 = time.perf_counter()
    mcfg, mllm = bench_model(args.profile, args.device)
    root = Path(tempfile.mkdtemp(prefix="clsvc-bench-adapters-"))
    experts, router = make_adapters(mllm, root, args.rank, tuple(args.targets.split(",")))
    res["setup_s"] = time.perf_counter() - t0
    engine = Engine(mllm, fused_lora=True, fused_kernels=False)  # fused below, after a reference pass
    engine.batch_size, engine.max_new_tokens, engine.router_max_new_tokens = args.batch, 16, 1
    engine.cuda_graphs = res["cuda_graphs"] = {"auto": "auto", "on": True, "off": False}[args.cuda_graphs]
    reqs = requests(max(args.batch, args.big_batch) * (args.batches + 1), mcfg.image_size, n_words=args.words)
    tok = mllm.tokenizer
    from cl_service.models.mllm import prompt_text
    from cl_service.routers.prompt import router_prompt
    res["prompt_tokens"] = {"expert": 1 + mllm.tokens_per_image + len(tok(prompt_text(reqs[0].question)).input_ids),
                            "router": 1 + mllm.tokens_per_image + len(tok(prompt_text(router_prompt(POOL, reqs[0].question))).input_ids)}
    if not args.plain_kernels:
        # Fused norms / rotary embedding / SwiGLU (MLLM.fuse_kernels), checked against the plain model first.
        probe = reqs[:8]
        ref = engine._last_logits_mixed(probe, [None] * len(probe))
        t1 = time.perf_counter()
        res["fused_kernels"] = mllm.fuse_kernels()
        got = engine._last_logits_mixed(probe, [None] * len(probe))  # compiles the Triton kernels
        res["fused_kernels_first_call_s"] = time.perf_counter() - t1
        res["fused_kernels_rel_err"] = float((got - ref).norm() / ref.norm())
        res["fused_kernels_max_abs_err"] = float((got - ref).abs().max())
        print(f"fused kernels {res['fused_kernels']}: logits rel err {res['fused_kernels_rel_err']:.2e}, "
              f"first call {res['fused_kernels_first_call_s']:.1f} s", flush=True)
        save()
    per_task = {e: requests(4, mcfg.image_size, n_words=args.words, seed=10 + i) for i, e in enumerate(POOL.experts)}
    proto = PrototypeRouter.fit(engine, per_task)
    two = TwoStage(engine, experts, router, proto)
    names = list(experts)
    rr = lambda k, n: [names[(k + i) % len(names)] for i in range(n)]  # noqa: E731

    if "profile" in sections:
        res["profile"] = prof = profile_stages(two, reqs[:args.batch], cuda)
        print(f"profile: wall {prof['wall_s']}", flush=True)
        for st in ("stage1", "stage2"):
            print(f"  {st}: gpu {prof[st]['gpu_ms']:.0f} ms {prof[st]['by_kind_ms']}", flush=True)
        save()

    if "graphs" in sections:
        res["decode_steps"] = d = decode_steps(engine, experts, reqs, args.batch, args.decode_reps, cuda,
                                               args.hbm_tbs)
        tr = d["traffic"]
        print(f"decode step, batch {args.batch} (prompt {tr['prompt_len']} tokens, buckets {tr['buckets']}): eager "
              f"{d['eager']['step_ms']:.1f} ms, CUDA graphs {d['graphs']['step_ms']:.1f} ms (one replay "
              f"{d['graphs'].get('replay_ms', float('nan')):.1f} ms; the same step launched eagerly "
              f"{d['eager'].get('static_step_launched_eagerly_ms', float('nan')):.1f} ms); answers equal "
              f"{d['answers_equal_graphs_vs_eager']}/{args.batch}", flush=True)
        print(f"  memory traffic per step: weights {tr['weights_gb']:.2f} GB + LoRA {tr['lora_gb']:.2f} GB + KV "
              f"{tr['kv_gb']['eager']:.2f} GB ({tr['kv_gb']['graphs']:.2f} GB padded) = "
              f"{tr['time_ms']['eager']:.2f} ms ({tr['time_ms']['graphs']:.2f} ms padded) at {tr['hbm_tbs']} TB/s; "
              f"graphs / traffic time = {d['graphs_over_traffic']:.2f} (target <= 2); {d['graph_stats']}",
              flush=True)
        save()

    runs: dict[str, Any] = {}
    res["closed_loop"] = runs
    chosen_log: list[str] = []

    def e2e(router_kind: str, force: str | None):
        def fn(batch, k):
            f = None if force is None else (rr(k, len(batch)) if force == "mixed" else [names[0]] * len(batch))
            _, chosen = two(batch, router_kind, f)
            chosen_log.extend(chosen)
        return fn

    for key, rk, force in [("e2e_mllm_router", "mllm", None), ("e2e_proto_router", "proto", None),
                           ("e2e_mllm_forced_mixed9", "mllm", "mixed"), ("e2e_mllm_forced_single", "mllm", "single")]:
        if "serial" not in sections:
            break
        chosen_log.clear()
        runs[key] = closed_loop(e2e(rk, force), reqs, args.batch, args.batches, cuda)
        runs[key]["distinct_experts_chosen_by_router"] = len(set(chosen_log))
        print(f"{key:28s} {runs[key]['req_per_s']:7.2f} req/s", flush=True)
        save()

    if args.big_batch and "big" in sections:
        engine.batch_size = args.big_batch
        for key, rk in [("e2e_mllm_router_big_batch", "mllm"), ("e2e_proto_router_big_batch", "proto")]:
            runs[key] = closed_loop(e2e(rk, None), reqs, args.big_batch, args.batches, cuda)
            print(f"{key:28s} {runs[key]['req_per_s']:7.2f} req/s (batch {args.big_batch})", flush=True)
            save()
        engine.batch_size = args.batch
        if cuda:
            torch.cuda.empty_cache()

    if "pipeline" in sections:
        pipe: dict[str, Any] = {}
        res["pipelined"] = pipe
        configs = [(args.batch, True)] + ([(args.batch, False)] if args.pipe_priority_off else []) + \
            ([(args.big_batch, True)] if args.big_batch else [])
        for b, first in configs:
            engine.batch_size = b
            for rk in ("mllm", "proto"):
                key = f"{rk}_router_batch{b}" + ("" if first else "_equal_priority")
                pipe[key] = r = pipelined_closed_loop(two, reqs, b, 3 * b, args.pipe_warm, args.pipe_seconds, rk,
                                                      first)
                print(f"pipelined closed loop {key:22s} {r['req_per_s']:7.2f} req/s over {r['batches_timed']} batches "
                      f"({r['clients']} clients; batch {r['mean_stage1_batch']:.1f} routed / "
                      f"{r['mean_stage2_batch']:.1f} answered; {r['stage1_s_per_batch']:.2f} s / "
                      f"{r['stage2_s_per_batch']:.2f} s per batch; busy {r['stage1_busy']:.0%} / "
                      f"{r['stage2_busy']:.0%})", flush=True)
                save()
            if cuda:
                torch.cuda.empty_cache()
        engine.batch_size = args.batch
        for rate in _rates(args.rate):
            for rk in ("mllm", "proto"):
                key = f"{rk}@{rate:g}"
                pipe[f"fixed_rate_{key}"] = r = pipelined_fixed_rate(two, reqs, rate, args.duration, args.batch, rk,
                                                                      args.pipe_wait)
                print(f"pipelined fixed rate {rate:g} req/s, {rk:5s} router: "
                      f"p50 {r['p50_s']:.3f} s p99 {r['p99_s']:.3f} s "
                      f"(mean batch {r['mean_stage1_batch']:.1f} routed / {r['mean_batch']:.1f} answered, "
                      f"served {r['achieved_req_per_s']:.1f} req/s)", flush=True)
                save()

    if "continuous" in sections:  # stage two with continuous batching (the rows join the running decode)
        cont: dict[str, Any] = {}
        res["continuous"] = cont
        engine.batch_size = args.batch
        with engine.continuous(slots=args.batch, max_queue=8 * args.batch) as cb:
            for rk in ("mllm", "proto"):
                cont[f"{rk}_router_batch{args.batch}"] = r = pipelined_closed_loop(
                    two, reqs, args.batch, 3 * args.batch, args.pipe_warm, args.pipe_seconds, rk, continuous=cb)
                print(f"continuous closed loop {rk:5s} router: {r['req_per_s']:7.2f} req/s ({r['clients']} clients; "
                      f"routed batch {r['mean_stage1_batch']:.1f}, join {r['mean_stage2_batch']:.1f}, step "
                      f"{1000 * r['stage2_s_per_batch']:.1f} ms; busy {r['stage1_busy']:.0%} / {r['stage2_busy']:.0%})",
                      flush=True)
                save()
            for rate in _rates(args.rate):
                for rk in ("mllm", "proto"):
                    cont[f"fixed_rate_{rk}@{rate:g}"] = r = pipelined_fixed_rate(
                        two, reqs, rate, args.duration, args.batch, rk, args.pipe_wait, continuous=cb)
                    print(f"continuous fixed rate {rate:g} req/s, {rk:5s} router: p50 {r['p50_s']:.3f} s p99 "
                          f"{r['p99_s']:.3f} s (mean routed batch {r['mean_stage1_batch']:.1f}, join "
                          f"{r['mean_batch']:.1f}, served {r['achieved_req_per_s']:.1f} req/s)", flush=True)
                    save()
            cont["stats"] = dict(cb.stats)
            cont["graph_stats"] = dict(cb.dec.stats)
        if cuda:
            torch.cuda.empty_cache()

    vs_all = {}

    def stage2(mode: str):
        def fn(batch, k):
            if k not in vs_all:
                vs_all[k] = two.vision(batch)
            ex = rr(k, len(batch)) if mode == "mixed" else [names[0]] * len(batch)
            engine.answer_mixed(batch, [experts[e] for e in ex], vision_states=vs_all[k])
        return fn

    if "stage2" in sections:
        for mode in ("mixed9", "single"):
            runs[f"answer_only_{mode}"] = closed_loop(stage2("mixed" if mode == "mixed9" else "single"), reqs,
                                                       args.batch, args.batches, cuda)
            print(f"answer_only_{mode:16s} {runs[f'answer_only_{mode}']['req_per_s']:7.2f} req/s", flush=True)
        runs["mixed_over_single_answer_only"] = (runs["answer_only_mixed9"]["req_per_s"]
                                                 / runs["answer_only_single"]["req_per_s"])
    if "serial" in sections:
        runs["mixed_over_single_e2e"] = (runs["e2e_mllm_forced_mixed9"]["req_per_s"]
                                         / runs["e2e_mllm_forced_single"]["req_per_s"])
    save()

    lat = {}
    res["fixed_rate"] = lat
    for rate in _rates(args.rate) if "fixed" in sections else []:
        for rk in ("mllm", "proto"):
            key = f"{rk}@{rate:g}"
            lat[key] = fixed_rate(two, reqs, rate, args.duration, args.batch, rk, cuda)
            print(f"fixed rate {rate:g} req/s, {rk:5s} router: p50 {lat[key]['p50_s']:.3f} s p99 {lat[key]['p99_s']:.3f} s "
                  f"(mean batch {lat[key]['mean_batch']:.1f}, served {lat[key]['achieved_req_per_s']:.1f} req/s)",
                  flush=True)
            save()

    if not args.skip_peft and "peft" in sections:
        # On-machine anchors: peft, the adapter switched with set_adapter, one group of rows at a time.
        plain = Engine(mllm)
        plain.batch_size, plain.max_new_tokens = args.batch, 16
        batch = reqs[:args.batch]
        plain.answer(batch[:2], experts[names[0]])  # load + warm
        with Timer(cuda) as t:
            plain.answer(batch, experts[names[0]])
        runs["peft_answer_only_single"] = {"req_per_s": len(batch) / t.s}
        ex = rr(0, len(batch))
        for e in names:
            plain._activate(experts[e])  # load all nine before timing
        with Timer(cuda) as t:
            for e in names:
                idx = [i for i, x in enumerate(ex) if x == e]
                plain.answer([batch[i] for i in idx], experts[e])
        runs["peft_answer_only_mixed9_grouped"] = {"req_per_s": len(batch) / t.s}
        print(f"peft single {runs['peft_answer_only_single']['req_per_s']:.2f} req/s, "
              f"peft 9 experts grouped {runs['peft_answer_only_mixed9_grouped']['req_per_s']:.2f} req/s", flush=True)
        remove_lora(mllm)
        save()

    if "agree" in sections:
        res["agreement_vs_peft"] = agreement(engine, experts, reqs)
        print(f"agreement vs peft: max rel err {res['agreement_vs_peft']['max_rel_err']:.2e}, top-1 "
              f"{res['agreement_vs_peft']['top1_agree']}/{res['agreement_vs_peft']['rows']}", flush=True)
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    res["total_s"] = time.perf_counter() - t0
    save()


if __name__ == "__main__":
    main()
