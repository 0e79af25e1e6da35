"""Execute one :class:`~cl_service.train.job.TrainJob`: the function both trainer backends call.

In process it runs with ``rank=0, world_size=1``. Inside Ray Train workers (torch.distributed already
initialised) it wraps the model in ``DistributedDataParallel``, gives every rank an equal share of the
data, and calls ``on_checkpoint`` every ``checkpoint_every`` optimizer steps so that a restarted worker
group can resume from ``resume`` (see :func:`load_resume`). Rank 0 publishes the adapter atomically with
its checksummed ``adapter.json``.

What a job attaches, trains, adds to the loss and saves is its adapter family's (:mod:`cl_service.adapters.family`,
looked up by ``job.kind``); this module holds no per-kind code.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers.utils import logging as _hf_logging
from safetensors.torch import load_file, save_file

from cl_service.adapters.family import Attached, JobData, family
from cl_service.adapters.lora import set_input_casting
from cl_service.adapters.registry import ADAPTER_META, commit_dir, finalize_adapter, publish_dir, read_adapter
from cl_service.models.mllm import MLLM, load_mllm
from cl_service.train.job import TrainJob, load_parts
from cl_service.train.loop import Batches, Prefetched, TrainState, autocast_kind, train_steps

_WEIGHTS = "trainable.safetensors"
_FAMILY_STATE = "family_state.safetensors"
_STATE = "train_state.pt"
_ZERO = "zero_optimizer_rank{rank}.pt"
_RNG = "rng_rank{rank}.pt"

_hf_logging.disable_progress_bar()  # one bar per adapter load floods job logs


class _LossModule(torch.nn.Module):
    """``forward(batch) -> loss`` around an MLLM, so DistributedDataParallel can wrap it: the answer loss plus the
    adapter family's terms (:class:`~cl_service.adapters.family.Attached`)."""

    def __init__(self, mllm: MLLM, attached: Attached | None = None) -> None:
        super().__init__()
        self.net = mllm.model
        object.__setattr__(self, "_mllm", mllm)  # not a submodule: its params are already under ``net``
        self._penalty = attached.penalty if attached is not None else None
        self._batch_loss = attached.batch_loss if attached is not None else None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self._mllm.loss(batch)
        if self._penalty is not None:
            loss = loss + self._penalty()
        if self._batch_loss is not None:
            loss = loss + self._batch_loss(batch)
        return loss


def adapter_id(job: TrainJob) -> str:
    """Registry id of the adapter a job produces: ``expert:RS``, ``router:stage-3``, ``lora_ft:stage-2``."""
    return job.name.replace("/", ":", 1)


def _trainable(mllm: MLLM) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in mllm.model.named_parameters() if p.requires_grad}


def save_resume(folder: str | Path, mllm: MLLM, state: TrainState, rank: int = 0, zero_engine: Any = None,
                attached: Attached | None = None) -> None:
    """Write what a resumed run needs: (rank 0) the trainable weights, the :class:`TrainState` and the adapter
    family's own state (``attached.state()``, when it keeps one); every rank its RNG state and, under DeepSpeed
    (``zero_engine``), its partition of the optimizer. Every rank calls it with its own folder; Ray Train merges the
    ranks' folders into one checkpoint."""
    folder = Path(folder)
    if rank == 0:
        save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(mllm).items()}, str(folder / _WEIGHTS))
        state.save(folder / _STATE)
        if attached is not None and attached.state is not None:
            save_file({n: t.detach().contiguous().cpu() for n, t in attached.state().items()},
                      str(folder / _FAMILY_STATE))
    # Each rank's own RNG (dropout): ranks draw different amounts (their batches differ in length).
    torch.save(state.rng, folder / _RNG.format(rank=rank))
    if zero_engine is not None:
        from cl_service.train.zero import zero_optimizer_state

        torch.save(zero_optimizer_state(zero_engine), folder / _ZERO.format(rank=rank))


def load_resume(folder: str | Path, rank: int = 0) -> dict[str, Any] | None:
    folder = Path(folder)
    if not (folder / _WEIGHTS).is_file() or not (folder / _STATE).is_file():
        return None
    out = {"weights": load_file(str(folder / _WEIGHTS)), "state": TrainState.load(folder / _STATE)}
    if (folder / _FAMILY_STATE).is_file():
        out["family_state"] = load_file(str(folder / _FAMILY_STATE))
    rng = folder / _RNG.format(rank=rank)
    if rng.is_file():
        out["state"].rng = torch.load(rng, weights_only=False)
    zero = folder / _ZERO.format(rank=rank)
    if zero.is_file():
        out["zero_optimizer"] = torch.load(zero, weights_only=False, map_location="cpu")
    return out


def _rank_share(samples: list, rank: int, world: int) -> list:
    """An equal-length share per rank (padded by wrapping): unequal step counts would hang DDP."""
    if world == 1:
        return samples
    per = -(-len(samples) // world)
    padded = samples + samples[: per * world - len(samples)]
    return padded[rank::world]


def run_train_job(job: TrainJob, rank: int = 0, world_size: int = 1, resume: dict[str, Any] | None = None,
                  on_checkpoint: Callable[[int, float, Callable[[str], None]], None] | None = None,
                  checkpoint_every: int = 0, on_progress: Callable[[int], None] | None = None,
                  log: Callable[[str], None] | None = None,
                  on_done: Callable[[MLLM], None] | None = None, strategy: str = "ddp",
                  device: str | torch.device | None = None, dest: str | Path | None = None) -> TrainState:
    """Train the job's adapter and (rank 0) publish it to ``dest`` (default ``job.out_dir``). Returns the
    final state.

    ``device``: where the base and the adapter live (a Ray Train worker's ``ray.train.torch.get_device()``;
    None = the CPU); the base is loaded in ``job.base_dtype``. ``strategy``: ``ddp``
    (DistributedDataParallel when ``world_size > 1``) or ``deepspeed`` (ZeRO-2, :mod:`cl_service.train.zero`;
    needs an initialised process group). ``train_log.json`` in the published folder records the loss of
    every step, the step times and the tokens of every step (so tokens/s inside the run). ``on_progress(step)``
    is called after every optimizer step (and its resume point, if one is due): a Ray worker reports progress
    with it, so the driver can tell a long job from a stalled one."""
    if strategy not in ("ddp", "deepspeed"):
        raise ValueError(f"unknown strategy {strategy!r}; known: ddp, deepspeed")
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    fam = family(job.kind)
    mllm = _acquire_base(job, device)
    load_s = time.perf_counter() - t0
    if job.train.activation_checkpointing:
        mllm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    all_samples = load_parts(job)
    prepare = getattr(fam, "prepare", None)
    prepared = prepare(job, mllm, JobData(all_samples, mllm.collate, job.train.batch_size)) if prepare else None
    attached = fam.attach(job, mllm, prepared)
    params = attached.params
    _check_registered(fam, mllm, params)
    if device.type == "cuda" and job.train.fused_kernels is not False:  # None: on, as resolve_train_cfg decides
        mllm.fuse_kernels()
    if job.train.lora_fp32_inputs is False or (
            job.train.lora_fp32_inputs is None and autocast_kind(job.train, device.type == "cuda") != "none"):
        set_input_casting(mllm, False)
    state = None
    resumed_from = 0
    if resume is not None:
        named = _trainable(mllm)
        missing = set(named) - set(resume["weights"])
        if missing:
            raise ValueError(f"checkpoint of {job.name} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(resume["weights"][n])
        if attached.load_state is not None:
            if "family_state" not in resume:
                raise ValueError(f"checkpoint of {job.name} lacks the {fam.name} family's state")
            attached.load_state(resume["family_state"])
        state = resume["state"]
        resumed_from = state.step
        if log:
            log(f"{job.name}: resuming from step {resumed_from}")
    samples = _rank_share(all_samples, rank, world_size)
    batches: Any = Batches(samples, lambda b: mllm.collate(b, train=True), job.train.batch_size,
                           seed=job.train.seed + job.seed)
    if device.type == "cuda":  # decode and collate the next micro-batches while the GPU runs this one
        batches = Prefetched(batches)
    batches = _Counted(batches)
    model: Any = mllm if attached.penalty is None and attached.batch_loss is None else _LossModule(mllm, attached)
    if world_size > 1 and strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            _LossModule(mllm, attached), device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    clock = {"t": time.perf_counter(), "tokens": 0}
    step_s: list[float] = []
    step_tokens: list[int] = []

    def on_step(st: TrainState) -> None:
        now = time.perf_counter()
        step_s.append(now - clock["t"])
        step_tokens.append(batches.tokens - clock["tokens"])
        clock["t"], clock["tokens"] = now, batches.tokens
        if on_checkpoint and checkpoint_every and st.step % checkpoint_every == 0 and st.step < st.total_steps:
            on_checkpoint(st.step, st.losses[-1], lambda d: save_resume(d, mllm, st, rank, zero.get("engine"), attached))
            clock["t"] = time.perf_counter()  # the checkpoint's write is not a training step
        if log and (st.step % 20 == 0 or st.step == st.total_steps):
            log(f"{job.name}: step {st.step}/{st.total_steps} loss {st.losses[-1]:.4f}")
        if on_progress is not None:
            on_progress(st.step)

    zero: dict[str, Any] = {}  # the DeepSpeed engine, once built (its optimizer goes into checkpoints)
    # Dropout's RNG is seeded by the run's seed too (as the data order is): without it every seed of a study or
    # sweep drew the same dropout masks (TrainJob.key marks such jobs: they train other weights than before).
    train_cfg = dataclasses.replace(job.train, seed=job.train.seed + job.seed) if job.seed else job.train
    t_train = time.perf_counter()
    if strategy == "deepspeed":
        from cl_service.train.zero import train_steps_zero

        state = train_steps_zero(_LossModule(mllm, attached), batches, params, train_cfg, state, on_step,
                                 optimizer_state=resume.get("zero_optimizer") if resume else None,
                                 on_engine=lambda e: zero.__setitem__("engine", e))
    else:
        state = train_steps(model, batches, params, train_cfg, state, on_step)
    train_s = time.perf_counter() - t_train
    if rank == 0:
        final = Path(dest) if dest is not None else Path(job.out_dir)
        stage = publish_dir(final)
        fam.save(job, mllm, stage, attached)
        timed = step_s[2:] if len(step_s) > 4 else step_s  # the first steps warm up kernels and caches
        tokens_per_s = (sum(step_tokens[len(step_s) - len(timed):]) * world_size / sum(timed)) if timed else None
        (stage / "train_log.json").write_text(json.dumps(
            {"job": job.name, "steps": state.step, "losses": state.losses, "samples": len(samples) * world_size,
             "world_size": world_size, "resumed_from_step": resumed_from,
             "seconds": round(time.perf_counter() - t0, 3), "load_seconds": round(load_s, 3),
             "train_seconds": round(train_s, 3), "device": str(device), "dtype": str(mllm.dtype).replace("torch.", ""),
             "step_seconds": [round(x, 5) for x in step_s], "step_tokens": step_tokens,
             "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
             "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None,
             "train": {"autocast": job.train.autocast, "lora_fp32_inputs": job.train.lora_fp32_inputs,
                       "fused_optimizer": job.train.fused_optimizer, "fused_kernels": job.train.fused_kernels,
                       "activation_checkpointing": job.train.activation_checkpointing, "strategy": strategy}}))
        finalize_adapter(stage, id=adapter_id(job), kind=job.kind, task=job.task, description=job.description,
                         base=job.base_path, job_key=job.key(),
                         extra={"router_pool": list(job.router_pool.experts) if job.router_pool else None})
        commit_dir(stage, final)
    if on_done is not None:
        on_done(mllm)
    _release_base(job, device, mllm, reusable=fam.reuses_base and strategy != "deepspeed")
    return state


def _check_registered(fam: Any, mllm: MLLM, params: list) -> None:
    """A family's trainable parameters must live under ``mllm.model`` and require gradients: the optimizer gets
    them from ``params``, but DistributedDataParallel and the resume checkpoint see only the model's own."""
    mine = {id(p) for p in mllm.model.parameters() if p.requires_grad}
    given = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    stray = [p for p in given if id(p) not in mine]
    if not given or stray:
        raise ValueError(f"adapter family {fam.name}: {len(stray)} of {len(given)} trainable parameters are not "
                         "trainable parameters registered under mllm.model (DDP and resume would miss them)")


def load_job_base(job: TrainJob, device: torch.device) -> MLLM:
    """The job's frozen base on ``device``, in ``job.base_dtype`` (None: the checkpoint's own dtype)."""
    return load_mllm(job.base_path, dtype=job.base_dtype, device=device, prompt_style=job.prompt_style)


#: The base of the last job this process trained, kept for the next (a Ray Train worker trains every job of
#: a stage in turn; at 7B each load moves 14 GB). One entry: ``key -> (MLLM, folder fingerprint)``.
_BASE_CACHE: dict[tuple, tuple[MLLM, tuple]] = {}


def _base_key(job: TrainJob, device: torch.device) -> tuple:
    return (str(Path(job.base_path).resolve()), job.base_dtype, str(device), job.prompt_style)


def _folder_fingerprint(path: str) -> tuple:
    """Names, sizes and modification times of a checkpoint folder's files: a base rebuilt in place differs."""
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir() if f.is_file()))


def _acquire_base(job: TrainJob, device: torch.device) -> MLLM:
    hit = _BASE_CACHE.pop(_base_key(job, device), None)
    _BASE_CACHE.clear()  # another base, dtype or device: let the old one go before loading
    if hit is not None and hit[1] == _folder_fingerprint(job.base_path):
        return hit[0]
    return load_job_base(job, device)


def _release_base(job: TrainJob, device: torch.device, mllm: MLLM, reusable: bool) -> None:
    """Strip the job's adapter (its family's ``release``) and keep the plain base for the next job of this process
    (families with ``reuses_base``; a DeepSpeed engine's changes to the module are not undone, so its base is
    dropped)."""
    if not reusable:
        return
    family(job.kind).release(mllm)
    if job.train.activation_checkpointing:
        mllm.model.gradient_checkpointing_disable()
    mllm.model.eval().requires_grad_(False)
    _BASE_CACHE[_base_key(job, device)] = (mllm, _folder_fingerprint(job.base_path))


class _Counted:
    """Micro-batches passed through, counting their (unpadded) tokens as they are consumed."""

    def __init__(self, batches: Any) -> None:
        self.inner, self.tokens = batches, 0

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int, start: int = 0):
        for b in self.inner.epoch(epoch, start):
            self.tokens += int(b["attention_mask"].sum())
            yield b


def clone_adapter(src: TrainJob, dst: TrainJob) -> None:
    """Publish ``src``'s trained adapter as ``dst``'s (same weights, ``dst``'s identity and key).

    For jobs with the same :meth:`TrainJob.weights_key`, so the second one is not trained again."""
    if src.weights_key() != dst.weights_key():
        raise ValueError(f"{src.name} and {dst.name} do not train the same weights")
    read_adapter(src.out_dir, src.key())  # complete and verified
    stage = publish_dir(dst.out_dir)
    for f in Path(src.out_dir).iterdir():
        if f.is_file() and f.name != ADAPTER_META:
            shutil.copy2(f, stage / f.name)
    finalize_adapter(stage, id=adapter_id(dst), kind=dst.kind, task=dst.task, description=dst.description,
                     base=dst.base_path, job_key=dst.key(),
                     extra={"router_pool": list(dst.router_pool.experts) if dst.router_pool else None,
                            "cloned_from": adapter_id(src)})
    commit_dir(stage, dst.out_dir)
