"""``joint``: the multi-task upper bound — one LoRA trained on all tasks at once, evaluated at the end.

Only the last row of its accuracy matrix is filled (MFT; MFN/BWT are not defined for it).
"""

from __future__ import annotations

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.train.job import DataPart, TrainJob


@METHODS.register("joint")
class Joint:
    """The multi-task upper bound: one LoRA trained on every task at once, evaluated at the end."""

    name = "joint"
    routed = False
    serving = "one multi-task LoRA, with no per-task experts or router for clsvc serve to route to"

    def _dir(self, ctx: StageContext):
        return ctx.run_dir / "adapters" / "joint" / "all"

    def jobs(self, ctx: StageContext) -> list:
        if not ctx.is_last:
            return []
        cfg = ctx.cfg
        parts = tuple(DataPart(task=t, limit=cfg.data.train_limit, seed=cfg.seed) for t in ctx.tasks)
        return [TrainJob(name="joint/all", kind="joint", task="*", out_dir=str(self._dir(ctx)),
                         base_path=ctx.extra["base_path"], dataset=ctx.extra["dataset"], parts=parts,
                         lora=cfg.expert.lora, train=cfg.expert.train, description="joint multi-task LoRA",
                         seed=cfg.seed)]

    def evaluates(self, ctx: StageContext) -> bool:
        return ctx.is_last

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return [Answer(t) for t in ctx.engine.answer(samples, str(self._dir(ctx)))]
