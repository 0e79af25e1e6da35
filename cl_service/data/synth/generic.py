"""``generic-captions``: the base pre-training corpus, generic image descriptions unrelated to any CL task.

A frozen base needs visual basics that later experts build on; the tiny-model probe showed that
colour-only pre-training tunes the vision tower to global colour and *hurts*. So this corpus has
spatial content (counts, positions, slopes, glyph shapes) and speaks every answer format the CL
streams use (yes/no, numbers 0-9, letters incl. A-D, colour words, short captions).

Its look is deliberately unlike every CL task: solid coloured shapes without outlines on plain
slate / sage / mauve / beige backgrounds (not white paper), single big glyphs (not words, not
expressions), lone line segments (not charts); no fields, cells, tiled views, candles or buttons.

Question types → answers: caption ("a red circle and a blue square") · colour of a shape (colour
word) · shape count 0-9 · position of a shape (left/right/top/bottom) · letter shown (A-Z, half
A-D) · digit shown (0-9) · line rising? yes/no · shape present? yes/no.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cl_service.data.synth._common import pick, task_maker, yes_no
from cl_service.data.synth.base import BENCHMARKS, BenchmarkSpec, TaskSpec
from cl_service.data.synth.render import (
    COLOURS,
    RGB,
    canvas,
    draw_text,
    jitter,
    line_mask,
    paint,
    rect_mask,
    scatter,
    shape_mask,
    text_size,
)

Q = tuple[np.ndarray, str, list[str], dict[str, Any]]
S = 64
SHAPES = ("circle", "square", "triangle", "bar")
COLOUR_WORDS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
# Mid-tone backgrounds: every colour word, white and black included, stands out on each of them.
BACKGROUNDS: tuple[RGB, ...] = ((95, 105, 115), (150, 160, 135), (130, 105, 135), (190, 175, 150), (105, 125, 140))
POSITIONS = ("left", "right", "top", "bottom")
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _background(nrng: np.random.Generator) -> np.ndarray:
    return canvas(S, S, jitter(pick(nrng, BACKGROUNDS), nrng, 10))


def _draw(
    img: np.ndarray, nrng: np.random.Generator, kind: str, colour: str, cx: float, cy: float, size: float
) -> None:
    if kind == "bar":  # a long upright or lying rectangle: a fourth shape, distinct in outline
        w, h = (size * 0.4, size * 1.2) if nrng.random() < 0.5 else (size * 1.2, size * 0.4)
        m = rect_mask(S, S, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    else:
        m = shape_mask(S, S, kind, cx, cy, size)
    paint(img, m, jitter(COLOURS[colour], nrng, 12))


def _scene(nrng: np.random.Generator, kinds: list[str], colours: list[str], lo: float, hi: float) -> np.ndarray:
    img = _background(nrng)
    sizes = nrng.uniform(lo, hi, size=len(kinds))
    for (cx, cy), s, k, c in zip(scatter(nrng, sizes * 1.2, S, S, gap=2), sizes, kinds, colours):
        _draw(img, nrng, k, c, cx, cy, s)
    return img


def _distinct(nrng: np.random.Generator, items: tuple[str, ...], k: int) -> list[str]:
    return [items[int(i)] for i in nrng.permutation(len(items))[:k]]


def _caption(nrng: np.random.Generator, split: str) -> Q:
    """One or two shapes; the caption names them left to right."""
    n = int(nrng.integers(1, 3))
    kinds, colours = _distinct(nrng, SHAPES, n), [pick(nrng, COLOUR_WORDS) for _ in range(n)]
    img = _background(nrng)
    xs = [nrng.uniform(14, 50)] if n == 1 else [nrng.uniform(11, 22), nrng.uniform(42, 53)]
    for k, c, x in zip(kinds, colours, xs):
        _draw(img, nrng, k, c, x, nrng.uniform(14, 50), nrng.uniform(16, 20))
    text = " and ".join(f"{'an' if c[0] in 'aeiou' else 'a'} {c} {k}" for c, k in zip(colours, kinds))
    return img, "Describe the image.", [text], {}


def _colour_of(nrng: np.random.Generator, split: str) -> Q:
    n = int(nrng.integers(1, 4))
    kinds, colours = _distinct(nrng, SHAPES, n), _distinct(nrng, COLOUR_WORDS, n)
    t = int(nrng.integers(n))
    return _scene(nrng, kinds, colours, 13, 18), f"What colour is the {kinds[t]}?", [colours[t]], {}


def _count(nrng: np.random.Generator, split: str) -> Q:
    n = int(nrng.integers(0, 10))
    kinds = [pick(nrng, SHAPES) for _ in range(n)]
    colours = [pick(nrng, COLOUR_WORDS) for _ in range(n)]
    hi = 16 if n <= 4 else 11  # crowded scenes get smaller shapes so they never touch
    return _scene(nrng, kinds, colours, hi - 4, hi), "How many shapes are there?", [str(n)], {}


def _position(nrng: np.random.Generator, split: str) -> Q:
    """The asked shape sits in one border region; an optional other shape sits in another."""
    where = _distinct(nrng, POSITIONS, 2)
    kinds = _distinct(nrng, SHAPES, 2)
    img = _background(nrng)
    for i in range(1 if nrng.random() < 0.5 else 2):
        along, across = nrng.uniform(22, 42), nrng.uniform(9, 17)
        x, y = {
            "left": (across, along), "right": (S - across, along), "top": (along, across), "bottom": (along, S - across)
        }[where[i]]
        _draw(img, nrng, kinds[i], pick(nrng, COLOUR_WORDS), x, y, nrng.uniform(12, 15))
    return img, f"Where is the {kinds[0]}?", [where[0]], {}


def _glyph(nrng: np.random.Generator, ch: str) -> np.ndarray:
    img = _background(nrng)
    sx = int(nrng.integers(4, 6))
    w, h = text_size(ch, sx=sx)
    x, y = int(nrng.integers(2, S - w - 1)), int(nrng.integers(2, S - h - 1))
    draw_text(img, ch, x, y, jitter(COLOURS[pick(nrng, COLOUR_WORDS)], nrng, 12), sx=sx)
    return img


def _letter(nrng: np.random.Generator, split: str) -> Q:
    ch = pick(nrng, "ABCD") if nrng.random() < 0.5 else pick(nrng, ALPHABET)  # A-D over-weighted: option letters
    return _glyph(nrng, ch), "What letter is shown?", [ch], {}


def _digit(nrng: np.random.Generator, split: str) -> Q:
    ch = str(int(nrng.integers(0, 10)))
    return _glyph(nrng, ch), "What number is shown?", [ch], {}


def _slope(nrng: np.random.Generator, split: str) -> Q:
    rising = bool(nrng.random() < 0.5)
    x0, x1 = nrng.uniform(4, 20), nrng.uniform(44, 60)
    ya, yb = sorted(nrng.uniform(6, 58, size=2))
    if yb - ya < 14:  # keep the slope unambiguous
        ya, yb = max(6.0, ya - 7), min(58.0, yb + 7)
    y0, y1 = (yb, ya) if rising else (ya, yb)  # image y grows downwards: rising ends higher up
    img = _background(nrng)
    colour = jitter(COLOURS[pick(nrng, COLOUR_WORDS)], nrng, 12)
    paint(img, line_mask(S, S, x0, y0, x1, y1, nrng.uniform(2.5, 4)), colour)
    return img, "Is the line rising?", [yes_no(rising)], {}


def _present(nrng: np.random.Generator, split: str) -> Q:
    target, yes = pick(nrng, SHAPES), bool(nrng.random() < 0.5)
    others = [s for s in SHAPES if s != target]
    n = int(nrng.integers(1, 4))
    kinds = [pick(nrng, others) for _ in range(n)]
    if yes:
        kinds[int(nrng.integers(n))] = target
    colours = [pick(nrng, COLOUR_WORDS) for _ in range(n)]
    return _scene(nrng, kinds, colours, 13, 17), f"Is there a {target}?", [yes_no(yes)], {}


GENERIC_TYPES = (_caption, _colour_of, _count, _position, _letter, _digit, _slope, _present)

GENERIC = TaskSpec(
    name="Generic",
    scorer="exact",
    description="generic images: shapes, colours, counts, positions, glyphs and lines",
    make=task_maker("Generic", "exact", GENERIC_TYPES),
)
GENERIC_CAPTIONS = BenchmarkSpec(
    name="generic-captions",
    tasks=(GENERIC,),
    iid=True,
    summary="base pre-training corpus: generic shapes/glyphs/lines with captions and basic questions",
)
BENCHMARKS.register(GENERIC_CAPTIONS.name, GENERIC_CAPTIONS)
