"""Does the MLLM router survive a non-IID test? Train it once on the train look, route the shifted test.

One router over every task of a benchmark (the last stage's pool), trained in process on
``--samples`` training items per task (plus ``--augment`` look-jittered copies of each,
:mod:`cl_service.data.augment`) for ``--steps`` steps; then the share of each task's test and train
items it sends to that task's expert:

    python -m bench.router_probe --augment 0      # acl-mini: the shifted GUI test goes elsewhere
    python -m bench.router_probe --augment 1

Needs the benchmark's shards (``clsvc data synth --benchmark acl-mini --out DIR``, or a run's ``data/``).
CPU, 2 threads: ~4.5 min per 480 steps. Results are appended to ``bench/results/cpu/router_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import append_row  # noqa: E402
from cl_service.config import load_run_cfg  # noqa: E402
from cl_service.data.shards import ShardDataset  # noqa: E402
from cl_service.engine.engine import Engine  # noqa: E402
from cl_service.models.store import ensure_base  # noqa: E402
from cl_service.routers.prompt import Pool  # noqa: E402
from cl_service.train.job import DataPart, TrainJob  # noqa: E402
from cl_service.train.runner import run_train_job  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO / "runs/acl-mini/data"), help="shards of the benchmark")
    ap.add_argument("--config", default=str(REPO / "workloads/configs/acl_mini.yaml"),
                    help="run config whose router.lora / router.train recipe is used")
    ap.add_argument("--augment", type=int, default=0, help="look-jittered copies per router sample")
    ap.add_argument("--swap", type=int, default=0, help="copies with another task's image (router.swap_images)")
    ap.add_argument("--samples", type=int, default=40, help="training items per task")
    ap.add_argument("--steps", type=int, default=480, help="optimizer steps (4 stages x 120 in acl_mini.yaml)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench/results/cpu/router_probe.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_run_cfg(a.config)
    ds = ShardDataset(a.data)
    tasks = list(ds.tasks)
    pool = Pool(tuple(tasks), tuple(ds.task_meta(t)["description"] for t in tasks))
    base = str(ensure_base(cfg.base.profile, log=lambda s: None))
    parts = tuple(DataPart(task=t, limit=a.samples, seed=cfg.seed + 7, router_expert=t, augment=a.augment,
                           swap_images=a.swap) for t in tasks)
    with tempfile.TemporaryDirectory() as out_dir:
        job = TrainJob(name="router", kind="router", task="*", out_dir=out_dir, base_path=base, dataset=a.data,
                       parts=parts, lora=cfg.router.lora, router_pool=pool, seed=cfg.seed,
                       train=dataclasses.replace(cfg.router.train, max_steps=a.steps, batch_size=a.batch_size))
        t0 = time.time()
        state = run_train_job(job)
        train_s = time.time() - t0
        engine = Engine(base)
        routed = {}
        for split in ("test", "train"):
            for t in tasks:
                items = ds.samples(t, split)[:100]
                routes = engine.route_mllm(items, out_dir, pool)
                routed[f"{split}:{t}"] = round(100 * sum(r.expert == t for r in routes) / len(routes), 1)
    row = {"data": ds.manifest.get("benchmark"), "augment": a.augment, "swap": a.swap, "samples": a.samples, "steps": a.steps,
           "batch_size": a.batch_size, "train_s": round(train_s), "loss_last": [round(x, 3) for x in state.losses[-5:]],
           **routed}
    append_row(a.out, row)


if __name__ == "__main__":
    main()
