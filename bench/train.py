"""Training throughput of one expert at LLaVA-1.5-7B shapes: the project's loop in a Ray Train worker.

The timed path is the one the CL run uses: :func:`cl_service.train.loop.train_steps` over an MLLM with a
peft LoRA expert (rank 128 on all decoder Linears, alpha 256) plus its trainable projector copy, inside
a ``TorchTrainer`` worker (``--variant ray``; DDP through :class:`cl_service.train.runner._LossModule`
when several workers), or in process for comparison. Batches are ready tensors on the GPU (576 image
tokens + 128 text tokens per row, random pixels): the Arrow reading and PIL decoding of a real run are
not in the timed path. DeepSpeed ZeRO-2 (``--variant deepspeed``) wraps the same model and batches.

    python -m bench.train --suite h100       # every single-GPU variant, one subprocess each
    python -m bench.train --suite x2         # 1 GPU vs DDP over 2 vs two experts at once
    python -m bench.train --suite smoke --profile tiny --device cpu   # CPU check of every code path

FLOPs per step = 4·N_decoder·tokens + 2·N_vision·images·577 (the frozen base needs no weight gradients:
forward 2N + input-gradient backward 2N), MFU against the bf16 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import build, gpu_info, matmul_tflops, out_dir, param_counts, profile, write_json  # noqa: E402
from cl_service.adapters.lora import LoraCfg, attach_lora, set_input_casting  # noqa: E402
from cl_service.train.loop import TrainCfg, train_steps  # noqa: E402
from cl_service.train.runner import _LossModule  # noqa: E402

#: Variants: how the one expert is trained. ``fast`` = bf16 autocast over float32 adapter weights, no
#: fp32 input copies in peft, fused AdamW, no activation checkpointing.
VARIANTS: dict[str, dict[str, Any]] = {
    "ray": dict(backend="ray", fast=True, ckpt=False, fallback="ray-accum2"),
    "ray-accum2": dict(backend="ray", fast=True, ckpt=False, batch=4, accum=2),  # 8 rows per step if 8 OOM
    "inproc": dict(backend="inproc", fast=True, ckpt=False),
    "inproc-ckpt": dict(backend="inproc", fast=True, ckpt=True),
    "inproc-plain-b4": dict(backend="inproc", fast=False, ckpt=False, batch=4),
    "inproc-dropout": dict(backend="inproc", fast=True, ckpt=False, dropout=0.05),
    "deepspeed": dict(backend="deepspeed", fast=False, ckpt=False),
    "ray-ddp": dict(backend="ray", fast=True, ckpt=False, workers=-1),  # -1: every GPU
    "ray-two-experts": dict(backend="ray-concurrent", fast=True, ckpt=False, runs=2),
}
SUITES = {
    "h100": ["ray", "inproc", "inproc-ckpt", "inproc-plain-b4", "deepspeed"],
    "x2": ["ray", "ray-ddp", "ray-two-experts"],
    "smoke": ["inproc", "inproc-ckpt", "inproc-plain-b4", "ray", "ray-ddp", "ray-two-experts", "deepspeed"],
}


def make_batches(mllm, batch: int, text: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` ready batches: ``<s>`` + image tokens + ``text - 1`` random text tokens; the last half of the
    text is the supervised answer."""
    g = torch.Generator().manual_seed(seed)
    k, S, dev = mllm.tokens_per_image, mllm.image_size, mllm.device
    L = 1 + k + text - 1
    vocab = len(mllm.tokenizer)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (batch, L), generator=g)
        ids[:, 0] = mllm.bos_id
        ids[:, 1:1 + k] = mllm.image_token_id
        ids[:, 1 + k:][ids[:, 1 + k:] == mllm.image_token_id] = 5
        labels = torch.full_like(ids, -100)
        labels[:, L - text // 2:] = ids[:, L - text // 2:]
        mask = torch.ones_like(ids)
        out.append({"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                    "position_ids": (mask.cumsum(-1) - 1).to(dev), "labels": labels.to(dev),
                    "pixel_values": torch.randn(batch, 3, S, S, generator=g).to(dev, mllm.dtype)})
    return out


def _setup(cfg: dict[str, Any], device: torch.device):
    mcfg = profile(cfg["profile"], **({"dtype": "float32"} if device.type == "cpu" else {}))
    mllm = build(mcfg, device, seed=0)
    if cfg["ckpt"]:
        mllm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraCfg(rank=cfg["rank"], alpha=2.0 * cfg["rank"], dropout=cfg.get("dropout", 0.0))
    params = attach_lora(mllm, lora, "job", seed=cfg.get("seed", 0))
    if cfg["fast"]:
        set_input_casting(mllm, False)
    batches = make_batches(mllm, cfg["batch"], cfg["text"], 2, seed=cfg.get("seed", 0))
    return mllm, params, batches


def _result(cfg, mllm, params, times: list[float], losses: list[float], world: int, device) -> dict[str, Any]:
    steps = [b - a for a, b in zip(times, times[1:])][cfg["warmup"] - 1:]
    step_s = statistics.median(steps)
    tokens = cfg["batch"] * cfg.get("accum", 1) * (mllm.tokens_per_image + cfg["text"]) * world
    counts = param_counts(mllm)
    counts["decoder"] -= sum(p.numel() for n, p in mllm.model.named_parameters() if "lora_" in n)
    images = cfg["batch"] * cfg.get("accum", 1) * world
    flops = 4 * counts["decoder"] * tokens + 2 * counts["vision"] * images * (mllm.tokens_per_image + 1)
    cuda = device.type == "cuda"
    return {"variant": cfg["variant"], "world_size": world, "batch_per_worker": cfg["batch"],
            "grad_accum": cfg.get("accum", 1),
            "seq_len": mllm.tokens_per_image + cfg["text"], "step_s_median": step_s,
            "step_s": [round(s, 4) for s in steps], "tokens_per_s": tokens / step_s,
            "tflops_per_s": flops / step_s / 1e12, "params": counts,
            "trainable_params": sum(p.numel() for p in params),
            "trainable_dtypes": sorted({str(p.dtype) for p in params}),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
            "losses": [round(x, 5) for x in losses[:4]], "cfg": cfg}


def _device(name: str) -> torch.device:
    d = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


def train_worker(cfg: dict[str, Any], rank: int = 0, world: int = 1, device: torch.device | None = None
                 ) -> dict[str, Any]:
    """Build, then time ``warmup + steps`` optimizer steps of :func:`train_steps`. DDP when ``world > 1``
    (torch.distributed already initialised, as in a Ray Train worker)."""
    device = device or _device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    mllm, params, batches = _setup(cfg, device)
    model: Any = mllm
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            _LossModule(mllm), device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    times: list[float] = []

    def on_step(st) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter())

    tc = TrainCfg(lr=2e-4, max_steps=cfg["warmup"] + cfg["steps"], batch_size=cfg["batch"], warmup_ratio=0.0,
                  grad_accum=cfg.get("accum", 1),
                  autocast="bfloat16" if cfg["fast"] and device.type == "cuda" else "none", seed=cfg.get("seed", 0))
    times.append(time.perf_counter())
    state = train_steps(model, batches, params, tc, on_step=on_step)
    return _result(cfg, mllm, params, times, state.losses, world, device)


def deepspeed_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same model and batches under a DeepSpeed ZeRO-2 engine (bf16, fp32 master weights, torch AdamW)."""
    import deepspeed

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    device = _device(cfg["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    mllm, params, batches = _setup(cfg, device)
    ds_cfg = {"train_micro_batch_size_per_gpu": cfg["batch"], "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "bf16": {"enabled": cuda}, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                    "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
              "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "weight_decay": 0.0, "torch_adam": True}}}
    engine, _, _, _ = deepspeed.initialize(model=_LossModule(mllm), model_parameters=params, config=ds_cfg)
    times, losses = [time.perf_counter()], []
    for i in range(cfg["warmup"] + cfg["steps"]):
        loss = engine(batches[i % len(batches)])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter())
    out = _result(cfg, mllm, params, times, losses, 1, device)
    out["trainable_dtypes"] = sorted({str(p.dtype) for p in params}) + ["fp32 master (ZeRO-2)"]
    return out


# ---------------------------------------------------------------------- Ray Train
def _ray_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if config["device"] == "cuda" else torch.device("cpu")
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    t0 = time.perf_counter()
    out = train_worker(config, ctx.get_world_rank(), ctx.get_world_size(), device)
    out["worker_seconds"] = time.perf_counter() - t0
    if ctx.get_world_rank() == 0:  # same machine: a file is the simplest way back (V2 keeps metrics with checkpoints)
        Path(config["result_path"]).write_text(json.dumps(out))
    ray.train.report({"tokens_per_s": out["tokens_per_s"]})


def _fit(cfg: dict[str, Any], workers: int, name: str) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = cfg["device"] == "cuda"
    pypath = f"{REPO}:{os.environ.get('PYTHONPATH', '')}"
    env = {"PYTHONPATH": pypath, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    result_path = Path(tempfile.mkdtemp(prefix="clsvc-bench-")) / "result.json"
    trainer = TorchTrainer(
        _ray_loop, train_loop_config=dict(cfg, result_path=str(result_path)),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": 1} | ({"GPU": 1} if gpu else {})),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(Path(os.environ.get("CLSVC_RAY_STORAGE", "/tmp/clsvc-bench-ray"))),
                             worker_runtime_env={"env_vars": env}))
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run {name} failed: {result.error}")
    out = json.loads(result_path.read_text())
    out["fit_seconds"] = time.perf_counter() - t0
    return out


def run_ray(cfg: dict[str, Any], workers: int, runs: int) -> dict[str, Any]:
    import ray

    env = {"PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True,
             _temp_dir=os.environ.get("CLSVC_RAY_TMP", "/tmp/clsvc-bench-raytmp"), runtime_env={"env_vars": env},
             num_cpus=max(4, os.cpu_count() or 4))
    try:
        if runs == 1:
            return _fit(cfg, workers, cfg["variant"])
        fit_remote = ray.remote(num_cpus=0)(_fit)
        t0 = time.perf_counter()
        refs = [fit_remote.remote(dict(cfg, seed=i), 1, f"{cfg['variant']}-{i}") for i in range(runs)]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=cfg.get("timeout_s", 480))
        if pending:
            raise TimeoutError(f"{len(pending)} concurrent runs did not finish")
        outs = ray.get(refs)
        return {"variant": cfg["variant"], "runs": outs, "wall_seconds": time.perf_counter() - t0,
                "tokens_per_s": sum(o["tokens_per_s"] for o in outs), "cfg": cfg}
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------- driver
def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    v = VARIANTS[name]
    cfg = {"variant": name, "profile": args.profile, "device": args.device, "rank": args.rank,
           "batch": v.get("batch", args.batch), "text": args.text, "warmup": args.warmup, "steps": args.steps,
           "fast": v["fast"], "ckpt": v["ckpt"], "dropout": v.get("dropout", 0.0), "threads": args.threads,
           "accum": v.get("accum", 1)}
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if v["backend"] == "inproc":
        return train_worker(cfg)
    if v["backend"] == "deepspeed":
        return deepspeed_worker(cfg)
    workers = v.get("workers", 1)
    if workers == -1:
        workers = torch.cuda.device_count() if args.device == "cuda" else 2
    return run_ray(cfg, workers, v.get("runs", 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES))
    ap.add_argument("--variant", choices=sorted(VARIANTS))
    ap.add_argument("--profile", default="llava-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text", type=int, default=128, help="text tokens per row (after the image tokens)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="per variant (suite mode)")
    ap.add_argument("--only", default=None, help="comma-separated variants instead of the suite's list")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out) if args.out else out_dir() / f"train_{args.suite or args.variant}.json"
    if args.variant:
        write_json(out, run_variant(args.variant, args))
        return
    res: dict[str, Any] = {"machine": gpu_info(), "suite": args.suite, "variants": {}}
    if args.device == "cuda":
        res["matmul_tflops"] = matmul_tflops()
        torch.cuda.empty_cache()
    todo = args.only.split(",") if args.only else list(SUITES[args.suite])
    while todo:
        name = todo.pop(0)
        part = out.with_name(f".{out.stem}-{name}.json")
        cmd = [sys.executable, "-m", "bench.train", "--variant", name, "--out", str(part)]
        for k in ("profile", "device", "rank", "batch", "text", "warmup", "steps", "threads"):
            cmd += [f"--{k}", str(getattr(args, k))]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, timeout=args.timeout, capture_output=True, text=True)
            ok = p.returncode == 0 and part.is_file()
            res["variants"][name] = json.loads(part.read_text()) if ok else {
                "error": f"exit {p.returncode}", "log_tail": (p.stdout + p.stderr)[-3000:]}
        except subprocess.TimeoutExpired as e:
            res["variants"][name] = {"error": f"timeout {args.timeout}s",
                                     "log_tail": str((e.stdout or b"")[-2000:]) + str((e.stderr or b"")[-2000:])}
        res["variants"][name]["seconds"] = time.perf_counter() - t0
        if "error" in res["variants"][name] and "OutOfMemory" in res["variants"][name]["log_tail"] \
                and VARIANTS[name].get("fallback"):
            todo.insert(0, VARIANTS[name]["fallback"])
        write_json(out, res)
        _print_row(name, res["variants"][name], res.get("matmul_tflops"))
    write_json(out, res)


def _print_row(name: str, r: dict[str, Any], peak: float | None) -> None:
    if "error" in r:
        print(f"{name:18s} ERROR {r['error']}\n{r.get('log_tail', '')[-1500:]}", flush=True)
        return
    per_gpu = r.get("world_size", 1)
    mfu = f" MFU {100 * r['tflops_per_s'] / per_gpu / peak:.1f}%/GPU" if peak and "tflops_per_s" in r else ""
    mem = f" peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") else ""
    print(f"{name:18s} {r['tokens_per_s']:9.0f} tok/s{mfu}{mem} ({r['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
