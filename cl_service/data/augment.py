"""Look augmentation for router training data: seeded photometric and scale jitter of sample images.

A router decides *which task* an item belongs to. On a non-IID stream (ACL: the test split is drawn
from shifted renders) a router trained on a few samples of the training look keys on that look —
polarity, palette, contrast, size — and sends shifted items elsewhere. Training it on extra copies of
its samples whose look is jittered teaches it to key on what stays: the question and the content.

The jitter is generic (RandAugment-style operations, no knowledge of any particular test shift):

- polarity inversion (p = 0.5), a random permutation of the RGB channels, greyscale (p = 0.3);
- contrast ×[0.6, 1.4] and brightness ±40 around mid-grey;
- scaling about the centre by [0.8, 1.25] (crop when larger, pad with the mean colour when smaller).

Copies are deterministic: copy ``k`` of sample ``id`` under ``seed`` is always the same image, so the
job's hash (and resume by checksum) stays meaningful.

:func:`with_swapped_images` goes further for streams whose questions name their task (ACL: "What is
written", "What is the value of the expression", "Which button"): copies of a sample that carry another
task's image and keep their own question and target, so the router learns that the question decides when
the image's look does not.
"""

from __future__ import annotations

import dataclasses
import io
import random
from typing import Sequence

import numpy as np
from PIL import Image

from cl_service.data.images import decode_image
from cl_service.data.schema import Sample


def jitter_look(data: bytes, rng: random.Random) -> bytes:
    """One jittered copy of the encoded image ``data`` (same size), PNG-encoded."""
    a = np.asarray(decode_image(data), dtype=np.float32)
    if rng.random() < 0.5:
        a = 255.0 - a
    a = a[..., rng.sample(range(3), 3)]
    if rng.random() < 0.3:
        a = np.repeat(a.mean(-1, keepdims=True), 3, axis=-1)
    a = np.clip((a - 128.0) * rng.uniform(0.6, 1.4) + 128.0 + rng.uniform(-40.0, 40.0), 0, 255)
    im = Image.fromarray(a.astype(np.uint8))
    w, h = im.size
    s = rng.uniform(0.8, 1.25)
    sw, sh = max(1, round(w * s)), max(1, round(h * s))
    scaled = im.resize((sw, sh), Image.BICUBIC)
    if s >= 1.0:
        x, y = (sw - w) // 2, (sh - h) // 2
        im = scaled.crop((x, y, x + w, y + h))
    else:
        fill = tuple(int(v) for v in a.reshape(-1, 3).mean(0))
        im = Image.new("RGB", (w, h), fill)
        im.paste(scaled, ((w - sw) // 2, (h - sh) // 2))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def with_jittered_copies(samples: Sequence[Sample], copies: int, seed: int = 0) -> list[Sample]:
    """``samples`` followed by ``copies`` jittered copies of each (ids suffixed ``~aug<k>``)."""
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    out = list(samples)
    for k in range(1, copies + 1):
        for s in samples:
            rng = random.Random(f"{seed}:{s.task}:{s.id}:{k}")
            out.append(dataclasses.replace(s, id=f"{s.id}~aug{k}", images=[jitter_look(b, rng) for b in s.images]))
    return out


def with_swapped_images(samples: Sequence[Sample], donors: Sequence[Sample], copies: int, seed: int = 0) -> list[Sample]:
    """``copies`` copies of each of ``samples`` whose images are those of a seeded choice among ``donors`` of
    *another* task (ids suffixed ``~swap<k>``); question and answers stay. Empty when no donor has another task."""
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    others = {t: [d for d in donors if d.task != t] for t in {s.task for s in samples}}
    out: list[Sample] = []
    for k in range(1, copies + 1):
        for s in samples:
            if others[s.task]:
                d = others[s.task][random.Random(f"{seed}:{s.task}:{s.id}:swap{k}").randrange(len(others[s.task]))]
                out.append(dataclasses.replace(s, id=f"{s.id}~swap{k}", images=list(d.images)))
    return out
