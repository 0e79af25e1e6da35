"""DeepSpeed ZeRO-2 variant of :func:`cl_service.train.loop.train_steps` (``ray.strategy=deepspeed``).

Same data order, schedule, clipping, accumulation and :class:`TrainState` as the plain loop; the
DeepSpeed engine partitions gradients and AdamW state across the data-parallel ranks (ZeRO stage 2)
and does the all-reduce. Needs an initialised ``torch.distributed`` group (a Ray Train worker, or
torchrun). Resuming restores the weights, step, schedule position and data position, and each rank's
partition of the optimizer (AdamW moments and fp32 master weights) from :func:`zero_optimizer_state`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from cl_service.train.loop import TrainCfg, TrainState, autocast_context, epoch_iter, lr_lambda, autocast_kind, total_steps


def zero2_config(cfg: TrainCfg, gpu: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO stage 2, our batch size/accumulation/clipping/precision."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
        "bf16": {"enabled": autocast_kind(cfg, gpu) == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def zero_optimizer_state(engine: Any) -> dict[str, Any]:
    """This rank's partition of the ZeRO-2 optimizer (moments, fp32 master weights, loss scaler)."""
    return engine.optimizer.state_dict()


def train_steps_zero(module: torch.nn.Module, batches: Any, params: Sequence[torch.nn.Parameter], cfg: TrainCfg,
                     state: TrainState | None = None,
                     on_step: Callable[[TrainState], bool | None] | None = None,
                     optimizer_state: dict[str, Any] | None = None,
                     on_engine: Callable[[Any], None] | None = None) -> TrainState:
    """Optimise ``params`` of ``module`` (``module(batch) -> loss``) under a ZeRO-2 engine.

    ``optimizer_state``: this rank's :func:`zero_optimizer_state` saved at the checkpoint ``state`` comes
    from (restored after the engine is built). ``on_engine(engine)`` hands the engine to the caller, which
    needs it to save that state at its checkpoints."""
    import os

    from cl_service._home import clsvc_home

    # DeepSpeed JIT-builds its ops under TORCH_EXTENSIONS_DIR: keep them in the one clsvc home, not ~/.cache/torch.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(clsvc_home() / "torch_extensions"))
    import deepspeed
    import deepspeed.comm.torch as ds_torch

    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameters given")
    if not params[0].is_cuda:
        # On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce on first use (minutes on a small
        # machine); gloo's all-reduce does the same job.
        ds_torch.build_shm_op = lambda: None
    fresh = state is None
    state = state or TrainState()
    total = state.total_steps or total_steps(cfg, batches)
    state.total_steps = total
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    if state.scheduler is not None:
        sched.load_state_dict(state.scheduler)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                           config=zero2_config(cfg, params[0].is_cuda), dist_init_required=False)
    if optimizer_state is not None:
        import torch.distributed as dist

        # Rigid (non-elastic) ZeRO checkpoints: each rank reads the entry of its own data-parallel rank.
        parts: list[Any] = [None] * dist.get_world_size()
        parts[dist.get_rank()] = optimizer_state
        engine.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
    if on_engine is not None:
        on_engine(engine)
    if fresh or state.rng is None:
        torch.manual_seed(cfg.seed)
    else:
        torch.set_rng_state(state.rng)
    engine.train()
    per_epoch = len(batches) if hasattr(batches, "__len__") else None
    epoch, start = divmod(state.micro_step, per_epoch) if per_epoch else (0, state.micro_step)
    pending: list[float] = []
    while state.step < total:
        got = False
        for batch in epoch_iter(batches, epoch, start):
            got = True
            with autocast_context(cfg, params[0].device):
                loss = engine(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {state.step}")
            engine.backward(loss)
            engine.step()  # applies the update at accumulation boundaries only
            pending.append(float(loss.detach()))
            state.micro_step += 1
            if len(pending) == cfg.grad_accum:
                state.step += 1
                state.losses.append(sum(pending) / len(pending))
                state.scheduler = sched.state_dict()
                state.rng = torch.get_rng_state()
                pending = []
                if on_step is not None and on_step(state):
                    return state
                if state.step >= total:
                    break
        if not got:
            raise ValueError("batches yielded nothing")
        epoch, start = epoch + 1, 0
    return state
