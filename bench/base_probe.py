"""What does a longer or different base pre-training buy the experts? For each pre-training recipe: build a
tiny base from scratch (tokenizer, random model, ``generic-captions`` training), score the base on the
generic corpus's held-out items per question type, then train one LoRA expert per task of the built-in
streams with the run's expert recipe (r16 decoder + projector, lr 2e-3, 5 epochs of 240 items, batch 16) and
score it on the task's test split (shifted for acl-mini).

    python -m bench.base_probe --recipes 300:0 1000:0 1000:1 3000:1:30000   # steps:vision_lr_scale[:samples]

Meant for the GPU (``--device cuda``; a 3.8M-parameter base pre-trains at ~40 steps/s there, ~2.3 steps/s on
the 2-core CPU). One JSON line per (recipe, task) is appended to ``--out`` as soon as it is measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import append_row, score_by_type  # noqa: E402
from cl_service.adapters.lora import LoraCfg, attach_lora  # noqa: E402
from cl_service.data.synth import BENCHMARKS  # noqa: E402
from cl_service.models.config import PROFILES  # noqa: E402
from cl_service.models.mllm import MLLM  # noqa: E402
from cl_service.models.pretrain import GENERIC, PRETRAIN, _benchmarks, build_pretrained  # noqa: E402
from cl_service.train.loop import Batches, TrainCfg, train_steps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["300:0"], help="steps:vision_lr_scale[:samples]")
    ap.add_argument("--streams", nargs="+", default=["acl-mini", "dcl-mini"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "bench/results/gpu/base_probe.jsonl"))
    a = ap.parse_args()
    generic_test = list(_benchmarks().get(GENERIC).generate("test", 600, 7))
    data = {}
    for bench in a.streams:
        spec = BENCHMARKS.get(bench)
        train, test = list(spec.generate("train", 240, 0)), list(spec.generate("test", 100, 0))
        for t in spec.task_names:
            data[(bench, t)] = ([s for s in train if s.task == t], [s for s in test if s.task == t])
    for recipe in a.recipes:
        parts = recipe.split(":")
        steps, vls = int(parts[0]), float(parts[1])
        samples = int(parts[2]) if len(parts) > 2 else PRETRAIN.get("tiny").samples
        cfg = dataclasses.replace(PRETRAIN.get("tiny"), steps=steps, vision_lr_scale=vls, samples=samples)
        t0 = time.time()
        base, summary = build_pretrained(PROFILES.get("tiny"), cfg, progress=False, log=lambda s: None,
                                         device=a.device)
        base.to(a.device)
        head = {"recipe": recipe, "steps": steps, "vision_lr_scale": vls, "samples": samples,
                "device": a.device, "build_s": round(time.time() - t0), "final_loss": round(summary["final_loss"], 3)}
        row = {**head, "task": "generic", "by_type": score_by_type(base, generic_test, 12, 128)[1]}
        append_row(a.out, row)
        for (bench, t), (train, test) in data.items():
            m = MLLM(copy.deepcopy(base.model), base.tokenizer, base.cfg)  # a fresh copy of the frozen base
            zs, _ = score_by_type(m, test, 12, 128)
            params = attach_lora(m, LoraCfg(rank=16, alpha=32, dropout=0.05), seed=0)
            st = train_steps(m, Batches(train, lambda b, m=m: m.collate(b, train=True), 16, seed=0), params,
                             TrainCfg(lr=2e-3, epochs=5, batch_size=16, warmup_ratio=0.03, seed=0))
            test_acc, test_by_type = score_by_type(m, test, 12, 128)  # one generation for both
            row = {**head, "benchmark": bench, "task": t, "steps_expert": st.step, "zero_shot": zs,
                   "expert_train": score_by_type(m, train[:100], 12, 128)[0], "expert_test": test_acc,
                   "test_by_type": test_by_type}
            append_row(a.out, row)


if __name__ == "__main__":
    main()
