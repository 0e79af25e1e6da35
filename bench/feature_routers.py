"""Which training-free router, on which base features? Every feature router fit at the last stage of a run.

Fits each router on the samples the run's feature-routed methods use (``router.samples_per_task`` per
task plus ``router.augment`` look-jittered copies, seed + 7) and scores the share of every task's test
items it sends to that task's expert. Rows (router over features):

- ``prototype``: nearest class mean (cosine) of the decoder state pooled over the whole prompt (the
  ``prototype`` router);
- ``prototype/routing``: nearest class mean of the ``knn`` router's features (question alone | images);
- ``ridge``: the closed-form ``ridge`` router on question-with-image | images features;
- ``knn``: nearest neighbour on the question alone | images (the ``knn`` router).

    python -m bench.feature_routers --run runs/acl-mini --config workloads/configs/acl_mini.yaml

CPU, seconds. Results are appended to ``bench/results/cpu/feature_routers.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import append_row  # noqa: E402
from cl_service.config import load_run_cfg  # noqa: E402
from cl_service.data.shards import ShardDataset  # noqa: E402
from cl_service.engine import Engine  # noqa: E402
from cl_service.models.store import ensure_base  # noqa: E402
from cl_service.routers.nearest import NearestRouter  # noqa: E402
from cl_service.routers.prototype import PrototypeRouter  # noqa: E402
from cl_service.routers.ridge import RidgeRouter  # noqa: E402
from cl_service.train.job import choose, choose_with_copies  # noqa: E402


class _RoutingMeans:
    """The engine as the prototype router sees it, with the knn router's embedded features."""

    def __init__(self, engine: Engine, embed) -> None:
        self.engine, self.embed = engine, embed

    def features(self, samples):
        return self.embed(np.asarray(self.engine.routing_features(samples), dtype=np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run folder (its data/ holds the shards)")
    ap.add_argument("--config", required=True, help="the run's config (router.samples_per_task, augment, seed)")
    ap.add_argument("--out", default=str(REPO / "bench/results/cpu/feature_routers.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_run_cfg(a.config)
    ds = ShardDataset(Path(a.run) / "data")
    rc, seed = cfg.router, cfg.seed + 7
    fit = {t: choose_with_copies(ds, t, "train", rc.samples_per_task, seed, rc.augment) for t in ds.tasks}
    test = {t: choose(ds.samples(t, "test"), cfg.data.test_limit, cfg.seed) for t in ds.tasks}
    engine = Engine(str(ensure_base(cfg.base.profile)), cfg)
    engine.enable_memo()
    knn = NearestRouter.fit(engine, fit)
    routers = {"prototype": PrototypeRouter.fit(engine, fit),
               "prototype/routing": PrototypeRouter.fit(_RoutingMeans(engine, knn.embed), fit),
               "ridge": RidgeRouter.fit(engine, fit), "knn": knn}
    for name, router in routers.items():
        t0 = time.perf_counter()
        with engine.memo_off():  # features afresh: route_s is the real cost
            acc = {t: round(100 * float(np.mean([r.expert == t for r in router.route(s)])), 1)
                   for t, s in test.items()}
        append_row(a.out, {"run": str(a.run), "benchmark": cfg.data.benchmark, "router": name,
                           "fit_per_task": len(next(iter(fit.values()))), "accuracy": acc,
                           "min": min(acc.values()), "route_s": round(time.perf_counter() - t0, 2)})


if __name__ == "__main__":
    main()
