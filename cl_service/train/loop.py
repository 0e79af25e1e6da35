"""Train one adapter (or a whole base): a plain function over micro-batches, resumable exactly.

:func:`train_steps` runs AdamW with linear warmup + cosine decay, gradient clipping and gradient
accumulation for ``epochs`` or ``max_steps`` optimizer steps. Its :class:`TrainState` (steps, micro-batches
consumed, optimizer/scheduler state, RNG state, loss history) is everything besides the weights that a
resumed run needs: save the trainable weights and the state in ``on_step`` and pass the state back
later — the result is the same as an uninterrupted run (a test proves it). Nothing here knows of Ray.

Data: ``batches`` is a :class:`Batches` (seeded shuffling per epoch, lazy collation, so resuming skips
micro-batches without building them) or any re-iterable of ready batches (same order every epoch).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch

from cl_service._cfgload import check_ranges


@dataclass(frozen=True)
class TrainCfg:
    """Optimisation of one training run."""

    lr: float = 2e-3
    """Peak learning rate (after warmup)."""
    epochs: float = 10.0
    """Passes over the data when ``max_steps`` is not set (fractions allowed)."""
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when set."""
    batch_size: int = 16
    """Samples per micro-batch (per worker when data-parallel)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    warmup_ratio: float = 0.03
    """Share of the steps with linear warmup from 0 (then cosine decay to ``min_lr_ratio``)."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a share of ``lr``."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off)."""
    seed: int = 0
    """Seeds data order and dropout."""
    autocast: Literal["auto", "none", "bfloat16"] = "auto"
    """Run forward and loss under ``torch.autocast`` in this dtype (matmuls of float32 adapter weights
    in bf16 on a bf16 base; the optimizer still updates float32 weights). ``auto``: ``bfloat16`` when the
    run trains on GPUs, else ``none`` (resolved by :func:`resolve_train_cfg`)."""
    lora_fp32_inputs: bool | None = None
    """Let peft cast every LoRA layer's input to the adapter's float32 (peft's default). Under autocast the
    copy is wasted (autocast casts back to bf16 for the matmul). None: off when ``autocast`` is on."""
    fused_optimizer: bool | None = None
    """One fused AdamW kernel per step (CUDA only). None: on when the trained parameters are on a GPU."""
    activation_checkpointing: bool = False
    """Recompute the base's activations in the backward pass (less memory, ~35% slower at 7B shape)."""
    fused_kernels: bool | None = None
    """Run the decoder's RMSNorms, rotary embedding and SwiGLU through fused Triton kernels, forward and
    backward (:mod:`cl_service.models.kernels`; GPU only). None: on when training on GPUs."""

    def __post_init__(self) -> None:
        check_ranges(self, lr=(0, None, "open"), epochs=(0, None, "open"), max_steps=(1, None), batch_size=(1, None),
                     grad_accum=(1, None), warmup_ratio=(0, 1), min_lr_ratio=(0, 1), weight_decay=(0, None),
                     max_grad_norm=(0, None))


def autocast_kind(cfg: TrainCfg, gpu: bool) -> str:
    """The autocast a run of ``cfg`` uses: ``cfg.autocast``, with ``auto`` = ``bfloat16`` on GPUs, ``none`` on CPUs
    (the one place ``auto`` is decided; runs resolve it once, :func:`resolve_train_cfg`)."""
    return cfg.autocast if cfg.autocast != "auto" else ("bfloat16" if gpu else "none")


def resolve_train_cfg(cfg: TrainCfg, gpu: bool) -> TrainCfg:
    """``cfg`` with its ``auto`` settings decided for a run on GPUs (``gpu``) or CPUs: bf16 autocast, no
    fp32 LoRA input copies, fused AdamW and fused norm/rotary/SwiGLU kernels on GPUs; the plain float32 path
    on CPUs."""
    import dataclasses

    autocast = autocast_kind(cfg, gpu)
    return dataclasses.replace(
        cfg, autocast=autocast,
        lora_fp32_inputs=cfg.lora_fp32_inputs if cfg.lora_fp32_inputs is not None else autocast == "none",
        fused_optimizer=cfg.fused_optimizer if cfg.fused_optimizer is not None else gpu,
        fused_kernels=cfg.fused_kernels if cfg.fused_kernels is not None else gpu)


@dataclass
class TrainState:
    """Progress of a run; with the trainable weights it is a complete checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    micro_step: int = 0
    """Micro-batches consumed (``step * grad_accum`` at every checkpoint)."""
    total_steps: int = 0
    """Optimizer steps of the whole run (fixes the schedule)."""
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: torch.Tensor | None = None
    """CPU torch RNG state (dropout) after the last step."""
    losses: list[float] = field(default_factory=list)
    """Mean micro-batch loss of every optimizer step."""

    @property
    def done(self) -> bool:
        return self.total_steps > 0 and self.step >= self.total_steps

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "micro_step": self.micro_step, "total_steps": self.total_steps,
                "optimizer": self.optimizer, "scheduler": self.scheduler, "rng": self.rng,
                "losses": list(self.losses)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**d)

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path) -> "TrainState":
        return cls.from_state_dict(torch.load(path, weights_only=False))


class Batches:
    """Micro-batches of ``samples`` in a seeded order per epoch, collated lazily.

    ``collate(list_of_samples) -> batch``. The last short micro-batch of an epoch is kept.
    """

    def __init__(self, samples: Sequence[Any], collate: Callable[[list[Any]], Any], batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        if not samples:
            raise ValueError("no training samples")
        self.samples, self.collate, self.batch_size, self.seed, self.shuffle = samples, collate, batch_size, seed, shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.samples)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(idx)
        return idx

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Micro-batches of ``epoch`` from the ``start``-th on (earlier ones are not collated)."""
        idx = self.order(epoch)
        for i in range(start * self.batch_size, len(idx), self.batch_size):
            yield self.collate([self.samples[j] for j in idx[i:i + self.batch_size]])


class Prefetched:
    """A :class:`Batches` whose micro-batches are collated ``depth`` ahead in a background thread (image
    decoding releases the GIL), tensors in pinned memory: on a GPU the next batch is ready when the step ends.
    Same batches, same order as the wrapped one."""

    def __init__(self, batches: Batches, depth: int = 2) -> None:
        self.inner, self.depth = batches, depth

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        import queue
        import threading

        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for b in self.inner.epoch(epoch, start):
                    if isinstance(b, dict) and torch.cuda.is_available():
                        b = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}
                    if not put(b):
                        return
                put(done)
            except BaseException as e:  # surfaces in the consuming thread
                put(e)

        t = threading.Thread(target=work, name="clsvc-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=10)


def epoch_iter(batches: Any, epoch: int, start: int) -> Iterator[Any]:
    """Epoch ``epoch``'s batches from batch ``start`` on (a resumed epoch skips the batches already trained)."""
    if hasattr(batches, "epoch"):
        return iter(batches.epoch(epoch, start))
    return itertools.islice(iter(batches), start, None)


def autocast_context(cfg: TrainCfg, device: torch.device):
    """The autocast context of ``cfg`` on ``device`` (a no-op where it resolves to no autocast)."""
    kind = autocast_kind(cfg, device.type == "cuda")
    if kind == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bfloat16": torch.bfloat16}[kind])


def lr_lambda(cfg: TrainCfg, total: int) -> Callable[[int], float]:
    """The learning-rate factor per scheduler step for ``LambdaLR``: linear warm-up, then cosine to ``min_lr_ratio``."""
    warm = math.ceil(cfg.warmup_ratio * total)

    def factor(step: int) -> float:  # LambdaLR calls it with the number of scheduler steps taken
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(1, total - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


def learning_rates(cfg: TrainCfg, total: int) -> list[float]:
    """The peak-``lr`` group's learning rate at each optimizer step 1..``total`` of a run of ``total`` steps (the
    scheduler steps after the optimizer, so step k used factor(k - 1))."""
    f = lr_lambda(cfg, total)
    return [cfg.lr * f(k) for k in range(total)]


def total_steps(cfg: TrainCfg, batches: Any) -> int:
    """Optimizer steps the run will take."""
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    try:
        n = len(batches)
    except TypeError:
        raise ValueError("batches without a length need TrainCfg.max_steps") from None
    return max(1, math.ceil(cfg.epochs * n / cfg.grad_accum))


def _loss(model: Any, batch: Any) -> torch.Tensor:
    out = model.loss(batch) if hasattr(model, "loss") else model(batch)
    return out.loss if hasattr(out, "loss") else out


def train_steps(model: Any, batches: Iterable[Any] | Batches, params: Sequence[torch.nn.Parameter] | Sequence[dict],
                cfg: TrainCfg,
                state: TrainState | None = None, on_step: Callable[[TrainState], bool | None] | None = None
                ) -> TrainState:
    """Optimise ``params`` on ``batches`` until the run's total steps are done.

    ``model.loss(batch)`` (or ``model(batch)``) returns the scalar loss; only ``params`` are updated.
    ``params`` may also be torch param groups (``{"params": [...], "lr_scale": 0.1}``: that group's
    peak lr is ``cfg.lr * lr_scale``).
    ``on_step(state)`` runs after every optimizer step (checkpoint, report, log); returning True stops
    the run there (the state then resumes it). Pass a previous ``state`` to continue a run exactly:
    same model weights + same state + same batches give the same result as never stopping.
    """
    groups = [dict(g) for g in params] if params and isinstance(list(params)[0], dict) else [{"params": list(params)}]
    for g in groups:
        g["params"] = list(g["params"])
        g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: no parameters given")
    fresh = state is None
    state = state or TrainState()
    total = state.total_steps or total_steps(cfg, batches)
    state.total_steps = total
    # One fused kernel per step on the GPU (the default for-each path launches several per tensor group).
    on_gpu = all(p.is_cuda for p in params)
    fused = on_gpu if cfg.fused_optimizer is None else (cfg.fused_optimizer and on_gpu)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    if state.scheduler is not None:
        sched.load_state_dict(state.scheduler)
    if fresh or state.rng is None:
        torch.manual_seed(cfg.seed)
    else:
        torch.set_rng_state(state.rng)
    net = getattr(model, "model", model)
    was_training = net.training if hasattr(net, "training") else False
    if hasattr(net, "train"):
        net.train()
    try:
        per_epoch = len(batches) if hasattr(batches, "__len__") else None
        epoch, start = (divmod(state.micro_step, per_epoch) if per_epoch else (0, state.micro_step))
        pending: list[float] = []
        while state.step < total:
            got = False
            for batch in epoch_iter(batches, epoch, start):
                got = True
                with autocast_context(cfg, params[0].device):
                    loss = _loss(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {state.step}")
                (loss / cfg.grad_accum).backward()
                pending.append(float(loss.detach()))
                state.micro_step += 1
                if len(pending) == cfg.grad_accum:
                    if _optimizer_step(state, opt, sched, params, cfg, pending, on_step):
                        return state
                    pending = []
                    if state.step >= total:
                        break
            if not got:
                if state.micro_step == 0:
                    raise ValueError("batches yielded nothing")
                if per_epoch is None and not hasattr(batches, "epoch") and iter(batches) is batches:
                    break  # a one-shot iterator ran out: stop early rather than loop forever
            epoch, start = epoch + 1, 0
        if pending and state.step < total:  # data ran out mid-accumulation
            _optimizer_step(state, opt, sched, params, cfg, pending, on_step)
        return state
    finally:
        if hasattr(net, "train"):
            net.train(was_training)


def _optimizer_step(state: TrainState, opt, sched, params, cfg: TrainCfg, pending: list[float], on_step) -> bool:
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    state.step += 1
    state.losses.append(sum(pending) / len(pending))
    state.optimizer = opt.state_dict()
    state.scheduler = sched.state_dict()
    state.rng = torch.get_rng_state()
    return bool(on_step(state)) if on_step is not None else False
