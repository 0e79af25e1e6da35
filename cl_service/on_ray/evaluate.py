"""Evaluation on Ray: evaluator actors that each hold the base once and compute (method, stage) units.

Each actor wraps one :class:`cl_service.eval.stage.StageEvaluator` (the base loaded once in an ``Engine``
with its memo on, the test items, the feature routers' training-sample cache), on its GPU when evaluation
uses GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``, so ``cuda`` is the actor's GPU). The driver sends every unit of
a stage to the actors — method ``k`` of ``cfg.methods`` always to actor ``k mod n``, so a method finds its
earlier answers in that actor's memo — and writes the records as they come back.

The actors stay up for the whole run when the cluster can hold them next to one Ray Train worker group;
otherwise (e.g. one GPU, or a 2-CPU machine) they are stopped after each stage's evaluation, so that the next
stage's training can be scheduled, and started again for the next evaluation.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import ray

from cl_service.eval.stage import EvalSetup, LocalEvaluator, StageEvaluator, StageResult, eval_uses_gpu


class _EvalActor:
    """One evaluating process: builds the base once, then answers units (see :class:`StageEvaluator`)."""

    def __init__(self, setup: EvalSetup, device: str | None, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.ev = StageEvaluator(setup, device=device)

    def ready(self) -> str:
        return str(self.ev.engine.mllm.device)

    def evaluate(self, method: str, stage: int, train_s: float) -> StageResult:
        return self.ev.evaluate(method, stage, train_s)


def num_evaluators(cfg: Any, cluster: dict[str, float]) -> int:
    """``eval.num_workers``, with None (auto) = one per GPU of ``cluster`` (``ray.cluster_resources()``) when
    evaluation uses GPUs, else 0 (evaluate in the driver)."""
    if cfg.eval.num_workers is not None:
        return int(cfg.eval.num_workers)
    return int(cluster.get("GPU", 0)) if eval_uses_gpu(cfg) else 0


def _needs(cfg: Any, n: int) -> tuple[dict[str, float], dict[str, float]]:
    """Resources of one Ray Train worker group and of ``n`` evaluator actors."""
    gpus_per_worker = float(getattr(cfg.ray, "gpus_per_worker", 1.0))
    train = {"CPU": cfg.ray.num_workers * cfg.ray.cpus_per_worker,
             "GPU": cfg.ray.num_workers * gpus_per_worker if cfg.ray.use_gpu else 0.0}
    evals = {"CPU": n * cfg.eval.cpus_per_worker, "GPU": n * cfg.eval.num_gpus if eval_uses_gpu(cfg) else 0.0}
    return train, evals


def _fits(need: dict[str, float], cluster: dict[str, float]) -> bool:
    return all(v <= cluster.get(k, 0.0) + 1e-9 for k, v in need.items())


def _say(need: dict[str, float]) -> str:
    return " and ".join(f"{v:g} {k}s" for k, v in need.items() if v) or "nothing"


class RayEvaluator:
    """Evaluator backend of :func:`cl_service.run.run_stream` over ``n`` evaluator actors.

    Args:
        cfg: the ``RunCfg`` (``eval.*``, ``ray.*``: resources, ``ray.timeout_s`` bounds every wait).
        num_workers: actors; default :func:`num_evaluators` of the cluster (must be >= 1 here).
        env: environment variables of the actors.
        log: progress lines.
    """

    def __init__(self, cfg: Any, num_workers: int | None = None, env: dict[str, str] | None = None,
                 log: Callable[[str], None] = print) -> None:
        cluster = ray.cluster_resources()
        n = num_evaluators(cfg, cluster) if num_workers is None else num_workers
        if n < 1:
            raise ValueError("RayEvaluator needs at least one actor (eval.num_workers=0 evaluates in the driver)")
        train, evals = _needs(cfg, n)
        if not _fits(evals, cluster):
            raise ValueError(f"{n} evaluator actor(s) need {_say(evals)}; the cluster has "
                             f"{_say({k: cluster.get(k, 0.0) for k in evals})} (see eval.num_workers, "
                             f"eval.cpus_per_worker, eval.num_gpus)")
        self.cfg, self.n, self.env, self.log = cfg, n, env or {}, log
        self.timeout_s = float(cfg.ray.timeout_s)
        #: keep the actors for the whole run, or stop them after each stage (training needs their resources)
        self.resident = _fits({k: train[k] + evals[k] for k in train}, cluster)
        self._why = (f"the cluster's {_say({k: cluster.get(k, 0.0) for k in train})} cannot hold a training "
                     f"group ({_say(train)}) and {n} evaluator(s) ({_say(evals)}) at once")
        self.setup: EvalSetup | None = None
        self.actors: list[Any] = []
        self._started = False

    def start(self, setup: EvalSetup) -> None:
        self.setup = setup

    def _ensure_actors(self) -> None:
        if self.actors:
            return
        assert self.setup is not None, "start() first"
        gpu = eval_uses_gpu(self.cfg)
        n = min(self.n, len(self.cfg.methods))  # more actors than methods would sit idle
        threads = self.cfg.eval.threads or max(1, int(self.cfg.eval.cpus_per_worker))
        env = {**self.env, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
        cls = ray.remote(_EvalActor).options(
            num_cpus=self.cfg.eval.cpus_per_worker, num_gpus=self.cfg.eval.num_gpus if gpu else 0,
            max_restarts=1, max_task_retries=1, runtime_env={"env_vars": env})
        self.actors = [cls.remote(self.setup, "cuda" if gpu else None, threads) for _ in range(n)]
        try:
            devices = ray.get([a.ready.remote() for a in self.actors], timeout=self.timeout_s)
        except BaseException:
            self._stop()
            raise
        if not self._started:
            self.log(f"evaluation: {n} evaluator actor(s), each holding the base on {', '.join(sorted(set(devices)))}")
        self._started = True

    def evaluate(self, stage: int, methods: Sequence[str], train_s: float) -> Iterator[tuple[str, StageResult]]:
        if not methods:
            return
        self._ensure_actors()
        order = list(self.cfg.methods)
        refs = {self.actors[order.index(m) % len(self.actors)].evaluate.remote(m, stage, train_s): m
                for m in methods}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=self.timeout_s)
                if not ready:
                    raise TimeoutError(f"evaluation of stage {stage}: {[refs[r] for r in pending]} not done in "
                                       f"{self.timeout_s:.0f} s (ray.timeout_s)")
                yield refs[ready[0]], ray.get(ready[0], timeout=self.timeout_s)
        except BaseException:
            self._stop()
            raise
        if not self.resident and stage < len(self.setup.tasks) - 1:
            self.log(f"[stage {stage + 1}] evaluators stopped until the next evaluation: {self._why}")
            self._stop()

    def _stop(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def close(self) -> None:
        self._stop()


def make_evaluator(cfg: Any, log: Callable[[str], None] = print, env: dict[str, str] | None = None):
    """The evaluator of a run on a Ray cluster (Ray initialised): :class:`RayEvaluator` when
    :func:`num_evaluators` is at least 1, else a :class:`LocalEvaluator` in this (the driver's) process,
    which then uses ``eval.threads`` torch threads (every CPU it may use by default)."""
    n = num_evaluators(cfg, ray.cluster_resources())
    if n >= 1:
        return RayEvaluator(cfg, n, env, log)
    import torch

    # Ray starts a job's driver with OMP_NUM_THREADS=1, which left one of a 2-core machine's cores idle
    # through every evaluation.
    torch.set_num_threads(cfg.eval.threads or len(os.sched_getaffinity(0)))
    return LocalEvaluator()
