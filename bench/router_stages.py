"""The MLLM router stage by stage, as a run trains it, without the rest of the run.

``clsvc run``'s own path (``run_stream``, in process, no Ray) with ``methods=[mrlora]`` and one-step experts: the
router jobs are the run's (same data parts, look-jittered and image-swapped copies, continued from the previous
stage's router, same steps), at the run's global batch (``ray.num_workers`` x ``router.train.batch_size``), while
the experts cost next to nothing. After every stage, the share of each seen task's test items the router sends
to that task's expert, and where the others went:

    python -m bench.router_stages --config workloads/configs/acl_mini.yaml
    python -m bench.router_stages --config workloads/configs/acl_mini.yaml router.train.max_steps=240

Routing does not depend on the experts, so this is the run's router recipe on the same base; a run on 2 DDP
workers draws other random streams (dropout, data order), and its routing can differ (acl-mini at 4 epochs per
stage: every task 100% here, OCR 75% at the end of `make demo-acl`). CPU, 2 threads, acl-mini: 400 s at 240 router
steps per stage, 580 s at 4 epochs per stage.
Rows are appended to ``bench/results/cpu/router_stages.jsonl``.
"""

from __future__ import annotations

import argparse
import collections
import json
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
from cl_service.run import LocalTrainer, run_stream  # noqa: E402


def stage_routes(out: Path, method: str = "mrlora") -> list[dict]:
    """Per stage, from a run folder's records: ``{"stage", "task", "acc": {task: %}, "to": {task: {expert: n}},
    "by_question": {task: {question type: {expert: n}}}, "router_loss_last": mean loss of the stage's router
    over its last 10 steps}``. The question type is the question's first three words."""
    rows = []
    for rec_file in sorted((out / "stages" / method).glob("stage-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        rec = json.loads(rec_file.read_text())
        to: dict[str, dict[str, int]] = {}
        by_q: dict[str, dict[str, dict[str, int]]] = {}
        for f in sorted((out / "predictions" / method / rec_file.stem).glob("*.jsonl")):
            preds = [json.loads(line) for line in f.read_text().splitlines()]
            to[f.stem] = dict(sorted(collections.Counter(p["metadata"]["expert"] for p in preds).items()))
            qs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
            for p in preds:
                qs[" ".join(p["prompt"].split()[:3])][p["metadata"]["expert"]] += 1
            by_q[f.stem] = {q: dict(sorted(c.items())) for q, c in sorted(qs.items())}
        log = out / "adapters" / "router" / f"stage-{rec['stage']}-{rec['task']}" / "train_log.json"
        losses = json.loads(log.read_text()).get("losses") or [] if log.is_file() else []
        rows.append({"stage": rec["stage"], "task": rec["task"],
                     "acc": {t: round(a, 1) for t, a in rec["router_accuracy"].items()}, "to": to, "by_question": by_q,
                     "router_loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "workloads/configs/acl_mini.yaml"))
    ap.add_argument("--tag", default="", help="a label for the row")
    ap.add_argument("--out", default=str(REPO / "bench/results/cpu/router_stages.jsonl"))
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run config (the router recipe)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg0 = load_run_cfg(a.config, a.overrides)
    workers = max(1, cfg0.ray.num_workers)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = load_run_cfg(a.config, [*a.overrides, f"out={out}", "methods=[mrlora]", "ray.num_workers=0",
                                      "expert.train.max_steps=1", "eval.max_new_tokens=1",
                                      f"router.train.batch_size={cfg0.router.train.batch_size * workers}"])
        t0 = time.perf_counter()
        run_stream(cfg, LocalTrainer(), log=lambda s: print(s, flush=True))
        resolved = json.loads((out / "config.resolved.json").read_text())
        router_s = sum(json.loads(f.read_text()).get("train_seconds") or 0
                       for f in (out / "adapters" / "router").rglob("train_log.json"))
        append_row(a.out, {"tag": a.tag, "config": Path(a.config).name, "overrides": a.overrides,
                           "base_digest": resolved["base_digest"], "router": {
                               "samples_per_task": cfg.router.samples_per_task, "augment": cfg.router.augment,
                               "swap_images": cfg.router.swap_images, "mode": cfg.router.mode,
                               "steps": cfg.router.train.max_steps, "batch": cfg.router.train.batch_size,
                               "lr": cfg.router.train.lr, "rank": cfg.router.lora.rank},
                           "router_train_s": round(router_s, 1), "wall_s": round(time.perf_counter() - t0, 1),
                           "stages": stage_routes(out)})


if __name__ == "__main__":
    main()
