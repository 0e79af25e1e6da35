"""Can the tiny model learn to read one glyph? A 26-way "What letter is shown?" task on grid-aligned 5x7
glyphs (one glyph = one 8-px patch), trained on the frozen base with a LoRA expert (decoder + projector) or
all weights, the glyph in a fixed cell or anywhere. Separates "the features do not carry the glyph" (a
linear probe on the frozen CLIP states reads it perfectly) from "training does not reach it".

    python -m bench.glyph_probe --runs fixed:lora:200:2e-3 random:full:1000:5e-4
    python -m bench.glyph_probe --runs random:lora:300:2e-3:8:2 offgrid:lora:300:2e-3:8:2   # 8 letters, 2x2 patches
    python -m bench.glyph_probe --features     # linear probes on the frozen features, no training

``--features`` reads the glyph's own token: a linear probe (and nearest class mean) on every CLIP hidden
state, and the share of the token's variance that separates the letters, in the CLIP state the decoder is
fed and after the base's projector.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import append_row, score_by_type  # noqa: E402
from cl_service.adapters.lora import LoraCfg, attach_lora  # noqa: E402
from cl_service.data.schema import Sample  # noqa: E402
from cl_service.data.synth.render import GLYPHS, canvas, encode_png, jitter  # noqa: E402
from cl_service.models.mllm import MLLM, load_mllm  # noqa: E402
from cl_service.models.store import ensure_base  # noqa: E402
from cl_service.train.loop import Batches, TrainCfg, train_steps  # noqa: E402

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CELL = 8  # the tiny profile's patch side


FIXED = 3  # the grid cell (column and row) of the fixed-place glyph at scale 1


def stamp(img: np.ndarray, ch: str, x: int, y: int, colour: tuple[int, int, int], scale: int = 1) -> tuple[int, int]:
    """One 5x7 glyph, each font pixel ``scale``x``scale``, with its top-left corner at (``x``, ``y``); returns its
    (width, height)."""
    mask = np.kron(GLYPHS[ch], np.ones((scale, scale), dtype=bool))
    img[y : y + mask.shape[0], x : x + mask.shape[1]][mask] = np.asarray(colour, dtype=np.uint8)
    return mask.shape[1], mask.shape[0]


def glyph_items(n: int, fixed: bool, split: str, seed: int, letters: str = ALPHABET, scale: int = 1,
                offgrid: bool = False) -> list[Sample]:
    """``n`` one-glyph items. On the grid (default), a glyph sits at the same place inside a cell of
    ``scale * 8`` px: exactly one patch at scale 1, 2x2 patches at scale 2; ``fixed`` keeps it in one cell.
    ``offgrid`` puts it anywhere, to the pixel, not aligned with the patches."""
    rng = np.random.default_rng(seed)
    out = []
    cell = CELL * scale
    cells = 64 // cell
    w, h = 5 * scale, 7 * scale
    for i in range(n):
        img = canvas(64, 64, jitter((240, 235, 220), rng, 15))
        col, row = (FIXED // scale, FIXED // scale) if fixed else (int(rng.integers(cells)), int(rng.integers(cells)))
        ch = letters[int(rng.integers(len(letters)))]
        if offgrid:
            x, y = int(rng.integers(0, 64 - w)), int(rng.integers(0, 64 - h))
        else:
            x, y = col * cell + (cell - w) // 2, row * cell + (cell - h) // 2
        stamp(img, ch, x, y, jitter((30, 30, 60), rng, 25), scale)
        out.append(Sample("Glyph", split, f"{split}-{i}", [encode_png(img)], "What letter is shown?", [ch], "exact"))
    return out


def features(base: MLLM, device: str) -> dict:
    """Linear-probe accuracy of the glyph's letter from its own token, per CLIP layer (train 1500 / test 500,
    fixed cell), and how much of the token varies with the letter before and after the projector."""
    train, test = glyph_items(1500, True, "train", 0), glyph_items(500, True, "test", 1)
    cell = FIXED * 8 + FIXED  # the fixed cell's patch index

    def states(items: list[Sample]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            pv = base.preprocess_images([s.images[0] for s in items]).to(device)
            out = base.model.model.vision_tower(pv, output_hidden_states=True, return_dict=True)
            proj = base.model.model.multi_modal_projector(base.vision_states(pv))
        y = torch.tensor([ALPHABET.index(s.answer) for s in items], device=device)
        return [h[:, 1 + cell] for h in out.hidden_states], proj[:, cell], y

    def letter_share(t: torch.Tensor, y: torch.Tensor) -> float:
        centres = torch.stack([t[y == k].mean(0) for k in range(len(ALPHABET))])
        return float(centres.var(0).sum() / t.pow(2).sum(1).mean())

    tr_h, _, ytr = states(train)
    te_h, proj, yte = states(test)
    row: dict = {"probe": "features", "device": device, "layers": {}}
    for i, (a, b) in enumerate(zip(tr_h, te_h)):
        mu, sd = a.mean(0), a.std(0) + 1e-6
        a, b = (a - mu) / sd, (b - mu) / sd
        w = torch.zeros(a.shape[1], len(ALPHABET), device=device, requires_grad=True)
        bias = torch.zeros(len(ALPHABET), device=device, requires_grad=True)
        opt = torch.optim.Adam([w, bias], lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(a @ w + bias, ytr).backward()
            opt.step()
        centres = torch.stack([a[ytr == k].mean(0) for k in range(len(ALPHABET))])
        row["layers"][i] = {"linear_probe": round(100 * float(((b @ w + bias).argmax(1) == yte).float().mean()), 1),
                            "nearest_mean": round(100 * float((torch.cdist(b, centres).argmin(1) == yte).float().mean()), 1)}
    fl = base.model.config.vision_feature_layer
    row["letter_share_clip_fed"] = round(letter_share(te_h[fl], yte), 3)
    row["letter_share_projected"] = round(letter_share(proj, yte), 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", default=["fixed:lora:200:2e-3"],
                    help="fixed|random|offgrid:lora|full:steps:lr[:letters[:scale]] (letters: the first N of A-Z, default 26)")
    ap.add_argument("--features", action="store_true", help="only the linear probes on the frozen features")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "bench/results/gpu/glyph_probe.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    base = load_mllm(ensure_base("tiny", log=lambda s: None), device=a.device)
    if a.features:
        row = features(base, a.device)
        append_row(a.out, row)
        return
    for run in a.runs:
        where, how, steps, lr, *more = run.split(":")
        letters = ALPHABET[: int(more[0])] if more else ALPHABET
        scale = int(more[1]) if len(more) > 1 else 1
        train = glyph_items(4000, where == "fixed", "train", 0, letters, scale, where == "offgrid")
        test = glyph_items(300, where == "fixed", "test", 1, letters, scale, where == "offgrid")
        m = MLLM(copy.deepcopy(base.model), base.tokenizer, base.cfg)
        if how == "full":
            params = list(m.model.parameters())
            for p in params:
                p.requires_grad_(True)
        else:
            params = attach_lora(m, LoraCfg(rank=16, alpha=32), seed=0)
        t0 = time.time()
        st = train_steps(m, Batches(train, lambda b, m=m: m.collate(b, train=True), 16, seed=0), params,
                         TrainCfg(lr=float(lr), max_steps=int(steps), batch_size=16, warmup_ratio=0.03, seed=0))
        row = {"run": run, "device": a.device, "train_s": round(time.time() - t0),
               "loss_last": [round(x, 3) for x in st.losses[-5:]],
               "train_acc": score_by_type(m, train[:300], 12, 128)[0], "test_acc": score_by_type(m, test, 12, 128)[0]}
        append_row(a.out, row)


if __name__ == "__main__":
    main()
