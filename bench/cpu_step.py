"""One expert training step of the tiny base on CPU, the unit `make demo`'s training time is made of.

    python -m bench.cpu_step                 # needs the built tiny base (clsvc base build) and dcl-mini data

Times, in seconds per optimizer step (LoRA r16 on the decoder + projector, dcl-mini RS samples):
the loss over label positions (``MLLM.loss``) vs transformers' full-logit loss, with and without LoRA
dropout; and the worker layouts on this machine's cores: DDP over gloo with 2 processes × 1 thread
(global batch 16) vs 1 process × 2 threads at batch 16 vs 1 process × 1 thread at batch 8.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.paths import portable  # noqa: E402


def _setup(base: str, data: str, batch: int, threads: int, dropout: float, rank: int = 0, world: int = 1):
    from cl_service.adapters.lora import LoraCfg, attach_lora
    from cl_service.data.shards import ShardDataset
    from cl_service.models.mllm import load_mllm

    torch.set_num_threads(threads)
    mllm = load_mllm(base)
    samples = ShardDataset(data).samples("RS", "train")
    attach_lora(mllm, LoraCfg(rank=16, alpha=32, dropout=dropout, vision=False, train_projector=True), "job", seed=0)
    batches = [mllm.collate(samples[(i * world + rank) * batch:(i * world + rank + 1) * batch], train=True)
               for i in range(12)]
    return mllm, batches


def _time(loss_fn, params, batches, steps: int) -> float:
    opt = torch.optim.AdamW(params, lr=1e-3)
    for b in batches[:2]:  # warm-up
        loss_fn(b).backward()
        opt.step()
        opt.zero_grad()
    t = time.perf_counter()
    for i in range(steps):
        loss_fn(batches[2 + i % 10]).backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - t) / steps


def _ddp_worker(rank: int, world: int, args, q) -> None:
    import torch.distributed as dist

    from cl_service.train.runner import _LossModule

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mllm, batches = _setup(args.base, args.data, args.batch, 1, args.dropout, rank, world)
        model = torch.nn.parallel.DistributedDataParallel(_LossModule(mllm), broadcast_buffers=False)
        dist.barrier()
        s = _time(model, [p for p in mllm.model.parameters() if p.requires_grad], batches, args.steps)
        if rank == 0:
            q.put(s)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=str(REPO / ".clsvc/models/tiny"))
    ap.add_argument("--data", default=str(REPO / "runs/dcl-mini/data"))
    ap.add_argument("--batch", type=int, default=8, help="per process")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res: dict = {}
    for drop in (args.dropout, 0.0):
        mllm, batches = _setup(args.base, args.data, args.batch, 1, drop)
        params = [p for p in mllm.model.parameters() if p.requires_grad]
        res[f"dropout{drop:g}_label_positions_s"] = _time(mllm.loss, params, batches, args.steps)
        res[f"dropout{drop:g}_full_logits_s"] = _time(lambda b: mllm.forward(b).loss, params, batches, args.steps)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    res["ddp_2x1thread_global16_s"] = q.get() if not q.empty() else None
    mllm, batches = _setup(args.base, args.data, 2 * args.batch, 2, args.dropout)
    res["1proc_2threads_batch16_s"] = _time(mllm.loss, [p for p in mllm.model.parameters() if p.requires_grad],
                                            batches, args.steps)
    for k, v in res.items():
        print(f"{k:34s} {v:.3f} s/step" if v is not None else f"{k:34s} failed")
    if args.out:
        Path(args.out).write_text(json.dumps(portable(res), indent=2))


if __name__ == "__main__":
    main()
