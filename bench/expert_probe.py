"""How well does one task's LoRA expert learn, question type by question type? The run's expert recipe
(LoRA on the decoder + its own projector, on the frozen built base), trained in process on one task of a
built-in benchmark, then scored per question type on the training items it saw and on the test split.

It tells "the expert needs more steps" from "the expert cannot see it", and shows which question types
carry a task's score:

    python -m bench.expert_probe --benchmark acl-mini --task GUI                    # the config's recipe
    python -m bench.expert_probe --benchmark acl-mini --task GUI --epochs 20       # 4x the steps
    python -m bench.expert_probe --benchmark acl-mini --task OCR --train 960        # 4x the data

CPU, 2 threads, batch 16 (the run's global batch): ~0.4 s per step. Results are appended to
``bench/results/cpu/expert_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import append_row, score_by_type  # noqa: E402
from cl_service.adapters.lora import LoraCfg, attach_lora  # noqa: E402
from cl_service.data.augment import with_jittered_copies  # noqa: E402
from cl_service.data.synth import BENCHMARKS  # noqa: E402
from cl_service.models.mllm import load_mllm  # noqa: E402
from cl_service.models.store import ensure_base  # noqa: E402
from cl_service.train.loop import Batches, TrainCfg, train_steps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--benchmark", default="acl-mini")
    ap.add_argument("--task", default="GUI")
    ap.add_argument("--train", type=int, default=240, help="training items (the config's train_per_task)")
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="LoRA init and data order (the data stay seed 0, as in the run)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to probe many recipes quickly")
    ap.add_argument("--autocast", choices=("none", "bfloat16"), default="none", help="TrainCfg.autocast")
    ap.add_argument("--vision", action="store_true", help="LoRA on the CLIP tower too (expert.lora.vision)")
    ap.add_argument("--augment", type=int, default=0, help="look-jittered copies of each training item (cl_service.data.augment; the run has no such expert option)")
    ap.add_argument("--base", default="", help="a built base's folder, taken as is (default: the tiny base of the store, "
                    "rebuilt if the code's corpus changed)")
    ap.add_argument("--tag", default="", help="free text recorded with the row (e.g. what the data change was)")
    ap.add_argument("--out", default=str(REPO / "bench/results/cpu/expert_probe.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    spec = BENCHMARKS.get(a.benchmark)
    train = [s for s in spec.generate("train", a.train, 0) if s.task == a.task]
    test = [s for s in spec.generate("test", a.test, 0) if s.task == a.task]
    seen = train
    iid = [s for s in spec.generate("train", a.test, 1) if s.task == a.task]  # the training look, unseen items
    if a.augment:
        train = with_jittered_copies(train, a.augment, 0)
    if not train:
        raise SystemExit(f"{a.benchmark} has no task {a.task!r}; tasks: {spec.task_names}")
    m = load_mllm(Path(a.base) if a.base else ensure_base("tiny", log=lambda s: None), device=a.device)

    zs_test, _ = score_by_type(m, test)
    params = attach_lora(m, LoraCfg(rank=a.rank, alpha=2 * a.rank, vision=a.vision), seed=a.seed)
    cfg = TrainCfg(lr=a.lr, epochs=a.epochs, batch_size=a.batch, seed=a.seed, autocast=a.autocast)
    t0 = time.time()
    st = train_steps(m, Batches(train, lambda b: m.collate(b, train=True), a.batch, seed=a.seed), params, cfg)
    train_s = round(time.time() - t0)
    tr, tr_by = score_by_type(m, seen[:100])
    te, te_by = score_by_type(m, test)
    iid_acc, _ = score_by_type(m, iid)
    row = {"benchmark": a.benchmark, "task": a.task, "tag": a.tag, "train": len(seen), "augment": a.augment, "epochs": a.epochs,
           "steps": st.step, "lr": a.lr, "autocast": a.autocast, "batch": a.batch, "seed": a.seed, "device": a.device, "rank": a.rank, "vision": a.vision, "train_s": train_s,
           "loss_last": [round(x, 3) for x in st.losses[-5:]], "zero_shot_test": zs_test,
           "train_acc": tr, "iid_acc": iid_acc, "test_acc": te, "train_by_type": tr_by, "test_by_type": te_by}
    append_row(a.out, row)


if __name__ == "__main__":
    main()
