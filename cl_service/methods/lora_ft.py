"""``lora_ft`` and ``lora_ft_replay``: one LoRA trained sequentially over the stream.

Stage ``i`` continues the adapter of stage ``i-1`` on task ``i`` (the projector too). The replay
variant mixes in ``replay.samples_per_task`` training samples of every earlier task (a fixed,
seeded choice per task, as a replay buffer would hold).
"""

from __future__ import annotations

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import stage_dir
from cl_service.train.job import DataPart, TrainJob


class _Sequential:
    name = "lora_ft"
    routed = False
    replay = False

    def jobs(self, ctx: StageContext) -> list:
        cfg = ctx.cfg
        parts = [DataPart(task=ctx.task, limit=cfg.data.train_limit, seed=cfg.seed)]
        if self.replay:
            parts += [DataPart(task=t, limit=cfg.replay.samples_per_task, seed=cfg.seed + 1) for t in ctx.seen[:-1]]
        init = str(stage_dir(ctx, self.name, ctx.stage - 1)) if ctx.stage > 0 else None
        return [TrainJob(name=f"{self.name}/stage-{ctx.stage}", kind="sequential", task=ctx.task,
                         out_dir=str(stage_dir(ctx, self.name, ctx.stage)), base_path=ctx.extra["base_path"],
                         dataset=ctx.extra["dataset"], parts=tuple(parts), lora=cfg.expert.lora,
                         train=cfg.expert.train, init_adapter=init,
                         description=f"{self.name} after {ctx.task}", seed=cfg.seed)]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        adapter = str(stage_dir(ctx, self.name, ctx.stage))
        return [Answer(t) for t in ctx.engine.answer(samples, adapter)]


@METHODS.register("lora_ft")
class LoraFT(_Sequential):
    pass


@METHODS.register("lora_ft_replay")
class LoraFTReplay(_Sequential):
    name = "lora_ft_replay"
    replay = True
