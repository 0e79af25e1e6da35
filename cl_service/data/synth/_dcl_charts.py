"""Scene generators for the DCL stand-ins Sci (diagrams, choropleth maps) and Fin (candlestick charts).

As in :mod:`._dcl_scenes`, each ``_<qtype>`` function draws its answer uniformly first and renders
an image that makes it true. All scenes are 64×64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cl_service.data.synth._common import LETTERS, options_text, yes_no
from cl_service.data.synth.render import (
    COLOURS,
    canvas,
    draw_candles,
    draw_text,
    draw_text_centered,
    jitter,
    line_mask,
    outline,
    paint,
    rect_mask,
    shape_mask,
    value_noise,
)

Q = tuple[np.ndarray, str, list[str], dict[str, Any]]
S = 64

# ---------------------------------------------------------------- Sci: diagrams and maps
SCI_SHAPES = ("circle", "square", "triangle", "star")
LABEL_LETTERS = "EFGHKLMNPRSTW"
DIAGRAM_FILLS = ("red", "green", "blue", "yellow", "orange", "purple", "cyan")


def _paper(nrng: np.random.Generator) -> np.ndarray:
    """Textbook-figure background: off-white paper with a thin frame."""
    img = canvas(S, S, jitter((248, 250, 252), nrng, 4))
    frame = rect_mask(S, S, 0, 0, S, S) & ~rect_mask(S, S, 1, 1, S - 1, S - 1)
    return paint(img, frame, (60, 60, 60))


def _fills(nrng: np.random.Generator, k: int) -> list[tuple[int, int, int]]:
    return [jitter(COLOURS[DIAGRAM_FILLS[int(i)]], nrng, 15) for i in nrng.permutation(len(DIAGRAM_FILLS))[:k]]


def _draw_shape(img: np.ndarray, kind: str, cx: float, cy: float, size: float, fill: tuple[int, int, int]) -> None:
    m = shape_mask(S, S, kind, cx, cy, size)
    paint(img, m, fill)
    paint(img, outline(m), (30, 30, 30))  # diagram-style black outline


def _ai2d_shape(nrng: np.random.Generator, split: str) -> Q:
    """One big labelled shape; options list the four shape names in shuffled order."""
    img = _paper(nrng)
    kind = SCI_SHAPES[int(nrng.integers(4))]
    cx, cy, size = nrng.uniform(24, 30), nrng.uniform(26, 38), nrng.uniform(28, 34)
    _draw_shape(img, kind, cx, cy, size, _fills(nrng, 1)[0])
    # a callout line to a label box: the look of an annotated diagram, not an answer cue
    paint(img, line_mask(S, S, cx + size / 3, cy - size / 3, 52, 10, 1.2), (30, 30, 30))
    paint(img, rect_mask(S, S, 44, 3, 62, 12), (255, 255, 255))
    # label letters avoid A-D so they never look like an answer
    label = "".join(LABEL_LETTERS[int(i)] for i in nrng.integers(0, len(LABEL_LETTERS), size=3))
    draw_text(img, label, 45, 4, (30, 30, 30), sx=1)
    opts = [SCI_SHAPES[int(i)] for i in nrng.permutation(4)]
    q = f"Which shape is shown in the diagram? {options_text(opts)}"
    return img, q, [LETTERS[opts.index(kind)]], {"source": "AI2D", "choices": opts}


def _tqa_panel(nrng: np.random.Generator, split: str) -> Q:
    """Four panels labelled A-D in reading order, one shape each; which panel holds the asked shape?"""
    img = _paper(nrng)
    paint(img, rect_mask(S, S, 31, 0, 33, S) | rect_mask(S, S, 0, 31, S, 33), (60, 60, 60))
    kinds = [SCI_SHAPES[int(i)] for i in nrng.permutation(4)]
    for p, (kind, fill) in enumerate(zip(kinds, _fills(nrng, 4))):
        x0, y0 = 32 * (p % 2), 32 * (p // 2)
        draw_text(img, LETTERS[p], x0 + 3, y0 + 3, (30, 30, 30), sx=1, sy=2)
        _draw_shape(img, kind, x0 + 19 + nrng.uniform(-1.5, 1.5), y0 + 18 + nrng.uniform(-1.5, 1.5), 18, fill)
    target = int(nrng.integers(4))
    panels = options_text(["top left", "top right", "bottom left", "bottom right"])
    q = f"Which panel shows the {kinds[target]}? {panels}"
    return img, q, [LETTERS[target]], {"source": "TQA"}


# Choropleth palette from low (1) to high (4): darker = higher, as on MapQA maps.
MAP_LEVELS = ((225, 238, 252), (160, 195, 235), (80, 130, 205), (20, 50, 135))


def _choropleth(nrng: np.random.Generator, values: list[int]) -> np.ndarray:
    """Four states A-D (top left, top right, bottom left, bottom right) with wavy borders inside
    a blobby coastline, filled by value level 1-4 and labelled with big letters."""
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    ph = nrng.uniform(0, 2 * np.pi, size=2)
    vb = 32 + 4 * np.sin(yy / 9 + ph[0])  # wavy vertical border
    hb = 32 + 4 * np.sin(xx / 8 + ph[1])  # wavy horizontal border
    state = (yy > hb).astype(int) * 2 + (xx > vb).astype(int)
    coast = ((xx - 32) / 30) ** 2 + ((yy - 32) / 30) ** 2 < 0.95 + 0.25 * (value_noise(nrng, S, S, 16) - 0.5)
    img = _paper(nrng)  # same textbook-figure paper and frame as the diagrams
    for k in range(4):
        paint(img, coast & (state == k), MAP_LEVELS[values[k] - 1])
    borders = coast & ((np.abs(xx - vb) < 0.7) | (np.abs(yy - hb) < 0.7))
    paint(img, borders | outline(coast), (90, 90, 90))
    for k in range(4):
        ink = (255, 255, 255) if values[k] >= 3 else (20, 20, 20)  # keep labels legible on dark fills
        draw_text_centered(img, LETTERS[k], 17 + 30 * (k % 2), 17 + 30 * (k // 2), ink, sx=2)
    return img


def _map_highest(nrng: np.random.Generator, split: str) -> Q:
    top = sorted(int(i) for i in nrng.permutation(4)[: 1 if nrng.random() < 0.6 else 2])
    values = [4 if k in top else int(nrng.integers(1, 4)) for k in range(4)]
    answer = ", ".join(LETTERS[k] for k in top)
    return _choropleth(nrng, values), "Which states have the highest value?", [answer], {"source": "MapQA"}


def _map_compare(nrng: np.random.Generator, split: str) -> Q:
    a, b = (int(i) for i in nrng.permutation(4)[:2])
    hi, lo = sorted(int(v) for v in nrng.choice(np.arange(1, 5), size=2, replace=False))[::-1]
    yes = bool(nrng.random() < 0.5)
    values = [int(v) for v in nrng.integers(1, 5, size=4)]
    values[a], values[b] = (hi, lo) if yes else (lo, hi)
    q = f"Does state {LETTERS[a]} have a higher value than state {LETTERS[b]}?"
    return _choropleth(nrng, values), q, [yes_no(yes)], {"source": "MapQA"}


SCI_TYPES = (_ai2d_shape, _tqa_panel, _map_highest, _map_compare)

# ---------------------------------------------------------------- Fin: candlestick charts


def _chart_bg(nrng: np.random.Generator) -> np.ndarray:
    """Trading-terminal look: a dark panel with faint horizontal grid lines."""
    img = canvas(S, S, jitter((20, 24, 32), nrng, 5))
    for y in range(8, S, 12):
        paint(img, rect_mask(S, S, 0, y, S, y + 1), (44, 50, 62))
    return img


def _ohlc(
    nrng: np.random.Generator, opens: np.ndarray, closes: np.ndarray, wick: float
) -> tuple[np.ndarray, np.ndarray]:
    """Highs and lows a little beyond each candle's body."""
    hi = np.maximum(opens, closes) + nrng.uniform(0, wick, size=len(opens))
    lo = np.minimum(opens, closes) - nrng.uniform(0, wick, size=len(opens))
    return hi, lo


def _trend(nrng: np.random.Generator, split: str) -> Q:
    """Ten days of a random walk with drift; rose = last close above first open by a clear margin."""
    rise = bool(nrng.random() < 0.5)
    while True:  # resample until the overall move is unambiguous (a few tries at most)
        steps = (1 if rise else -1) * nrng.uniform(0.3, 0.8) + nrng.normal(0, 0.8, size=10)
        closes = np.cumsum(steps)
        opens = np.concatenate([[0.0], closes[:-1]]) + nrng.normal(0, 0.15, size=10)
        hi, lo = _ohlc(nrng, opens, closes, 0.5)
        if (closes[-1] - opens[0]) * (1 if rise else -1) > 0.35 * (hi.max() - lo.min()):
            break
    img = _chart_bg(nrng)
    draw_candles(img, opens, closes, hi, lo, (3, 4, 61, 60))
    return img, "Did the price rise over the period?", [yes_no(rise)], {}


def _highest_close(nrng: np.random.Generator, split: str) -> Q:
    """Four labelled days; the answer day's close is above every other body by a clear margin."""
    target = int(nrng.integers(4))
    opens, closes = nrng.uniform(0, 1, size=4), nrng.uniform(0, 1, size=4)
    closes[target] = max(opens.max(), closes.max()) + nrng.uniform(0.25, 0.5)
    opens[target] = closes[target] - nrng.uniform(0.2, 0.6) * (1 if nrng.random() < 0.6 else -0.4)
    hi, lo = _ohlc(nrng, opens, closes, 0.08)
    img = _chart_bg(nrng)
    xs = draw_candles(img, opens, closes, hi, lo, (4, 4, 60, 44), body_frac=0.55)
    for k, x in enumerate(xs):
        draw_text_centered(img, LETTERS[k], x, 54, (215, 220, 230), sx=2, sy=2)
    q = f"Which day had the highest close? {options_text(['day A', 'day B', 'day C', 'day D'])}"
    return img, q, [LETTERS[target]], {}


def _up_days(nrng: np.random.Generator, split: str) -> Q:
    """Five days, ``k`` of them up (green); counting them needs per-candle colour."""
    k = int(nrng.integers(0, 6))
    up = np.zeros(5, dtype=bool)
    up[nrng.permutation(5)[:k]] = True
    opens = nrng.uniform(0, 1, size=5) + np.arange(5) * nrng.uniform(-0.2, 0.2)
    closes = opens + np.where(up, 1, -1) * nrng.uniform(0.3, 0.8, size=5)
    hi, lo = _ohlc(nrng, opens, closes, 0.3)
    img = _chart_bg(nrng)
    draw_candles(img, opens, closes, hi, lo, (3, 4, 61, 60), body_frac=0.6)
    return img, "How many days closed higher than they opened?", [str(k)], {}


FIN_TYPES = (_trend, _highest_close, _up_days)
