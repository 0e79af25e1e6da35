"""Both stages of two-stage inference in one Serve replica (``colocate=true``).

With separate Router and Expert deployments on one GPU, two processes each hold a copy of the base and the GPU
time-slices between them: a router batch of one request stalls the expert's batch in the other process, and
at 10 requests/s offered the expert's small batches took 1-1.6 s on an H200 (BENCHMARKS.md). :class:`Stages`
holds :class:`~cl_service.serve.stages.TwoStages`, the model of ``clsvc serve --local``: one engine (one copy of
the base, adapters and CUDA graphs), the Router's and the Expert's batches in two threads on two CUDA streams,
stage two at the higher priority. The Ingress calls it exactly as it calls the two deployments (``route`` then
``answer``), so routing, validation, hot add and errors are unchanged.
"""

from __future__ import annotations

import sys
from typing import Any

from ray import serve

from cl_service._cfgload import from_dict
from cl_service.serve.config import ServeCfg
from cl_service.serve.stages import Answer, TwoStages


_SWITCH_S = 0.0005  # the GIL's switch interval in a Stages replica (Python's default: 0.005)


@serve.deployment(name="Stages")
class Stages:
    """Stage one (``route``) and stage two (``answer``, ``answer_stream``) over one shared engine."""

    def __init__(self, cfg: dict) -> None:
        # Two model threads share this process's GIL. A thread blocked on a CUDA sync (stage two's decode step)
        # takes the GIL back only after the interpreter's switch interval (5 ms by default) while the other
        # thread launches an eager prefill; a step needs it several times, so its 10 ms became ~100 ms on an
        # H200 with the MLLM router beside it (BENCHMARKS.md). A shorter interval keeps those waits short.
        sys.setswitchinterval(_SWITCH_S)
        self.stages = TwoStages(from_dict(ServeCfg, cfg), pack=True)  # the states travel through the Ingress

    async def route(self, sample, router_dir: str | None, experts: tuple[str, ...], descriptions: tuple[str, ...]):
        return await self.stages.route(sample, router_dir, experts, descriptions)

    async def answer(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None) -> Answer:
        return await self.stages.answer(sample, adapter, max_new_tokens, vision_states)

    async def answer_stream(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None):
        async for item in self.stages.answer_stream(sample, adapter, max_new_tokens, vision_states):
            yield item

    def batch_sizes(self) -> list[int]:
        """The answer batches' sizes (as the Expert deployment reports them)."""
        return self.stages.expert.batch_sizes()

    def step_log(self) -> list[tuple[float, float, int]]:
        """The decode steps with ``continuous`` (as the Expert deployment reports them)."""
        return self.stages.expert.step_log()

    def batch_log(self, stage: str = "Expert") -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches of ``stage`` (``Router`` or ``Expert``)."""
        return self.stages.batch_log(stage)
