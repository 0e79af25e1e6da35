"""``disco``: DISCO (Guo et al., ICCV 2025, "Federated Continual Instruction Tuning", dynamic knowledge organisation
and subspace selective activation) without the federation, as the MLLM-CL reference code (MCITlib) runs it.

Training: one LoRA subspace per task, only the new task's trained (earlier ones frozen), each of rank ``disco.rank``
(default: ``expert.lora.rank`` split over the stream's tasks, the reference's rank 160 = 5 x 32), the projector
carried from task to task, and the task's text and image prototypes (means of base features over its training
data): jobs of kind ``tasklora`` (:mod:`cl_service.adapters.tasklora`), shared with ``hide`` when the ranks agree.

Inference, per request: every adapted decoder Linear adds ``sum_t w_t B_t A_t x`` over the tasks learned so far, with
``w = softmax(cos(question, text prototype_t) / 0.05)`` (:func:`cl_service.routers.soft.prototype_weights`;
text only, as the reference's inference). The reference scores the mean feature of its evaluation batch; here each
request is scored alone. Its replay variant ``disco_replay`` (the paper's DISCO*) is generated
(:mod:`cl_service.methods.replay`): each task's subspace also sees earlier tasks' samples, its prototypes only its own.
"""

from __future__ import annotations

import numpy as np

from cl_service.methods.base import METHODS, Answer, StageContext
from cl_service.methods.common import answer_by_mixture, task_lora_group, task_lora_job
from cl_service.routers.soft import prototype_weights

#: The reference's softmax temperature; fixed, not a setting: finished stage records would keep answers it changed.
TEMPERATURE = 0.05


@METHODS.register("disco")
class Disco:
    """DISCO (non-federated): per-task LoRA subspaces mixed in every layer by text-prototype weights, per request."""

    name = "disco"
    routed = False
    sequential = True  # per-task parts trained in stream order (the projector carries over): replay applies
    serving = "one answer from all its task subspaces at once (mixed in every layer by per-request prototype " \
              "weights), which the serving stages, one expert per request, do not compute"

    def group(self, ctx: StageContext) -> tuple[str, int]:
        """Its task LoRAs' folder group under ``adapters/`` and their rank (shared with every method of that rank)."""
        return task_lora_group(ctx, self, ctx.cfg.disco.rank, "disco.rank")

    def jobs(self, ctx: StageContext) -> list:
        return [task_lora_job(ctx, *self.group(ctx))]

    def evaluates(self, ctx: StageContext) -> bool:
        return True

    @staticmethod
    def weights(text: np.ndarray, image: np.ndarray, means: list) -> np.ndarray:
        """``[B, T]``: softmax of the text-prototype cosines at ``TEMPERATURE`` (the image is not used)."""
        return prototype_weights(text, np.stack([m.text.numpy() for m in means]), TEMPERATURE)

    def predict(self, ctx: StageContext, samples) -> list[Answer]:
        return answer_by_mixture(ctx, self.group(ctx)[0], samples, self.weights, mixed_from=0)
