"""``modalprompt``: ModalPrompt (EMNLP 2025) — per task ``modalprompt.prompts`` soft prompt rows and a transform MLP
that maps them to the task's prototype; the base (decoder, CLIP tower, projector) stays frozen and no LoRA is
trained (:mod:`cl_service.adapters.modalprompt`). Stage ``i`` adds task ``i``'s rows and transform to those of the
earlier stages (frozen) and trains them with ``modalprompt.train``; its adapter holds every task's so far.

Each test request scores the tasks learned by the cosine of its image and question features to their prototypes
and is answered with the top-1 task's rows inserted right after BOS, per request. That choice is a router in
effect: it is timed and reported as one (``routed``: the chosen task is the answer's ``expert``). Its replay variant
``modalprompt_replay`` is generated (:mod:`cl_service.methods.replay`).
"""

from __future__ import annotations

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import stage_dir, stage_job, timed_routes
from cl_service.train.job import job_options


@METHODS.register("modalprompt")
class ModalPrompt:
    """ModalPrompt: per-task soft prompts chosen per request by image and question prototypes."""

    name = "modalprompt"
    routed = True
    router_kind = "modalprompt"
    sequential = True
    serving = "soft prompts inserted after BOS, picked per request by the prototypes of its stage, which clsvc " \
              "serve's per-task LoRA experts and routers do not answer with"

    def jobs(self, ctx: StageContext) -> list:
        c = ctx.cfg.modalprompt
        # No LoRA: the job's lora is None, so no expert.lora setting changes its key.
        return [stage_job(ctx, self.name, "modalprompt", options=job_options(prompts=c.prompts))
                .replace(lora=None, train=c.train)]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        adapter = str(stage_dir(ctx, self.name, ctx.stage))
        tasks = timed_routes(ctx, lambda s: ctx.engine.choose_prompts(s, adapter), samples)
        texts = ctx.engine.answer_prompted(samples, adapter, tasks)
        return [Answer(t, task) for t, task in zip(texts, tasks)]
