"""``mrlora`` (MLLM router) and the same experts behind training-free feature routers: ``mrlora_proto``
(prototype: nearest class mean), ``mrlora_ridge`` (closed-form ridge), ``mrlora_knn`` (nearest neighbour).

Parameter isolation: one expert LoRA per task, each trained from the frozen base (shared with
``oracle``). Inference is live two-stage: route every test item, then answer with base + the chosen
expert, batched per expert. The MLLM router is the base plus its own LoRA trained on
``router.samples_per_task`` samples of every task seen so far, with the lettered-pool prompt; it is
retrained from the base at each stage (``router.mode=retrain``) or continued from the previous stage's
router (``continue``). With a single expert in the pool there is nothing to choose and no router is
trained.
"""

from __future__ import annotations

import time

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_by_expert, expert_job, seen_pool
from cl_service.routers.base import Route
from cl_service.train.job import DataPart, TrainJob


def router_dir(ctx: StageContext, stage: int):
    return ctx.run_dir / "adapters" / "router" / f"stage-{stage}-{ctx.tasks[stage]}"


def _timed_routes(ctx: StageContext, fn, samples) -> list[Route]:
    t0 = time.perf_counter()
    routes = fn(samples)
    stats = ctx.extra.setdefault("router_stats", {"seconds": 0.0, "requests": 0})
    stats["seconds"] += time.perf_counter() - t0
    stats["requests"] += len(samples)
    return routes


def _two_stage(ctx: StageContext, route, samples) -> list[Answer]:
    """Route every sample (timed for the report), then answer with base + the chosen expert."""
    routes = _timed_routes(ctx, lambda s: route(ctx, s), samples)
    return answer_by_expert(ctx, samples, [r.expert for r in routes], routes)


@METHODS.register("mrlora")
class MRLoRA:
    """MR-LoRA: one LoRA expert per task behind the MLLM router."""

    name = "mrlora"
    routed = True
    serving = None  # clsvc serve: its experts behind the latest MLLM router
    router_kind = "mllm"

    def jobs(self, ctx: StageContext) -> list:
        jobs = [expert_job(ctx, ctx.task)]
        if ctx.stage == 0:
            return jobs
        cfg = ctx.cfg.router
        pool = seen_pool(ctx)
        parts = tuple(DataPart(task=t, limit=cfg.samples_per_task, seed=ctx.cfg.seed + 7, router_expert=t,
                               augment=cfg.augment, swap_images=cfg.swap_images) for t in ctx.seen)
        init = str(router_dir(ctx, ctx.stage - 1)) if cfg.mode == "continue" and ctx.stage > 1 else None
        jobs.append(TrainJob(name=f"router/stage-{ctx.stage}", kind="router", task="*",
                             out_dir=str(router_dir(ctx, ctx.stage)), base_path=ctx.extra["base_path"],
                             dataset=ctx.extra["dataset"], parts=parts, lora=cfg.lora, train=cfg.train,
                             init_adapter=init, router_pool=pool, description=f"MLLM router over {len(pool.experts)} experts",
                             seed=ctx.cfg.seed))
        return jobs

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def route(self, ctx: StageContext, samples) -> list[Route]:
        pool = seen_pool(ctx)
        if len(pool.experts) == 1:
            return [Route(pool.experts[0], "", False) for _ in samples]
        return ctx.engine.route_mllm(samples, str(router_dir(ctx, ctx.stage)), pool)

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return _two_stage(ctx, self.route, samples)


def feature_router_dir(ctx: StageContext, kind: str, stage: int):
    return ctx.run_dir / "routers" / kind / f"stage-{stage}-{ctx.tasks[stage]}"


class _FeatureRouted:
    """MR-LoRA's experts behind a training-free router over frozen base features (``router_kind``).

    The router is fit once per stage on ``router.samples_per_task`` training samples of every seen task
    (the same samples the MLLM router trains on) and saved under ``<out>/routers/<kind>/`` for serving (by the
    run's driver: :func:`cl_service.eval.stage.write_stage`).
    """

    name = ""
    routed = True
    router_kind = ""
    serving = None  # clsvc serve router_kind=<kind>: its experts behind the saved feature router

    def jobs(self, ctx: StageContext) -> list:
        return [expert_job(ctx, ctx.task)]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def router(self, ctx: StageContext):
        from cl_service._atomic import write_folder
        from cl_service.routers.base import ROUTERS
        from cl_service.routers.store import router_files

        key = f"{self.router_kind}_router"
        router = ctx.extra.get(key)
        if router is None or router.experts != tuple(ctx.seen):
            t0 = time.perf_counter()
            rc = ctx.cfg.router
            per_task = {t: ctx.extra["train_samples"](t, rc.samples_per_task, ctx.cfg.seed + 7, rc.augment)
                        for t in ctx.seen}
            router = ROUTERS.get(self.router_kind).fit(ctx.engine, per_task)
            files = router_files(router, {"samples_per_task": rc.samples_per_task, "augment": rc.augment,
                                          "fit_seconds": round(time.perf_counter() - t0, 3)})
            # An evaluation unit hands its output folders to the run's driver, which writes the results
            # folder (the evaluator may be an actor on another node); without one, write it here.
            emit = ctx.extra.get("emit_folder", write_folder)
            emit(feature_router_dir(ctx, self.router_kind, ctx.stage), files)
            ctx.extra[key] = router
        return router

    def route(self, ctx: StageContext, samples) -> list[Route]:
        return self.router(ctx).route(samples)

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        router = self.router(ctx)  # fit (once per stage) outside the per-request routing time

        def route(_ctx, s):
            with ctx.engine.memo_off():  # features afresh: the reported time per request is the real cost
                return router.route(s)

        return _two_stage(ctx, route, samples)


@METHODS.register("mrlora_proto")
class MRLoRAPrototype(_FeatureRouted):
    """MR-LoRA's experts with the prototype router (nearest class mean of pooled base features)."""

    name = "mrlora_proto"
    router_kind = "prototype"


@METHODS.register("mrlora_ridge")
class MRLoRARidge(_FeatureRouted):
    """MR-LoRA's experts with the closed-form ridge router over base question + image features."""

    name = "mrlora_ridge"
    router_kind = "ridge"


@METHODS.register("mrlora_knn")
class MRLoRANearest(_FeatureRouted):
    """MR-LoRA's experts with the nearest-neighbour router over base question + image features."""

    name = "mrlora_knn"
    router_kind = "knn"
