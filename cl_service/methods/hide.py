"""``hide``: HiDe-LLaVA (Guo et al., ACL 2025, "Hierarchical Decoupling for Continual Instruction Tuning of Multimodal
Large Language Model"), as its reference code runs it.

Training: one LoRA expert per task, only the new task's trained (earlier ones frozen), each of rank ``hide.rank``
(default: ``expert.lora.rank`` split over the stream's tasks, the reference's rank 160 = 5 x 32), the projector
carried from task to task, and the task's image and text anchors (means of base features over its training data):
jobs of kind ``tasklora`` (:mod:`cl_service.adapters.tasklora`), shared with ``disco`` when the ranks agree.

Inference, per request: every adapted decoder layer but the last applies the fused expert ``(sum_t B_t)(sum_t A_t)
x`` over the tasks learned so far; the last layer applies ``sum_t w_t B_t A_t x`` with ``w = softmax(s /
0.1)``, ``s_t`` the mean of the image's and the question's cosine to task ``t``'s anchors
(:func:`cl_service.routers.soft.anchor_weights`). Its replay variant ``hide_replay`` is generated
(:mod:`cl_service.methods.replay`): each task's expert also sees earlier tasks' samples, its anchors only its own.
"""

from __future__ import annotations

import numpy as np

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_by_mixture, task_lora_group, task_lora_job
from cl_service.routers.soft import anchor_weights

#: The reference's softmax temperature; fixed, not a setting: finished stage records would keep answers it changed.
TEMPERATURE = 0.1


@METHODS.register("hide")
class HiDe:
    """HiDe-LLaVA: per-task LoRA experts, fused below the last layer, anchor-weighted in it, per request."""

    name = "hide"
    routed = False
    sequential = True  # per-task parts trained in stream order (the projector carries over): replay applies
    serving = "one answer from all its task LoRAs at once (fused below the last layer, mixed in it by per-request " \
              "anchor weights), which the serving stages, one expert per request, do not compute"

    def group(self, ctx: StageContext) -> tuple[str, int]:
        """Its task LoRAs' folder group under ``adapters/`` and their rank (shared with every method of that rank)."""
        return task_lora_group(ctx, self, ctx.cfg.hide.rank, "hide.rank")

    def jobs(self, ctx: StageContext) -> list:
        return [task_lora_job(ctx, *self.group(ctx))]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    @staticmethod
    def weights(text: np.ndarray, image: np.ndarray, means: list) -> np.ndarray:
        """``[B, T]``: softmax of the mean image and text anchor cosines at ``TEMPERATURE``."""
        return anchor_weights(text, image, np.stack([m.text.numpy() for m in means]),
                              np.stack([m.image.numpy() for m in means]), TEMPERATURE)

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return answer_by_mixture(ctx, self.group(ctx)[0], samples, self.weights, mixed_from=-1)
