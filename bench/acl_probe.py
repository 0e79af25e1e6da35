"""Can the tiny LLaVA learn an acl-mini task at all? Full fine-tuning (every weight, the CLIP tower included)
on one task's 240 training items, then accuracy on 100 of them and on the 100 shifted test items.

It separates "the LoRA expert cannot learn it" from "this model cannot see it":

    python -m bench.acl_probe --task GUI --steps 300 --init base --vision-lr-scale 1    # the built base
    python -m bench.acl_probe --task GUI --steps 300 --init random --patch 4            # random, 256 tokens

CPU, 2 threads; ~100 s per 300 steps at patch 8, ~300 s at patch 4. Results are appended to
``bench/results/cpu/acl_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import append_row  # noqa: E402
from cl_service.data.synth import BENCHMARKS  # noqa: E402
from cl_service.eval.scorers import SCORERS  # noqa: E402
from cl_service.models.config import PROFILES  # noqa: E402
from cl_service.models.mllm import build_mllm, load_mllm  # noqa: E402
from cl_service.models.pretrain import PretrainCfg, pretrain  # noqa: E402
from cl_service.models.store import ensure_base  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="GUI", help="acl-mini task: OCR, Math, VP, GUI")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", choices=("base", "random"), default="base",
                    help="base: the built tiny base (clsvc base build); random: a fresh model with its tokenizer")
    ap.add_argument("--patch", type=int, default=8, help="ViT patch side (--init random only)")
    ap.add_argument("--vision-lr-scale", type=float, default=1.0, help="0 freezes the CLIP tower")
    ap.add_argument("--out", default=str(REPO / "bench/results/cpu/acl_probe.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    spec = BENCHMARKS.get("acl-mini")
    train = [s for s in spec.generate("train", 240, 0) if s.task == a.task]
    test = [s for s in spec.generate("test", 100, 0) if s.task == a.task]
    base = load_mllm(ensure_base("tiny", log=lambda s: None))
    if a.init == "base":
        m = base
    else:
        m = build_mllm(dataclasses.replace(PROFILES.get("tiny"), patch_size=a.patch), base.tokenizer, seed=0)

    def acc(items) -> float:
        ans = m.generate(items, max_new_tokens=8, batch_size=64)
        hits = sum(SCORERS.get(s.scorer)(x, s.answers, s.question, s.metadata) for s, x in zip(items, ans))
        return 100 * hits / len(items)

    t0 = time.time()
    st = pretrain(m, train, PretrainCfg(steps=a.steps, lr=a.lr, batch_size=16, vision_lr_scale=a.vision_lr_scale))
    row = {"task": a.task, "init": a.init, "patch": a.patch if a.init == "random" else PROFILES.get("tiny").patch_size,
           "steps": a.steps, "lr": a.lr, "vision_lr_scale": a.vision_lr_scale, "train_s": round(time.time() - t0),
           "loss_last": [round(x, 3) for x in st.losses[-5:]], "train_acc": acc(train[:100]), "test_acc": acc(test)}
    append_row(a.out, row)


if __name__ == "__main__":
    main()
