"""Two-stage serving through :class:`cl_service.engine.Engine` as the router and the pool change: the
one-prefill ``knn`` router next to the MLLM router, and 64 experts next to 9 (LLaVA-1.5-7B shape, random bf16
weights, rank ``--rank`` on ``--targets`` with a projector copy per expert, the requests of :mod:`bench.serve`).

    python -m bench.serve_scale                       # H200: all sections (~5 min)
    python -m bench.serve_scale --profile tiny --device cpu --batch 4 --batches 1 --many 12 --words 8   # CPU smoke

Sections (``--sections``):

* ``routers``: closed loop end to end at ``--batch`` over the nine experts: the MLLM router (a lettered pool
  prompt through the router adapter, one prefill of image + question + pool) against the ``knn`` router
  (:class:`cl_service.routers.nearest.NearestRouter` over :meth:`Engine.routing_features` with the batch's
  CLIP states: one text-only base pass over the question), and stage one alone per router (routing cost per
  request, CLIP included).
* ``many``: ``--many`` experts (64) loaded at once: stage two alone with rows round-robin over 9 of them vs
  over all; end to end with the knn router and with the MLLM router over the whole pool (its prompt has a line
  per expert and two-letter codes past 26).
* ``paging``: the same ``--many`` experts with only ``--gpu-slots`` on the GPU and the rest in pinned host
  memory (:class:`Engine` ``max_loaded`` / ``max_host_adapters``): batches naming ``--gpu-slots`` experts each,
  the next batch other ones; requests/s against all resident, and the time to page an adapter in from host
  memory vs from disk (read + checksum verification).

Writes ``$OUT/serve_scale.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import POOL, Timer, bench_model, model_args, pool, requests, start, write_json  # noqa: E402
from bench.serve import TwoStage, closed_loop, make_adapters  # noqa: E402
from cl_service.engine.engine import Engine  # noqa: E402
from cl_service.routers.nearest import NearestRouter  # noqa: E402
from cl_service.routers.prototype import PrototypeRouter  # noqa: E402


def fit_routers(engine: Engine, experts, image_size: int, words: int) -> tuple[PrototypeRouter, NearestRouter]:
    per_task = {e: requests(4, image_size, n_words=words, seed=10 + i) for i, e in enumerate(experts.experts)}
    return PrototypeRouter.fit(engine, per_task), NearestRouter.fit(engine, per_task)


def e2e(two: TwoStage, router: str, force: list[str] | None = None):
    def fn(batch, k):
        two(batch, router, None if force is None else [force[(k + i) % len(force)] for i in range(len(batch))])
    return fn


def stage_one(two: TwoStage, router: str):
    def fn(batch, k):
        two.stage1(batch, router)
    return fn


def stage_two(two: TwoStage, names: list[str], cache: dict):
    def fn(batch, k):
        if k not in cache:
            cache[k] = two.vision(batch)
        two.stage2(batch, cache[k], [names[(k + i) % len(names)] for i in range(len(batch))])
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--words", type=int, default=54)
    ap.add_argument("--many", type=int, default=64, help="experts of the many/paging sections")
    ap.add_argument("--gpu-slots", type=int, default=16, help="paging: adapters on the GPU at once")
    ap.add_argument("--sections", default="routers,many,paging")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    out, res = start(args, "serve_scale.json")
    cuda = args.device == "cuda"

    def save() -> None:
        write_json(out, res)

    def loop(key: str, fn, note: str = "") -> dict[str, Any]:
        r = res.setdefault("closed_loop", {})[key] = closed_loop(fn, reqs, args.batch, args.batches, cuda)
        print(f"{key:40s} {r['req_per_s']:7.2f} req/s {note}", flush=True)
        save()
        return r

    t0 = time.perf_counter()
    mcfg, mllm = bench_model(args.profile, args.device)
    root = Path(tempfile.mkdtemp(prefix="clsvc-bench-scale-"))
    targets = tuple(args.targets.split(","))
    reqs = requests(args.batch * (args.batches + 1), mcfg.image_size, n_words=args.words)
    engine = Engine(mllm, fused_lora=True, max_loaded=max(32, args.many + 1))
    engine.batch_size, engine.max_new_tokens, engine.router_max_new_tokens = args.batch, 16, 1
    res["setup_s"] = time.perf_counter() - t0

    if "routers" in sections:
        experts, router = make_adapters(mllm, root / "nine", args.rank, targets)
        proto, knn = fit_routers(engine, POOL, mcfg.image_size, args.words)
        two = TwoStage(engine, experts, router, proto, POOL, {"knn": knn})
        n = args.batch
        for rk in ("mllm", "knn", "proto"):
            s1 = loop(f"stage1_{rk}_router", stage_one(two, rk))
            s1["ms_per_request"] = 1000 / s1["req_per_s"]
        clip = loop("clip_only", lambda batch, k: two.vision(batch))
        for rk in ("mllm", "knn", "proto"):
            r = res["closed_loop"][f"stage1_{rk}_router"]
            r["routing_ms_per_request_beyond_clip"] = r["ms_per_request"] - 1000 / clip["req_per_s"]
        for rk in ("mllm", "knn", "proto"):
            loop(f"e2e_{rk}_router_batch{n}", e2e(two, rk))
        res["routing_cost_ms_per_request"] = {rk: res["closed_loop"][f"stage1_{rk}_router"]["ms_per_request"]
                                              for rk in ("mllm", "knn", "proto")}
        print(f"routing cost per request (CLIP included): {res['routing_cost_ms_per_request']}", flush=True)
        for k in list(engine._multi_loaded):  # the nine leave; the many-expert pool starts from an empty set
            engine.multi.drop(k)
            del engine._multi_loaded[k]
        save()

    if "many" in sections or "paging" in sections:
        big = pool(args.many)
        t1 = time.perf_counter()
        experts, router = make_adapters(mllm, root / "many", args.rank, targets, big)
        res["many_adapters_written_s"] = time.perf_counter() - t1
        names = list(experts)
        vs_cache: dict = {}
        two = TwoStage(engine, experts, router, None, big)
        if "many" in sections:
            with Timer(cuda) as t:
                engine.answer_mixed([reqs[i % len(reqs)] for i in range(len(names))], [experts[e] for e in names], 1)
            res["many_load_all_s"] = t.s
            nine = loop("stage2_mixed_over_9", stage_two(two, names[:9], vs_cache))
            every = loop(f"stage2_mixed_over_{len(names)}", stage_two(two, names, vs_cache))
            res["many_over_nine_stage2"] = every["req_per_s"] / nine["req_per_s"]
            print(f"stage two, {len(names)} experts mixed / 9 mixed = {res['many_over_nine_stage2']:.2f}", flush=True)
            proto, knn = fit_routers(engine, big, mcfg.image_size, args.words)
            two.feature_routers.update(proto=proto, knn=knn)
            loop(f"e2e_knn_router_{len(names)}_experts", e2e(two, "knn"))
            loop(f"e2e_forced_round_robin_{len(names)}_experts", e2e(two, "knn", names))
            loop(f"e2e_mllm_router_{len(names)}_experts", e2e(two, "mllm"),
                 f"(router prompt {two_prompt_tokens(engine, big, reqs[0])} tokens)")
            res["gpu_memory_gib_after_many"] = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        if "paging" in sections:
            res["paging"] = paging(engine, two, experts, reqs, args, cuda)
            save()
    res["total_s"] = time.perf_counter() - t0
    save()


def two_prompt_tokens(engine: Engine, experts, sample) -> int:
    from cl_service.models.mllm import prompt_text
    from cl_service.routers.prompt import router_prompt

    m = engine.mllm
    return 1 + m.tokens_per_image + len(m.tokenizer(prompt_text(router_prompt(experts, sample.question))).input_ids)


def paging(engine: Engine, two: TwoStage, experts: dict[str, str], reqs: list, args, cuda: bool) -> dict[str, Any]:
    """``--gpu-slots`` adapters on the GPU, the rest in host memory; each batch names ``--gpu-slots`` experts,
    the next batch the following ones (so every batch pages its experts in)."""
    names, slots, n = list(experts), args.gpu_slots, args.batch
    groups = [names[i:i + slots] for i in range(0, len(names), slots)]
    vs = two.vision(reqs[:n])

    def run(k: int) -> None:
        g = groups[k % len(groups)]
        two.stage2(reqs[:n], vs, [g[i % len(g)] for i in range(n)])

    out: dict[str, Any] = {"gpu_slots": slots, "experts": len(names), "batch": n}
    keep = engine.max_loaded, engine.max_host_adapters
    try:
        engine.max_loaded, engine.max_host_adapters = len(names) + 1, len(names)
        run(0)
        with Timer(cuda) as t:
            for k in range(len(groups)):
                run(k)
        out["all_resident_req_per_s"] = n * len(groups) / t.s
        engine.max_loaded = slots
        for k in range(len(groups)):  # warm: every adapter parked once, graphs for each stack captured
            run(k)
        before = dict(engine.paging)
        times = []
        for k in range(2 * len(groups)):
            with Timer(cuda) as t:
                run(k)
            times.append(t.s)
        out["paged_req_per_s"] = n * len(times) / sum(times)
        out["paged_batch_s"] = [round(x, 3) for x in times]
        out["paging_counts"] = {k: engine.paging[k] - before.get(k, 0) for k in engine.paging}
        out["paged_over_resident"] = out["paged_req_per_s"] / out["all_resident_req_per_s"]
        # one adapter in: from host memory vs from disk (read + verify), stacks rebuilt on the next batch
        key = engine._multi_key(experts[names[0]])
        host, disk = [], []
        for _ in range(3):
            engine._evict(key) if key in engine._multi_loaded else None
            with Timer(cuda) as t:
                engine._multi_key(experts[names[0]])
            host.append(t.s)
            engine._evict(key)
            engine.multi.forget(key)
            engine._multi_parked.pop(key, None)
            with Timer(cuda) as t:
                engine._multi_key(experts[names[0]])
            disk.append(t.s)
        out["page_in_ms"] = {"host": 1000 * statistics.median(host), "disk_read_verify": 1000 * statistics.median(disk)}
    finally:
        engine.max_loaded, engine.max_host_adapters = keep
    print(f"paging {len(names)} experts through {slots} GPU slots: {out['paged_req_per_s']:.2f} req/s vs "
          f"{out['all_resident_req_per_s']:.2f} all resident ({out['paged_over_resident']:.2f}); page-in "
          f"{out['page_in_ms']}; {out['paging_counts']}", flush=True)
    return out


if __name__ == "__main__":
    main()
