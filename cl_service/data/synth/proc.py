"""``proc-N``: a procedural stream of N tasks (5, 10, 20, 50, 100) for measuring what grows with the stream.

A service outlives the paper's five tasks. These streams give any length up to 100 on the tiny base, so the
cost of routing and evaluation can be measured as the stream grows (``python -m bench.stream_cost``). Task
``k`` is a scene *kind* (its content and question templates) drawn on a *look* (background texture and
palette), and framed past 50 tasks:

- kind ``k % 5``: dots, bars, line, rings, stripes; two question types each, worded one of two ways
  (by the look's parity), so the question tells the kind and half of the look, never the whole task;
- look ``(k // 5) % 10``: slate, sand, mint, rose, navy, olive, sky, clay, ivory, plum;
- frame ``k // 50``: none, or a 5 px border.

So routing is a real problem from ``proc-10`` on: tasks that ask the same questions differ only by their
look, and the router must look at the image. Streams are prefixes of one another (``proc-5`` is the first
five tasks of ``proc-50``, and every task generates the same samples in every stream: its random stream
derives from ``proc`` and its own name), as a service's stream grows by appending tasks. Train and test come
from the same distribution (``iid=True``). Answers are short words, numbers and letters (scorer ``exact``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from cl_service.data.synth._common import options_text, pick, task_maker, yes_no
from cl_service.data.synth.base import BENCHMARKS, BenchmarkSpec, TaskSpec
from cl_service.data.synth.render import (COLOURS, RGB, circle_mask, jitter, line_mask, outline, paint, rect_mask,
                                          scatter, texture)

Q = tuple[np.ndarray, str, list[str], dict[str, Any]]
S = 64
MAX_TASKS = 100
SIZES = (5, 10, 20, 50, 100)

#: (name, background colour, second texture colour, texture cell in px)
LOOKS: tuple[tuple[str, RGB, RGB, int], ...] = (
    ("slate", (95, 105, 115), (120, 130, 140), 16),
    ("sand", (215, 195, 150), (190, 170, 120), 6),
    ("mint", (170, 225, 195), (200, 240, 215), 12),
    ("rose", (230, 170, 180), (245, 200, 205), 4),
    ("navy", (30, 40, 90), (55, 65, 120), 10),
    ("olive", (120, 130, 60), (95, 105, 45), 5),
    ("sky", (160, 200, 240), (200, 225, 250), 20),
    ("clay", (170, 100, 70), (140, 80, 55), 8),
    ("ivory", (245, 240, 225), (225, 220, 200), 3),
    ("plum", (90, 50, 90), (120, 70, 115), 14),
)
INKS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
RING_COLOURS = ("red", "blue", "green", "yellow")


def _luma(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


class _Style:
    """A task's look: its background and the inks that stand out on it."""

    def __init__(self, look: int, framed: bool) -> None:
        self.name, self.c0, self.c1, self.cell = LOOKS[look]
        self.framed = framed
        self.inks = tuple(i for i in INKS if abs(_luma(COLOURS[i]) - _luma(self.c0)) > 55)

    def background(self, nrng: np.random.Generator) -> np.ndarray:
        img = texture(nrng, S, S, jitter(self.c0, nrng, 8), jitter(self.c1, nrng, 8), cell=self.cell, grain=0.2)
        if self.framed:
            frame = np.ones((S, S), dtype=bool)
            frame[5:-5, 5:-5] = False
            paint(img, frame, (30, 30, 30) if _luma(self.c0) > 128 else (230, 230, 230))
        return img

    def ink(self, nrng: np.random.Generator, allowed: tuple[str, ...] = INKS) -> RGB:
        choices = [i for i in self.inks if i in allowed] or list(allowed)
        return jitter(COLOURS[pick(nrng, choices)], nrng, 12)


def _dots(style: _Style, v: int) -> tuple[Callable, Callable]:
    def scene(nrng: np.random.Generator, n: int) -> np.ndarray:
        img = style.background(nrng)
        sizes = nrng.uniform(4, 6, size=n)
        for (cx, cy), r in zip(scatter(nrng, sizes * 2.4, S - 12, S - 12, gap=2), sizes):
            paint(img, circle_mask(S, S, cx + 6, cy + 6, r), style.ink(nrng))
        return img

    def count(nrng: np.random.Generator, split: str) -> Q:
        n = int(nrng.integers(1, 6))
        q = ("How many dots are there?", "Count the dots in the picture.")[v]
        return scene(nrng, n), q, [str(n)], {}

    def many(nrng: np.random.Generator, split: str) -> Q:
        yes = bool(nrng.random() < 0.5)
        n = int(nrng.integers(4, 7)) if yes else int(nrng.integers(1, 4))
        q = ("Are there more than three dots?", "Does the picture hold over three dots?")[v]
        return scene(nrng, n), q, [yes_no(yes)], {}

    return count, many


def _bars(style: _Style, v: int) -> tuple[Callable, Callable]:
    def scene(nrng: np.random.Generator, heights: list[float]) -> np.ndarray:
        img = style.background(nrng)
        w = 40 / (len(heights) * 1.5)
        ink = style.ink(nrng)
        for i, h in enumerate(heights):
            x0 = 12 + i * w * 1.5
            paint(img, rect_mask(S, S, x0, 54 - h, x0 + w, 54), ink)
        paint(img, line_mask(S, S, 8, 55, 56, 55, 1.5), style.ink(nrng, ("black", "white")))
        return img

    def tallest(nrng: np.random.Generator, split: str) -> Q:
        top = int(nrng.integers(3))
        h = list(nrng.uniform(10, 26, size=3))
        h[top] = float(nrng.uniform(34, 42))
        q = ("Which bar is the tallest?", "Which of the bars reaches highest?")[v]
        return scene(nrng, h), f"{q} Choices: {options_text(['left', 'middle', 'right'])}", ["ABC"[top]], {}

    def number(nrng: np.random.Generator, split: str) -> Q:
        n = int(nrng.integers(2, 5))
        q = ("How many bars are there?", "Count the bars in the chart.")[v]
        return scene(nrng, list(nrng.uniform(12, 40, size=n))), q, [str(n)], {}

    return tallest, number


def _line(style: _Style, v: int) -> tuple[Callable, Callable]:
    def scene(nrng: np.random.Generator, rising: bool) -> np.ndarray:
        img = style.background(nrng)
        lo, hi = nrng.uniform(44, 54), nrng.uniform(10, 20)
        ys = np.linspace(lo, hi, 6) if rising else np.linspace(hi, lo, 6)
        ys = ys + nrng.uniform(-3, 3, size=6)
        xs = np.linspace(10, 54, 6)
        ink = style.ink(nrng)
        for i in range(5):
            paint(img, line_mask(S, S, xs[i], ys[i], xs[i + 1], ys[i + 1], 2.5), ink)
        return img

    def up(nrng: np.random.Generator, split: str) -> Q:
        rising = bool(nrng.random() < 0.5)
        q = ("Is the line going up?", "Does the line rise from left to right?")[v]
        return scene(nrng, rising), q, [yes_no(rising)], {}

    def side(nrng: np.random.Generator, split: str) -> Q:
        rising = bool(nrng.random() < 0.5)
        q = ("On which side is the line higher?", "Which end of the line is higher, left or right?")[v]
        return scene(nrng, rising), q, ["right" if rising else "left"], {}

    return up, side


def _rings(style: _Style, v: int) -> tuple[Callable, Callable]:
    def scene(nrng: np.random.Generator, colours: list[str]) -> np.ndarray:
        img = style.background(nrng)
        cx, cy = S / 2 + nrng.uniform(-3, 3), S / 2 + nrng.uniform(-3, 3)
        for i, c in enumerate(colours):  # outermost first; the last one drawn is the innermost
            r = 24 - i * 5.5
            paint(img, outline(circle_mask(S, S, cx, cy, r), width=3) if i < len(colours) - 1
                  else circle_mask(S, S, cx, cy, r), jitter(COLOURS[c], nrng, 10))
        return img

    def number(nrng: np.random.Generator, split: str) -> Q:
        n = int(nrng.integers(1, 5))
        q = ("How many rings are there?", "Count the rings.")[v]
        return scene(nrng, [pick(nrng, RING_COLOURS) for _ in range(n)]), q, [str(n)], {}

    def inner(nrng: np.random.Generator, split: str) -> Q:
        n = int(nrng.integers(2, 5))
        colours = [RING_COLOURS[int(i)] for i in nrng.permutation(len(RING_COLOURS))[:n]]
        q = ("What colour is the innermost ring?", "Which colour fills the centre of the rings?")[v]
        return scene(nrng, colours), q, [colours[-1]], {}

    return number, inner


def _stripes(style: _Style, v: int) -> tuple[Callable, Callable]:
    def scene(nrng: np.random.Generator, n: int, horizontal: bool) -> np.ndarray:
        img = style.background(nrng)
        ink, pitch = style.ink(nrng), 48 / n
        for i in range(n):
            a = 8 + i * pitch + pitch * 0.2
            m = rect_mask(S, S, 8, a, 56, a + pitch * 0.5) if horizontal else rect_mask(S, S, a, 8, a + pitch * 0.5, 56)
            paint(img, m, ink)
        return img

    def direction(nrng: np.random.Generator, split: str) -> Q:
        horizontal = bool(nrng.random() < 0.5)
        q = ("Are the stripes horizontal or vertical?", "Do the stripes run horizontally or vertically?")[v]
        img = scene(nrng, int(nrng.integers(2, 6)), horizontal)
        return img, q, ["horizontal" if horizontal else "vertical"], {}

    def number(nrng: np.random.Generator, split: str) -> Q:
        n = int(nrng.integers(2, 6))
        q = ("How many stripes are there?", "Count the stripes.")[v]
        return scene(nrng, n, bool(nrng.random() < 0.5)), q, [str(n)], {}

    return direction, number


#: (kind name, what its images show, its question types for a style and wording variant)
KINDS: tuple[tuple[str, str, Callable[[_Style, int], tuple[Callable, Callable]]], ...] = (
    ("dots", "scattered dots, counting them", _dots),
    ("bars", "bar charts, their number and the tallest bar", _bars),
    ("line", "line graphs, whether they go up", _line),
    ("rings", "concentric rings, their number and colours", _rings),
    ("stripes", "stripe patterns, their direction and number", _stripes),
)


def proc_task(k: int) -> TaskSpec:
    """Task ``k`` (0-based) of the procedural streams: kind ``k % 5`` on look ``(k // 5) % 10``, framed from 50."""
    if not 0 <= k < MAX_TASKS:
        raise ValueError(f"procedural task index {k} is out of range (0..{MAX_TASKS - 1})")
    kind, what, types = KINDS[k % len(KINDS)]
    look = (k // len(KINDS)) % len(LOOKS)
    framed = k >= len(KINDS) * len(LOOKS)
    style = _Style(look, framed)
    name = f"{kind}-{style.name}" + ("-framed" if framed else "")
    description = f"{name}: {what}, drawn on a {style.name} background" + (" in a frame" if framed else "")
    return TaskSpec(name=name, scorer="exact", description=description,
                    make=task_maker(name, "exact", types(style, look % 2)))


def proc_stream(n: int) -> BenchmarkSpec:
    """The stream of the first ``n`` procedural tasks (1..100); ``proc-<n>`` for the registered sizes."""
    if not 1 <= n <= MAX_TASKS:
        raise ValueError(f"a procedural stream has 1..{MAX_TASKS} tasks, not {n}")
    return BenchmarkSpec(name=f"proc-{n}", tasks=tuple(proc_task(k) for k in range(n)), iid=True, seed_key="proc",
                         summary=f"procedural stream of {n} tasks: 5 scene kinds x 10 looks (x 2 frames), "
                                 "for cost-as-the-stream-grows measurements")


for _n in SIZES:
    BENCHMARKS.register(f"proc-{_n}", proc_stream(_n))
