"""Both stages of two-stage inference in one Serve replica (``colocate=true``).

With separate Router and Expert deployments on one GPU, two processes each hold a copy of the base and the GPU
time-slices between them: a router batch of one request stalls the expert's batch in the other process, and
at 10 requests/s offered the expert's small batches took 1-1.6 s on an H200 (BENCHMARKS.md). :class:`Stages`
holds one engine (one copy of the base, adapters and CUDA graphs) and runs the Router's and the Expert's
batches in two threads on two CUDA streams of that process, stage two at the higher priority, as
:class:`cl_service.engine.Pipeline` does in process. The Ingress calls it exactly as it calls the two
deployments (``route`` then ``answer``), so routing, validation, hot add and errors are unchanged.
"""

from __future__ import annotations

import sys
from typing import Any

from ray import serve

from cl_service._cfgload import from_dict
from cl_service.on_ray.serve import Expert, Router, _engine
from cl_service.serve.catalog import Catalog
from cl_service.serve.config import ServeCfg


_SWITCH_S = 0.0005  # the GIL's switch interval in a Stages replica (Python's default: 0.005)


def _streams(engine: Any) -> tuple[Any, Any]:
    """(stage one's, stage two's) CUDA streams on the engine's GPU, stage two first; (None, None) on a CPU."""
    import torch

    dev = engine.mllm.device
    if dev.type != "cuda":
        return None, None
    # lower number = higher priority: the expert's decode steps (what clients wait on) go first
    return torch.cuda.Stream(dev, priority=0), torch.cuda.Stream(dev, priority=-1)


@serve.deployment(name="Stages")
class Stages:
    """Stage one (``route``, the Router's batching and routers) and stage two (``answer``, the Expert's mixed
    batches) over one shared engine."""

    def __init__(self, cfg: dict) -> None:
        # Two model threads share this process's GIL. A thread blocked on a CUDA sync (stage two's decode step)
        # takes the GIL back only after the interpreter's switch interval (5 ms by default) while the other
        # thread launches an eager prefill; a step needs it several times, so its 10 ms became ~100 ms on an
        # H200 with the MLLM router beside it (BENCHMARKS.md). A shorter interval keeps those waits short.
        sys.setswitchinterval(_SWITCH_S)
        c = from_dict(ServeCfg, cfg)
        run = Catalog.load(c.results, verify=False)
        stage = c.expert if c.expert.max_batch_size >= c.router.max_batch_size else c.router
        engine = _engine(run.resolved["base"], run, stage, c.max_loaded_adapters, c.max_host_adapters)
        engine.batch_size = max(engine.batch_size, c.router.max_batch_size, c.expert.max_batch_size)
        one, two = _streams(engine)
        # the deployments' own classes, undecorated: the same batching, routing and row isolation
        self.router = Router.func_or_class(cfg, engine=engine, stream=one)
        self.expert = Expert.func_or_class(cfg, engine=engine, stream=two)

    async def route(self, sample, router_dir: str | None, experts: tuple[str, ...], descriptions: tuple[str, ...]):
        return await self.router.route(sample, router_dir, experts, descriptions)

    async def answer(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None) -> str:
        return await self.expert.answer(sample, adapter, max_new_tokens, vision_states)

    def batch_sizes(self) -> list[int]:
        """The answer batches' sizes (as the Expert deployment reports them)."""
        return self.expert.batch_sizes()

    def step_log(self) -> list[tuple[float, float, int]]:
        """The decode steps with ``continuous`` (as the Expert deployment reports them)."""
        return self.expert.step_log()

    def batch_log(self, stage: str = "Expert") -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches of ``stage`` (``Router`` or ``Expert``)."""
        return (self.router if stage == "Router" else self.expert).batch_log()
