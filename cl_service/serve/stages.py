"""The two model stages of serving, plain classes that both serving stacks run.

- :class:`RouteStage` (stage one): CLIP once per request, then the router the config names (``mllm``: the run's
  MLLM router; ``prototype`` / ``ridge`` / ``knn``: the feature router the run saved), requests of many clients
  in one batch.
- :class:`AnswerStage` (stage two): base + the chosen expert, rows for different experts in one batch
  (:meth:`Engine.answer_mixed`), or with ``continuous`` joining the running decode
  (:class:`~cl_service.engine.continuous.ContinuousBatcher`). Every answer carries its token counts; a streamed
  one yields its text as the tokens are decoded.
- :class:`TwoStages`: both over one engine (one copy of the base), on two CUDA streams on a GPU: ``clsvc serve
  --local`` and the Ray Serve ``Stages`` replica (``colocate``). The Ray ``Router`` / ``Expert`` deployments each
  hold one stage.

Both batch with :class:`~cl_service.serve.batcher.Batcher` (a batch is gathered when the model is free) and run
the model in a worker thread, so the event loop that awaits them keeps taking requests. Nothing here knows of
Ray or gRPC transports.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc

from cl_service.routers.base import over_states
from cl_service.serve.batcher import Batcher
from cl_service.serve.catalog import Catalog, RequestError, admit
from cl_service.serve.config import ServeCfg, StageCfg
from cl_service.serve.states import pack_states, unpack_states
from cl_service.serve.streaming import TextStream
from cl_service.serve.twostage import answer_grouped, per_sample_states, route_grouped, run_rows

__all__ = ["Answer", "AnswerStage", "RouteStage", "TwoStages", "load_engine"]


@dataclass(frozen=True)
class Answer:
    """Stage two's result for one request."""

    text: str
    prompt_tokens: int
    """Tokens the expert read: image tokens, the question and the chat template."""
    completion_tokens: int
    """Tokens the expert generated, its end-of-sequence token included when it emitted one."""
    finish_reason: str = "stop"
    """``stop``: the expert emitted its end-of-sequence token; ``length``: ``max_new_tokens`` came first."""


def load_engine(run: Catalog, stage: StageCfg, max_loaded: int = 16, max_host: int = 32, device: str | None = None,
                batch_size: int = 0) -> Any:
    """The run's base in an :class:`~cl_service.engine.Engine` as the run evaluated it (dtype, prompt style,
    answer lengths), with ``stage.torch_threads`` threads; ``device`` None: the stage's GPU when it has one."""
    # Batches of varying size and length fragment a fixed-segment CUDA cache (two 7B replicas sharing an
    # H100 ran out with 15 GB reserved but unallocated); read when CUDA is first used in this process.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    from cl_service.engine.engine import Engine

    torch.set_num_threads(max(1, stage.torch_threads))
    if device is None:  # Ray sets CUDA_VISIBLE_DEVICES to the replica's (possibly shared) GPU
        device = "cuda" if stage.num_gpus > 0 and torch.cuda.is_available() else None
    engine = Engine(run.resolved["base"], max_loaded=max_loaded, device=device, max_host_adapters=max_host,
                    **run.base_settings())
    configure(engine, run, max(stage.max_batch_size, batch_size))
    return engine


def configure(engine: Any, run: Catalog, batch_size: int) -> None:
    """Answer lengths as the run evaluated them, and a batch size that takes a whole serving batch in one pass."""
    engine.batch_size = max(engine.batch_size, batch_size)
    engine.max_new_tokens = int(run.run_setting("eval", "max_new_tokens", engine.max_new_tokens))
    engine.router_max_new_tokens = int(run.run_setting("router", "max_new_tokens", engine.router_max_new_tokens))


def stage_batcher(fn: Callable[[list], list], stage: StageCfg, stream: Any = None) -> Batcher:
    """Batches gathered when the model is free (see :mod:`cl_service.serve.batcher`); the model runs in a worker
    thread so the event loop keeps accepting requests meanwhile, on ``stream`` (a CUDA stream of its own when
    both stages share one engine) if given."""
    def on_stream(items: list) -> list:
        import torch

        with torch.cuda.stream(stream):
            out = fn(items)
        stream.synchronize()  # results leave the stage: nothing still running on the stream reads them
        return out

    async def run(items: list) -> list:
        return await asyncio.to_thread(fn if stream is None else on_stream, items)

    return Batcher(run, stage.max_batch_size, stage.batch_wait_ms / 1000.0)


def busy(queued: int, limit: int) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the server is busy: {queued} requests already wait for an answer (max_queued={limit}); "
                        "retry later")


class RouteStage:
    """Stage one: an expert for each request. ``route(sample, router_dir, experts, descriptions)`` returns
    ``(Route, CLIP states of the sample or None)``; ``pack``: states as :func:`~cl_service.serve.states.pack_states`
    parts (they cross processes), else the tensor on the model's device."""

    def __init__(self, cfg: ServeCfg, engine: Any, run: Catalog, stream: Any = None, pack: bool = True) -> None:
        self.cfg, self.engine, self.run, self.pack = cfg, engine, run, pack
        self._routers: dict[tuple, Any] = {}
        self.batcher = stage_batcher(self._route, cfg.router, stream)

    async def route(self, sample, router_dir: str | None, experts: tuple[str, ...], descriptions: tuple[str, ...]):
        return await self.batcher.submit((sample, router_dir, tuple(experts), tuple(descriptions)))

    def batch_log(self) -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches (``time.time()``)."""
        return list(self.batcher.log)

    def _route(self, items: list[tuple]) -> list:
        """``[(sample, router_dir, experts, descriptions)] -> [(Route, states)]``; a row the model cannot take
        gets its ``INVALID_ARGUMENT``, a row that fails its own error (only)."""
        errors = [a if isinstance(a := admit(self.engine, it[0], 1), RequestError) else None for it in items]
        return run_rows(self._route_rows, items, errors)

    def _route_rows(self, items: list[tuple]) -> list[tuple]:
        from cl_service.routers.prompt import Pool

        samples = [it[0] for it in items]
        on_device = None
        if self.cfg.share_vision_states:  # CLIP once per request, for both stages
            on_device = per_sample_states(self.engine.vision_states(samples), samples)

        def route(group: list, key: tuple, vs: Any) -> list:
            router_dir, experts, descs = key
            if self.cfg.router_kind == "mllm":
                return self.engine.route_mllm(group, router_dir, Pool(experts, descs), vision_states=vs)
            # prototype / knn features start from the shared CLIP states (knn: one short text-only pass)
            return over_states(self._feature_router(router_dir, experts), self.engine, vs).route(group)

        routes = route_grouped(samples, [it[1:4] for it in items], on_device, route)  # a hot add mid-batch: 2 pools
        out = [None] * len(items) if on_device is None else [pack_states(v) if self.pack else v for v in on_device]
        return list(zip(routes, out))

    def _feature_router(self, router_dir: str | None, experts: tuple[str, ...]) -> Any:
        """The run's saved feature router (cached per folder content), or a prototype router fitted on the
        samples the offline evaluation would use when the run saved none."""
        key = (router_dir, experts if router_dir is None else (Path(router_dir) / "router.json").stat().st_mtime_ns)
        if key not in self._routers:
            if router_dir is not None:
                from cl_service.routers.store import load_router

                self._routers[key] = load_router(router_dir, self.engine)
            else:
                from cl_service.data.shards import ShardDataset
                from cl_service.routers.prototype import PrototypeRouter
                from cl_service.train.job import choose_with_copies

                ds = ShardDataset(self.run.resolved["dataset"])
                n = self.cfg.prototype_samples_per_task or int(self.run.run_setting("router", "samples_per_task", 20))
                seed = int(self.run.resolved.get("seed", 0)) + 7  # the seed the feature-routed methods use
                augment = int(self.run.run_setting("router", "augment", 0))
                per_task = {t: choose_with_copies(ds, t, "train", n, seed, augment) for t in experts}
                self._routers[key] = PrototypeRouter.fit(self.engine, per_task)
        return self._routers[key]


class _Tokens:
    """A row's ``on_token``: counts the tokens (in the model's thread), keeps the last and hands each to
    ``forward``."""

    def __init__(self, forward: Callable[[int], None] | None = None) -> None:
        self.n, self.last, self.forward = 0, None, forward

    def __call__(self, token: int) -> None:
        self.n += 1
        self.last = token
        if self.forward is not None:
            self.forward(token)

    def finish_reason(self, eos_id: int) -> str:
        """``stop`` when the row's last token was its end of sequence, else ``length`` (the decode stops at an
        end of sequence or at ``max_new_tokens``, nothing else)."""
        return "stop" if self.last == eos_id else "length"


_END = object()


class AnswerStage:
    """Stage two: base + the chosen expert. One batch holds rows for any mix of experts; with ``continuous``,
    requests join the running decode between steps instead. At most ``max_queued`` requests wait for it."""

    def __init__(self, cfg: ServeCfg, engine: Any, stream: Any = None) -> None:
        self.cfg, self.engine = cfg, engine
        self.batcher = self.cont = None
        if cfg.continuous:
            import time

            self.cont = engine.continuous(slots=cfg.expert.max_batch_size, max_queue=cfg.max_queued,
                                          wait_s=cfg.expert.batch_wait_ms / 1000.0, stream=stream)
            self._clock = time.time() - time.perf_counter()  # its log is in perf_counter seconds
        else:
            self.batcher = stage_batcher(self._answer, cfg.expert, stream)

    def close(self) -> None:
        if self.cont is not None:
            self.cont.close()

    async def answer(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None) -> Answer:
        return await self._submit(sample, adapter, max_new_tokens, vision_states, _Tokens())

    async def answer_stream(self, sample, adapter: str, max_new_tokens: int | None,
                            vision_states: Any = None) -> AsyncIterator[str | Answer]:
        """The answer's text in pieces as its tokens are decoded (their concatenation is the answer's text),
        then the :class:`Answer`. Leaving the loop early (a client gone) cancels a request still waiting."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        tokens = _Tokens(lambda t: loop.call_soon_threadsafe(queue.put_nowait, t))
        # the tokens reach the loop before the answer does: both come through call_soon_threadsafe, in order
        task = asyncio.ensure_future(self._submit(sample, adapter, max_new_tokens, vision_states, tokens))
        task.add_done_callback(lambda _: queue.put_nowait(_END))
        text = TextStream(self.engine.mllm.tokenizer, self.engine.mllm.eos_id)
        try:
            while (item := await queue.get()) is not _END:
                if piece := text.push(item):
                    yield piece
            answer = task.result()  # the row's own error, if it failed
            if piece := text.end(answer.text):
                yield piece
            yield answer
        finally:
            if not task.done():
                task.cancel()

    async def _submit(self, sample, adapter: str, n: int | None, vision_states: Any, tokens: _Tokens) -> Answer:
        if self.cont is None:
            if self.batcher.queued >= self.cfg.max_queued:
                raise busy(self.batcher.queued, self.cfg.max_queued)
            return await self.batcher.submit((sample, adapter, n, vision_states, tokens))
        from cl_service.engine.continuous import QueueFull, ResourceExhausted

        prompt = admit(self.engine, sample, n)
        if isinstance(prompt, RequestError):
            raise prompt
        # packed states (from another process) to CPU, the batcher's worker moves them; a tensor stays where it is
        vs = unpack_states([vision_states], "cpu") if isinstance(vision_states, tuple) else vision_states
        try:
            fut = self.cont.submit(sample, adapter, n, vs, on_token=tokens)
        except QueueFull:
            raise busy(self.cont.queued, self.cfg.max_queued) from None
        try:
            text = await asyncio.wrap_future(fut)
        except ResourceExhausted as e:  # no room for its keys/values now (KVCacheFull): the client may retry
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later") from None
        return Answer(text, prompt, tokens.n, tokens.finish_reason(self.engine.mllm.eos_id))

    def _answer(self, items: list[tuple]) -> list:
        """Rows for different experts share each forward pass (``Engine.answer_mixed``); one call per distinct
        ``max_new_tokens``. A row over the model's token budget gets its ``INVALID_ARGUMENT``, a row that fails
        its own error; the others their answers."""
        prompts = [admit(self.engine, it[0], it[2]) for it in items]
        texts = run_rows(self._answer_rows, items, [p if isinstance(p, RequestError) else None for p in prompts])
        eos = self.engine.mllm.eos_id
        return [t if isinstance(t, Exception) else Answer(t, p, it[4].n, it[4].finish_reason(eos))
                for t, p, it in zip(texts, prompts, items)]

    def _answer_rows(self, items: list[tuple]) -> list[str]:
        samples = [it[0] for it in items]
        vs = _states([it[3] for it in items], self.engine.mllm.device)  # one transfer for the batch
        return answer_grouped(self.engine, samples, [it[1] for it in items], [it[2] for it in items],
                              None if vs is None else per_sample_states(vs, samples), [it[4] for it in items])

    def batch_sizes(self) -> list[int]:
        return [n for _, _, n in self.batch_log()]

    def batch_log(self) -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches (``time.time()``); with ``continuous``, of the last
        prefills of requests joining the decode."""
        return list(self.batcher.log) if self.cont is None else self._log("prefill")

    def step_log(self) -> list[tuple[float, float, int]]:
        """With ``continuous``: ``(start, end, rows decoding)`` of the last decode steps (``time.time()``)."""
        return self._log("step") if self.cont is not None else []

    def _log(self, kind: str) -> list[tuple[float, float, int]]:
        return [(a + self._clock, b + self._clock, n) for k, a, b, n in list(self.cont.log) if k == kind]


def _states(parts: list, device: Any) -> Any:
    """The batch's CLIP states on ``device`` from per-request parts (packed or tensors); None when any is missing."""
    if not parts or any(p is None for p in parts):
        return None
    if isinstance(parts[0], tuple):
        return unpack_states(parts, device)
    import torch

    return torch.cat([p.to(device) for p in parts])


def _streams(engine: Any) -> tuple[Any, Any]:
    """(stage one's, stage two's) CUDA streams on the engine's GPU, stage two first; (None, None) on a CPU."""
    import torch

    dev = engine.mllm.device
    if dev.type != "cuda":
        return None, None
    # lower number = higher priority: the expert's decode steps (what clients wait on) go first
    return torch.cuda.Stream(dev, priority=0), torch.cuda.Stream(dev, priority=-1)


class TwoStages:
    """Both stages over one engine (one copy of the base, adapters and CUDA graphs), their batches in two threads
    on two CUDA streams, stage two at the higher priority: stage one of the next batch runs next to stage two of
    the last. ``engine`` None: the run's base, loaded on ``device`` (None: the stages' GPU, if any). ``pack``:
    whether the CLIP states leave in the cross-process form (they travel through a Ray ingress)."""

    def __init__(self, cfg: ServeCfg, engine: Any = None, device: str | None = None, pack: bool = False) -> None:
        run = Catalog.load(cfg.results, verify=False, method=cfg.method, stage=cfg.stage)
        both = max(cfg.router.max_batch_size, cfg.expert.max_batch_size)
        if engine is None:
            stage = StageCfg(num_gpus=cfg.router.num_gpus + cfg.expert.num_gpus, max_batch_size=both,
                             torch_threads=max(cfg.router.torch_threads, cfg.expert.torch_threads))
            engine = load_engine(run, stage, cfg.max_loaded_adapters, cfg.max_host_adapters, device)
        else:
            configure(engine, run, both)
        self.engine = engine
        one, two = _streams(engine)
        self.router = RouteStage(cfg, engine, run, one, pack=pack)
        self.expert = AnswerStage(cfg, engine, two)

    def route(self, sample, router_dir, experts, descriptions):
        return self.router.route(sample, router_dir, experts, descriptions)

    def answer(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None):
        return self.expert.answer(sample, adapter, max_new_tokens, vision_states)

    def answer_stream(self, sample, adapter: str, max_new_tokens: int | None, vision_states: Any = None):
        return self.expert.answer_stream(sample, adapter, max_new_tokens, vision_states)

    def batch_log(self, stage: str = "Expert") -> list[tuple[float, float, int]]:
        """``(start, end, size)`` of the last 1000 batches of ``stage`` (``Router`` or ``Expert``)."""
        return (self.router if stage == "Router" else self.expert).batch_log()

    def close(self) -> None:
        self.expert.close()
