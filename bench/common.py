"""Shared pieces of the GPU benchmarks: random-weight models at real shapes, synthetic requests, timing.

Weights do not change speed, so every model here is built from a profile with random weights, on the
device, never downloaded. The tokenizer is trained locally and padded with placeholder tokens to the
profile's vocabulary size (32064 for ``llava-7b``), so embedding and ``lm_head`` have the real shapes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.paths import portable
from cl_service.data.schema import Sample
from cl_service.models.config import PROFILES, ModelCfg
from cl_service.models.mllm import MLLM, build_mllm
from cl_service.models.tokenizer import train_tokenizer
from cl_service.routers.prompt import Pool, router_prompt

WORDS = ("what which where how many color shape chart value bar line road car sign left right top bottom "
         "image picture shows number largest smallest between two three four five answer the of a in is "
         "are this that there scene remote sensing medical scan diagnosis driving lane traffic light").split()


#: Nine experts, as in the MLLM-CL domain stream plus ability tasks.
DOMAINS = ("RS: remote sensing images", "Med: medical images", "AD: autonomous driving scenes",
           "Sci: science diagrams", "Fin: financial charts", "OCR: text in images", "Math: math problems",
           "VP: visual perception", "GUI: app screenshots")
POOL = Pool(tuple(f"expert-{d.split(':')[0]}" for d in DOMAINS), DOMAINS)


def pool(n: int) -> Pool:
    """``n`` experts: :data:`POOL` itself for ``n == 9``; else its domains repeated as numbered sets
    (``expert-RS``, ..., ``expert-RS2``, ...), each described as its domain plus its set."""
    if n == len(POOL.experts):
        return POOL
    ids, descs = [], []
    for i in range(n):
        d, k = DOMAINS[i % len(DOMAINS)], i // len(DOMAINS)
        ids.append(f"expert-{d.split(':')[0]}{k + 1 if k else ''}")
        descs.append(d if not k else f"{d}, set {k + 1}")
    return Pool(tuple(ids), tuple(descs))


def model_args(ap: Any, targets_help: str = "decoder Linears of every adapter, e.g. q,v or q,k,v,o,gate,up,down") -> None:
    """The serving benches' shared arguments: the model profile, its device, and the experts' LoRA rank and
    targets."""
    ap.add_argument("--profile", default="llava-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--targets", default="q,v", help=targets_help)


def free_port() -> int:
    """A free TCP port on loopback (for a server the bench starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile(name: str, **override: Any) -> ModelCfg:
    """A model profile (``llava-7b``, ``tiny``, ...) with fields overridden."""
    return dataclasses.replace(PROFILES.get(name), **override)


def bench_tokenizer(vocab_size: int):
    """A byte-level BPE trained on a few sentences, padded with ``<xN>`` tokens to ``vocab_size``."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    texts += [router_prompt(POOL, "q")] * 20  # the router template's words become tokens, as in a real vocabulary
    tok = train_tokenizer(texts + [" A", " B", " C", " D", " E", " F", " G", " H", " I"],
                          vocab_size=min(1024, vocab_size), min_frequency=1)
    pad = vocab_size - len(tok)
    if pad > 0:
        tok.add_tokens([f"<x{i}>" for i in range(pad)])
    return tok


def build(cfg: ModelCfg, device: str | torch.device, seed: int = 0) -> MLLM:
    """The random-weight MLLM of ``cfg`` on ``device`` (frozen, eval mode)."""
    return build_mllm(cfg, bench_tokenizer(cfg.vocab_size), seed=seed, device=device)


def question(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "?"


def png(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def requests(n: int, image_size: int, n_words: int = 48, seed: int = 0, n_images: int = 8) -> list[Sample]:
    """``n`` requests: one random image (from a pool of ``n_images``) and a ~``n_words``-word question."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    imgs = [png(nrng, image_size) for _ in range(n_images)]
    return [Sample("bench", "test", f"r{i}", [imgs[i % n_images]], question(rng, n_words), ["x"], "exact")
            for i in range(n)]


def param_counts(mllm: MLLM) -> dict[str, int]:
    """Parameters entering the FLOP count: decoder (+ lm_head) and vision tower (+ projector)."""
    m = mllm.model
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    return {"decoder": n(m.model.language_model) + n(m.lm_head),
            "vision": n(m.model.vision_tower) + n(m.model.multi_modal_projector)}


def matmul_tflops(device: str | torch.device = "cuda", n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matrix-product rate (median of ``reps`` n×n×n products on random data), TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def gpu_info() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"device": "cpu"}
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "gpus": torch.cuda.device_count(), "memory_gib": round(p.total_memory / 2 ** 30, 1),
            "torch": torch.__version__}


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(portable(data), indent=2, default=str))


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Print one result row and append it to the JSON-lines file ``path`` (a probe's results, as measured)."""
    row = portable(row)
    print(json.dumps(row), flush=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class Timer:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.s = time.perf_counter() - self.t0


def out_dir() -> Path:
    return Path(os.environ.get("OUT") or "bench/results/local")


def start(args: Any, name: str) -> tuple[Path, dict[str, Any]]:
    """Where a benchmark's JSON goes (``--out`` or ``$OUT/name``) and its result dict, machine and args first."""
    out = Path(args.out) if args.out else out_dir() / name
    return out, {"machine": gpu_info(), "args": vars(args)}


def bench_model(name: str, device: str) -> tuple[ModelCfg, MLLM]:
    """Profile ``name`` with random weights on ``device`` (float32 on CPU, where bf16 matmuls are slow)."""
    cfg = profile(name, **({"dtype": "float32"} if device == "cpu" else {}))
    return cfg, build(cfg, device)


def question_type(question: str) -> str:
    """A question's type for per-type scores: its first three words (the synth templates differ there)."""
    return " ".join(question.split()[:3])


def score_by_type(m: MLLM, items: list[Sample], max_new_tokens: int = 8, batch_size: int = 64
                  ) -> tuple[float, dict[str, int]]:
    """Accuracy (%) of ``m``'s answers to ``items``, overall and per :func:`question_type`, from one generation."""
    from collections import defaultdict

    from cl_service.eval.scorers import SCORERS

    ans = m.generate(items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    by: dict[str, list[int]] = defaultdict(list)
    for s, x in zip(items, ans):
        by[question_type(s.question)].append(int(SCORERS.get(s.scorer)(x, s.answers, s.question, s.metadata)))
    hits = [h for v in by.values() for h in v]
    return round(100 * sum(hits) / max(1, len(hits)), 1), {k: round(100 * sum(v) / len(v)) for k, v in sorted(by.items())}
