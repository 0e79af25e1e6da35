"""Cost as the stream grows: routing, evaluation and adapter memory for 5..50 tasks on the CPU.

For each stream length N (the procedural ``proc-N`` streams, :mod:`cl_service.data.synth.proc`), on the tiny base:

- routing accuracy on held-out test items and routing time per request of each router: the MLLM router (its
  LoRA trained by ``mrlora``'s own job at the last stage, short: see ``--router-steps``) and the prototype,
  ridge and knn routers, each measured by the run's own evaluation unit (:class:`StageEvaluator`) of the last
  stage; the MLLM router's prompt length in tokens (whole, and what fits the base's ``max_length``);
- the evaluation cost of one stage (the last) per method: items answered and seconds, with the previous
  stage's unit carried over (``oracle``/``zero_shot``, :func:`cl_service.eval.stage.evaluate_stage`) and
  without (``carry=False``: every entry answered again; the memo still serves repeated answers); both
  evaluators first evaluate stage N-2, as a run's evaluator has; and ``cold``: in a fresh process without the
  memo (a Ray evaluator actor restarted for the stage), with and without the previous unit handed over;
- adapter memory: file bytes of an expert and of the router at the tiny shape (measured) and, computed from
  shapes, an expert at LLaVA-1.5-7B's shape (r64 on q,v; r128 on every decoder Linear + the projector).

Experts train one step (a stage's evaluation cost does not depend on what they learned). Test items per task
shrink as N grows (``--test``) so the whole bench stays within ~20 minutes on 2 cores. Writes
``bench/results/cpu/stream_cost.json`` and ``stream_cost.png``::

    CLSVC_HOME=.clsvc python -m bench.stream_cost                 # N = 5, 10, 20, 50
    CLSVC_HOME=.clsvc python -m bench.stream_cost --sizes 5,10 --out /tmp/sc.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from bench.paths import portable

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
ROUTED = {"mrlora": "mllm", "mrlora_proto": "prototype", "mrlora_ridge": "ridge", "mrlora_knn": "knn"}
TEST_PER_TASK = {5: 20, 10: 16, 20: 10, 50: 6}


def _router_steps(n: int) -> int:
    """MLLM router training steps (batch 8), retrained from the base as ``router.mode=retrain`` does: 120 (what
    dcl_mini.yaml used when these curves were measured; it now continues its router for 80), more for long pools, far short of the paper's ~40 epochs (9.6 epochs of 5 x 20 samples at N = 5, 1.9 at
    N = 50), to keep the bench near 10 minutes on 2 cores (200 steps at N = 5 routed no better: 72% against 79%)."""
    return {5: 120, 10: 120, 20: 160}.get(n, 240)


def _write_stream(n: int, out: Path, train: int, test: int) -> None:
    from cl_service.data.shards import ShardWriter
    from cl_service.data.synth import BENCHMARKS

    spec = BENCHMARKS.get(f"proc-{n}")
    tasks = [{"name": t.name, "scorer": t.scorer, "description": t.description} for t in spec.tasks]
    with ShardWriter(out, tasks, info={"benchmark": spec.name, "stream": spec.task_names, "seed": 0},
                     overwrite=True) as w:
        w.add_all(spec.generate("train", train, 0))
        w.add_all(spec.generate("test", test, 0))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")


def lora_params(cfg, rank: int, targets: tuple[str, ...], projector: bool) -> int:
    """LoRA (A: r x in, B: out x r) parameters on the decoder's ``targets`` of every layer, plus the full
    2-layer projector when the adapter carries its own copy; from a :class:`ModelCfg`'s shapes."""
    h, i = cfg.text_hidden, cfg.text_intermediate
    kv = h * cfg.text_kv_heads // cfg.text_heads
    shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    per_layer = sum(rank * (a + b) for t, (a, b) in shapes.items() if t in targets)
    proj = (cfg.vision_hidden * h + h) + (h * h + h) if projector else 0
    return cfg.text_layers * per_layer + proj


def _tensor_params(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for p in folder.glob("*.safetensors"):
        with safe_open(str(p), "np") as f:
            for k in f.keys():
                n += int(__import__("numpy").prod(f.get_slice(k).get_shape()))
    return n


def _prompt_tokens(mllm, pool, question: str) -> tuple[int, int]:
    """Tokens of the MLLM router's whole prompt, and how many of them the base takes (``max_length`` cut)."""
    from cl_service.data.schema import Sample
    from cl_service.models.mllm import prompt_text
    from cl_service.routers.prompt import router_prompt

    whole = len(mllm.tokenizer(prompt_text(router_prompt(pool, question)))["input_ids"])
    s = Sample("t", "test", "x", [], router_prompt(pool, question), ["?"], "exact", {})
    return whole, len(mllm.encode(s, with_target=False)[0])


def _cost(rec: dict) -> dict:
    return {"items_answered": rec["items_answered"], "seconds": rec["eval_s"], "carried_tasks": len(rec["carried"])}


def _uncut_route_ms(ev, pool, router: str, tokens: int) -> dict:
    """The MLLM router's time per request when its whole prompt is read: the base's ``max_length`` raised for
    the call only (the product cuts the prompt from the left at ``max_length``: 320 tokens on the tiny base).
    One test item per task, at most 50; what the cost would be on a base whose context holds the pool."""
    import dataclasses

    items = [s for t in ev.tasks for s in ev.tests[t][:1]][:50]
    mllm = ev.engine.mllm
    cfg = mllm.cfg
    mllm.cfg = dataclasses.replace(cfg, max_length=max(cfg.max_length, tokens + 128))
    try:
        t0 = time.perf_counter()
        ev.engine.route_mllm(items, router, pool)
        dt = time.perf_counter() - t0
    finally:
        mllm.cfg = cfg
    return {"ms_per_request_uncut": 1000 * dt / len(items), "uncut_requests": len(items)}


def measure(n: int, work: Path, base: str, test: int, log=print) -> dict:
    import torch

    from cl_service.config import load_run_cfg
    from cl_service.data.shards import ShardDataset
    from cl_service.eval.stage import EvalSetup, StageEvaluator
    from cl_service.methods import METHODS
    from cl_service.methods.base import StageContext
    from cl_service.methods.common import expert_dir, seen_pool
    from cl_service.methods.mrlora import router_dir
    from cl_service.models.config import PROFILES
    from cl_service.run import LocalTrainer

    data, out = work / "data", work / "run"
    _write_stream(n, data, train=20, test=test)
    ds = ShardDataset(data)
    tasks = list(ds.tasks)
    steps = _router_steps(n)
    # The dcl_mini.yaml recipes (expert r16 on every decoder Linear + projector; router r8 decoder-only),
    # experts of one step, the router trained `steps` steps of batch 8 on 20 samples of every task.
    cfg = load_run_cfg(None, [
        f"out={out}", f"data.path={data}", f"base.path={base}", "ray.num_workers=0", "seed=0",
        "methods=[mrlora,mrlora_proto,mrlora_ridge,mrlora_knn,oracle,zero_shot]",
        "expert.lora.rank=16", "expert.lora.alpha=32", "expert.train.max_steps=1", "expert.train.batch_size=4",
        "router.samples_per_task=20", "router.lora.rank=8", "router.lora.alpha=16", "router.lora.train_projector=false",
        f"router.train.max_steps={steps}", "router.train.batch_size=8", "router.train.lr=2e-3",
        "eval.batch_size=64", "eval.max_new_tokens=8"])
    descriptions = {t: ds.task_meta(t)["description"] for t in tasks}
    extras = {"base_path": base, "dataset": str(data)}
    trainer = LocalTrainer()
    t0 = time.perf_counter()
    for i, t in enumerate(tasks):  # experts, through the method's own jobs
        trainer.fit(METHODS.get("oracle")().jobs(StageContext(i, tasks, descriptions, out, cfg, None, extras)))
    experts_s = time.perf_counter() - t0
    last = StageContext(n - 1, tasks, descriptions, out, cfg, None, extras)
    router_job = [j for j in METHODS.get("mrlora")().jobs(last) if j.kind == "router"][0]
    t0 = time.perf_counter()
    trainer.fit([router_job])
    router_train_s = time.perf_counter() - t0
    log(f"N={n}: {n} experts in {experts_s:.0f} s, MLLM router ({steps} steps) in {router_train_s:.0f} s")

    setup = EvalSetup(cfg, str(out.resolve()), base, str(data.resolve()), tuple(tasks))
    stage: dict[str, dict] = {}
    routing: dict[str, dict] = {}
    evs = {carry: StageEvaluator(setup, carry=carry) for carry in (False, True)}
    before: dict[str, object] = {}
    for carry, ev in evs.items():
        for m in ("oracle", "zero_shot"):
            before[m] = ev.evaluate(m, n - 2)  # what a run's evaluator holds when the last stage comes
            rec = ev.evaluate(m, n - 1).record
            stage.setdefault(m, {})["carried" if carry else "full"] = _cost(rec)
    for m in ("oracle", "zero_shot"):  # a process without the memo: a Ray evaluator actor restarted for the stage
        stage[m]["cold_full"] = _cost(StageEvaluator(setup).evaluate(m, n - 1).record)
        stage[m]["cold_carried"] = _cost(StageEvaluator(setup).evaluate(m, n - 1, previous=before[m]).record)
    ev = evs[True]
    for m, kind in ROUTED.items():
        rec = ev.evaluate(m, n - 1).record
        acc = list(rec["router_accuracy"].values())
        routing[kind] = {"accuracy": statistics.mean(acc), "min_task_accuracy": min(acc),
                         "ms_per_request": 1000 * rec["router_seconds"] / max(1, rec["router_requests"]),
                         "requests": rec["router_requests"], "fallbacks": rec["fallbacks"]}
        stage[m] = {"full": {"items_answered": rec["items_answered"], "seconds": rec["eval_s"],
                             "router_seconds": round(rec["router_seconds"], 3)}}
        log(f"N={n}: {kind:9s} routing {routing[kind]['accuracy']:5.1f}% (min {min(acc):5.1f}%), "
            f"{routing[kind]['ms_per_request']:.2f} ms/request; stage {rec['eval_s']:.1f} s")
    for m in ("oracle", "zero_shot"):
        log(f"N={n}: {m:9s} stage: full {stage[m]['full']}, carried {stage[m]['carried']}")
    routing["mllm"]["train_steps"], routing["mllm"]["train_s"] = steps, round(router_train_s, 1)
    pool = seen_pool(last)
    whole, kept = zip(*(_prompt_tokens(ev.engine.mllm, pool, s.question) for s in ev.tests[tasks[0]][:4]))
    routing["mllm"]["prompt_tokens"], routing["mllm"]["prompt_tokens_kept"] = max(whole), max(kept)
    routing["mllm"]["max_length"] = ev.engine.mllm.cfg.max_length
    routing["mllm"].update(_uncut_route_ms(ev, pool, str(router_dir(last, n - 1)), max(whole)))

    tiny = PROFILES.get("tiny")
    expert_bytes = _folder_bytes(expert_dir(last, tasks[0]))
    formula = lora_params(tiny, 16, cfg.expert.lora.targets, True)
    memory = {"expert_bytes": expert_bytes, "experts_bytes": sum(_folder_bytes(expert_dir(last, t)) for t in tasks),
              "router_bytes": _folder_bytes(router_dir(last, n - 1)),
              "expert_params_measured": _tensor_params(expert_dir(last, tasks[0])), "expert_params_formula": formula}
    return {"tasks": n, "test_per_task": test, "train_per_task": 20, "experts_train_s": round(experts_s, 1),
            "routing": routing, "stage": stage, "memory": memory}


def llava_7b_memory() -> dict:
    """Bytes of one expert at LLaVA-1.5-7B's shape (bf16), computed from shapes."""
    from cl_service.models.config import PROFILES

    c = PROFILES.get("llava-7b")
    qv = lora_params(c, 64, ("q", "v"), False)
    full = lora_params(c, 128, ("q", "k", "v", "o", "gate", "up", "down"), True)
    return {"r64_qv": {"params": qv, "bytes": 2 * qv}, "r128_all_projector": {"params": full, "bytes": 2 * full}}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(res["sizes"], key=int)
    ns = [int(s) for s in sizes]
    R = [res["sizes"][s] for s in sizes]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    ax = axes[:, :2]
    for kind in ROUTED.values():
        ax[0, 0].plot(ns, [r["routing"][kind]["accuracy"] for r in R], "o-", label=kind)
        ax[0, 1].plot(ns, [r["routing"][kind]["ms_per_request"] for r in R], "o-", label=kind)
    ax[0, 0].set(title="routing accuracy (held-out, mean over tasks)", xlabel="tasks N", ylabel="%", ylim=(0, 102))
    ax[0, 1].set(title="routing time per request (2-core CPU)", xlabel="tasks N", ylabel="ms", yscale="log")
    tw = ax[0, 1].twinx()
    tw.plot(ns, [r["routing"]["mllm"]["prompt_tokens"] for r in R], "k--", label="MLLM prompt tokens")
    tw.set_ylabel("MLLM router prompt tokens (dashed)")
    for m, style in (("oracle", "o-"), ("zero_shot", "s-")):
        for mode, ls in (("full", ":"), ("carried", "-")):
            ax[1, 0].plot(ns, [r["stage"][m][mode]["items_answered"] for r in R], style[0] + ls, label=f"{m} {mode}")
    for m in ROUTED:
        ax[1, 0].plot(ns, [r["stage"][m]["full"]["items_answered"] for r in R], "^-", label=f"{m} (re-routes all)")
    ax[1, 0].set(title="items answered to evaluate the last stage", xlabel="tasks N")
    ax[1, 0].set_yscale("symlog", linthresh=1)  # zero_shot carried answers 0
    ax[1, 1].plot(ns, [r["memory"]["experts_bytes"] / 2**20 for r in R], "o-", label="N experts, tiny (measured)")
    m7 = res["llava_7b"]
    for k, lab in (("r64_qv", "r64 q,v"), ("r128_all_projector", "r128 all + projector")):
        ax[1, 1].plot(ns, [n * m7[k]["bytes"] / 2**30 * 1024 for n in ns], "s--", label=f"N experts, 7B {lab}")
    ax[1, 1].set(title="adapter memory of N experts", xlabel="tasks N", ylabel="MiB", yscale="log")
    sec = axes[0, 2]
    for m in ("oracle",):
        for mode, ls in (("full", ":"), ("carried", "-"), ("cold_full", "--"), ("cold_carried", "-.")):
            if all(mode in r["stage"][m] for r in R):
                sec.plot(ns, [r["stage"][m][mode]["seconds"] for r in R], "o" + ls, label=f"{m} {mode}")
    for m in ROUTED:
        sec.plot(ns, [r["stage"][m]["full"]["seconds"] for r in R], "^-", label=m)
    sec.set(title="seconds to evaluate the last stage", xlabel="tasks N", ylabel="s", yscale="log")
    axes[1, 2].plot(ns, [r["routing"]["mllm"]["ms_per_request"] for r in R], "o-", label="MLLM router, prompt cut at max_length")
    axes[1, 2].plot(ns, [r["routing"]["mllm"]["ms_per_request_uncut"] for r in R], "s--", label="MLLM router, whole prompt")
    axes[1, 2].plot(ns, [r["routing"]["knn"]["ms_per_request"] for r in R], "^-", label="knn")
    axes[1, 2].set(title="routing ms per request: the MLLM router's prompt", xlabel="tasks N", ylabel="ms")
    for a in axes.flat:
        a.set_xscale("log")
        a.set_xticks(ns, [str(n) for n in ns])
        a.minorticks_off()
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="5,10,20,50")
    p.add_argument("--test", default=None, help="test items per task for every N (default: 20/16/10/6 for 5/10/20/50)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "stream_cost.json"))
    a = p.parse_args(argv)
    import torch

    from cl_service.models.store import ensure_base

    torch.set_num_threads(a.threads)
    base = str(Path(ensure_base("tiny")).resolve())
    res: dict = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {a.threads}",
                 "base": "tiny", "command": "python -m bench.stream_cost " + " ".join(argv or []), "sizes": {}}
    t_all = time.perf_counter()
    for n in [int(x) for x in a.sizes.split(",")]:
        test = int(a.test) if a.test else TEST_PER_TASK.get(n, max(4, 200 // n))
        with tempfile.TemporaryDirectory(prefix=f"stream-cost-{n}-") as tmp:
            t0 = time.perf_counter()
            res["sizes"][str(n)] = measure(n, Path(tmp), base, test)
            res["sizes"][str(n)]["wall_s"] = round(time.perf_counter() - t0, 1)
    res["llava_7b"] = llava_7b_memory()
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(portable(res), indent=2))
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {res['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
