"""``acl-mini``: a procedural stand-in for the paper's ability continual-learning stream (ACL), at the scale
of the tiny base.

Four abilities in the paper's order. As in the paper, the stream is non-IID: the ``test`` split of every
task is drawn from a *shifted* distribution (other themes, colours, backgrounds, frames and shades), while
``train`` stays on the base distribution. Each ability is asked about the evidence a 3.8 M-parameter
model trained from scratch learns to see in 64×64 px at places it has seen: extents, layout, areas, colours,
counts and states. Reading glyphs (words, expressions, button labels) is not among them: its experts did not
learn it with 10× the data and 40× the steps (``bench/results/gpu/expert_probe.jsonl``). That stream is kept
as ``acl-glyphs`` (:mod:`.acl_glyphs`) for bases that can read.

| task | question types → answers |
|---|---|
| OCR | which sign word (3, one per length) · letter count 2-4 · lines of text 1-3 · text colour (red, blue, green) |
| Math | shaded percentage of a circle (25-100) · polygon sides 3-6 · function increasing/decreasing (A/B) · tallest bar (A-C) |
| VP | objects in a 3×3 tray (1-5) · red ones among others (0-3) · more red than blue? yes/no · bigger object: left/right |
| GUI | switch on/off (A/B) · message kind by its colour (A-D) · slider level (A-C) · box checked (A/B) |

| task | train look | test shift |
|---|---|---|
| OCR | white or cream sign band, black or navy ink, muted wall | pastel band, brown or green ink, drop shadow, other walls |
| Math | white paper, blue 8 px grid, dark ink, blue or red fills | tinted paper, green 6 px grid, coloured ink, other fills |
| VP | flat 12-15 px shapes in the cells of a 3×3 tray on white | 10-12 px outlined shapes in other shades, cell lines, textured tinted paper |
| GUI | grey-blue page, blue title bar | warm or mint page, dark title bar; other sizes, frames, accents and layouts |

The shifts keep light backgrounds: a theme that inverts polarity flips the cues the tiny model learns
(checked boxes measured 100% on the training look and 16% on a dark theme). Expert scores per question type:
``python -m bench.expert_probe --benchmark acl-mini --task T``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cl_service.data.synth._common import LETTERS, options_text, paper_task, pick, yes_no
from cl_service.data.synth.acl_glyphs import TEST_WALLS, VP_COLOURS, VP_SHAPES, WALLS, red_blue_counts
from cl_service.data.synth.base import BENCHMARKS, BenchmarkSpec
from cl_service.data.synth.render import (
    COLOURS,
    RGB,
    canvas,
    circle_mask,
    draw_text_centered,
    jitter,
    line_mask,
    outline,
    paint,
    polygon_mask,
    rect_mask,
    shape_mask,
    squared_paper,
    texture,
)

Q = tuple[np.ndarray, str, list[str], dict[str, Any]]
S = 64


def _choice(question: str, options: list[str], target: int, **meta: Any) -> tuple[str, list[str], dict[str, Any]]:
    """A multiple-choice question in the benchmark's format: options listed as ``A. x B. y``, the gold letter."""
    meta = {"question_type": "multi_choice", "choices": list(options), **meta}
    return f"{question} Choices: {options_text(options)}", [LETTERS[target]], meta


# ---------------------------------------------------------------- OCR
# One sign word per length, so the word is read from its shape; other words for the letter count.
SIGN_WORDS = ("GO", "BUS", "STOP")
COUNT_WORDS: dict[int, tuple[str, ...]] = {
    2: ("UP", "IN", "ON", "TO"),
    3: ("CAT", "DOG", "SUN", "MAP"),
    4: ("TREE", "BOOK", "FISH", "MOON"),
}
LINE_WORDS = ("AB", "CD", "EF", "GH", "IJ", "KL", "MN")
TEXT_COLOURS = ("red", "blue", "green")
BOLD = {"sx": 2, "bold": 1, "spacing": 2}  # 16 px tall, 2-4 letters fit


def _sign(nrng: np.random.Generator, lines: list[str], shifted: bool, ink: RGB | None = None) -> np.ndarray:
    """Lines of bold 12×16 px text centred on a bordered sign band across a textured wall. Train: white or cream
    band, black or navy ink. Test: a pastel band, brown or dark green ink, a drop shadow, another wall.
    ``ink`` fixes the ink colour (the text-colour question)."""
    wall = pick(nrng, TEST_WALLS if shifted else WALLS)
    img = texture(nrng, S, S, jitter(wall, nrng, 10), jitter(tuple(v + 40 for v in wall), nrng, 10), cell=6, grain=0.3)
    if shifted:
        band, edge = pick(nrng, [(205, 230, 250), (250, 220, 200), (230, 250, 210)]), (90, 90, 90)
        colour = ink or pick(nrng, [(90, 50, 20), (20, 80, 40)])
    else:
        band, edge = pick(nrng, [(250, 250, 245), (245, 235, 205)]), (40, 40, 40)
        colour = ink or pick(nrng, [(15, 15, 15), (20, 30, 90)])
    pitch = 19
    height = pitch * len(lines) - 3
    cy = S / 2 + nrng.uniform(-1, 1) * max(0.0, (S - 14 - height) / 2 - 2)
    y0, y1 = cy - height / 2 - 4, cy + height / 2 + 4
    paint(img, rect_mask(S, S, 1, y0 - 2, S - 1, y1 + 2), edge)
    paint(img, rect_mask(S, S, 2, y0, S - 2, y1), jitter(band, nrng, 8))
    colour, cx = jitter(colour, nrng, 10), S / 2 + nrng.uniform(-2, 2)
    for i, text in enumerate(lines):
        ly = cy - height / 2 + 8 + i * pitch
        if shifted:
            draw_text_centered(img, text, cx + 1, ly + 1, (170, 170, 170), **BOLD)
        draw_text_centered(img, text, cx, ly, colour, **BOLD)
    return img


def _sign_word(nrng: np.random.Generator, split: str) -> Q:
    word = pick(nrng, SIGN_WORDS)
    return _sign(nrng, [word], split == "test"), "What is written on the sign?", [word, word.lower()], {"answer_type": "word"}


def _letter_count(nrng: np.random.Generator, split: str) -> Q:
    n = int(nrng.integers(2, 5))
    img = _sign(nrng, [pick(nrng, COUNT_WORDS[n])], split == "test")
    return img, "How many letters are in the word?", [str(n)], {"answer_type": "number"}


def _line_count(nrng: np.random.Generator, split: str) -> Q:
    n = int(nrng.integers(1, 4))
    lines = [pick(nrng, LINE_WORDS) for _ in range(n)]
    return _sign(nrng, lines, split == "test"), "How many lines of text are on the sign?", [str(n)], {"answer_type": "number"}


def _text_colour(nrng: np.random.Generator, split: str) -> Q:
    colour = pick(nrng, TEXT_COLOURS)
    word = pick(nrng, COUNT_WORDS[int(nrng.integers(2, 5))])
    img = _sign(nrng, [word], split == "test", ink=COLOURS[colour])
    return img, "What colour is the text?", [colour], {"answer_type": "colour"}


OCR_TYPES = (_sign_word, _letter_count, _line_count, _text_colour)

# ---------------------------------------------------------------- Math


def _ink_on_paper(nrng: np.random.Generator, shifted: bool) -> tuple[np.ndarray, RGB, RGB]:
    """Squared exercise paper with a margin line; its ink; a fill colour for shaded regions. Train: white paper,
    blue 8 px grid, dark ink, blue or red fills. Test: tinted paper, a 6 px green grid, coloured ink, other
    fills."""
    if shifted:
        paper, grid, step = pick(nrng, [(250, 245, 200), (225, 245, 225), (245, 228, 235)]), (150, 190, 150), 6
        ink = pick(nrng, [COLOURS["red"], COLOURS["purple"], COLOURS["brown"]])
        fill = pick(nrng, [COLOURS["orange"], COLOURS["pink"], COLOURS["cyan"]])
    else:
        paper, grid, step = (250, 250, 246), (170, 200, 235), 8
        ink, fill = pick(nrng, [(15, 15, 15), (20, 30, 90)]), pick(nrng, [COLOURS["blue"], COLOURS["red"]])
    img = squared_paper(nrng, S, paper, grid, step)
    return img, jitter(ink, nrng, 10), jitter(fill, nrng, 12)


def _pie(nrng: np.random.Generator, split: str) -> Q:
    """A circle with a sector shaded from 12 o'clock, clockwise: 25, 50, 75 or 100 percent."""
    pct = pick(nrng, [25, 50, 75, 100])
    img, ink, fill = _ink_on_paper(nrng, split == "test")
    cx, cy, r = S / 2 + nrng.uniform(-3, 3), S / 2 + nrng.uniform(-3, 3), nrng.uniform(20, 25)
    disc = circle_mask(S, S, cx, cy, r)
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    angle = np.mod(np.arctan2(xx - cx, -(yy - cy)), 2 * np.pi)  # 0 at 12 o'clock, clockwise
    paint(img, disc, (250, 250, 250) if split != "test" else (235, 235, 225))
    paint(img, disc & (angle < 2 * np.pi * pct / 100 - 1e-9), fill)
    paint(img, outline(disc), ink)
    q = "What percentage of the circle is shaded? Answer with a number."
    return img, q, [str(pct)], {"question_type": "free_form", "answer_type": "integer"}


def _polygon(nrng: np.random.Generator, split: str) -> Q:
    """A regular polygon with 3-6 sides, one vertex up, filled."""
    n = int(nrng.integers(3, 7))
    img, ink, fill = _ink_on_paper(nrng, split == "test")
    cx, cy, r = S / 2 + nrng.uniform(-3, 3), S / 2 + nrng.uniform(-3, 3), nrng.uniform(21, 26)
    ang = -np.pi / 2 + np.arange(n) * 2 * np.pi / n
    mask = polygon_mask(S, S, list(zip(cx + r * np.cos(ang), cy + r * np.sin(ang))))
    paint(img, mask, fill)
    paint(img, outline(mask), ink)
    q = "How many sides does the polygon have? Answer with a number."
    return img, q, [str(n)], {"question_type": "free_form", "answer_type": "integer"}


def _function(nrng: np.random.Generator, split: str) -> Q:
    """Axes and the graph of a rising or falling function (a line or a gentle curve)."""
    rising = bool(nrng.random() < 0.5)
    img, ink, fill = _ink_on_paper(nrng, split == "test")
    paint(img, line_mask(S, S, 8, 56, 60, 56, 1.5), ink)  # x axis
    paint(img, line_mask(S, S, 10, 6, 10, 58, 1.5), ink)  # y axis
    lo, hi = nrng.uniform(46, 52), nrng.uniform(12, 20)
    bend = nrng.uniform(-0.6, 0.6)
    xs = np.linspace(14, 58, 12)
    t = (xs - 14) / 44
    ys = lo + (hi - lo) * (t + bend * t * (1 - t)) if rising else hi + (lo - hi) * (t + bend * t * (1 - t))
    for i in range(len(xs) - 1):
        paint(img, line_mask(S, S, xs[i], ys[i], xs[i + 1], ys[i + 1], 2.5), fill)
    q, answers, meta = _choice("Is the function increasing or decreasing?", ["increasing", "decreasing"], 0 if rising else 1)
    return img, q, answers, {**meta, "answer_type": "text"}


def _bars(nrng: np.random.Generator, split: str) -> Q:
    """Three bars on a baseline; which one (left, middle, right) is the tallest."""
    top = int(nrng.integers(3))
    img, ink, fill = _ink_on_paper(nrng, split == "test")
    heights = nrng.uniform(10, 28, size=3)
    heights[top] = nrng.uniform(40, 48)
    w = nrng.uniform(11, 14)
    for i, h in enumerate(heights):
        x0 = 10 + i * 17 + nrng.uniform(-1, 1)
        paint(img, rect_mask(S, S, x0, 56 - h, x0 + w, 56), fill)
    paint(img, line_mask(S, S, 6, 56, 60, 56, 1.5), ink)
    q, answers, meta = _choice("Which bar is the tallest?", ["left", "middle", "right"], top)
    return img, q, answers, {**meta, "answer_type": "text"}


MATH_TYPES = (_pie, _polygon, _function, _bars)

# ---------------------------------------------------------------- VP (counting)
# Objects stand in the cells of a 3×3 tray: the tiny model learns cues at places it has seen, not objects
# scattered anywhere (measured: a scattered-shapes VP expert answered a constant per question).
VP_OTHER = ("green", "yellow", "orange", "purple")


def _tray(nrng: np.random.Generator, colours: list[str], shifted: bool) -> np.ndarray:
    """``colours`` objects in random cells of a 3×3 tray. Train: flat 12-15 px shapes on white. Test: outlined
    shapes in lighter or darker shades, 10-12 px, on textured tinted paper with the cell lines drawn."""
    if shifted:
        c0 = jitter(pick(nrng, [(215, 220, 200), (205, 210, 225), (225, 210, 200)]), nrng, 8)
        img = texture(nrng, S, S, c0, tuple(v - 35 for v in c0), cell=5, grain=0.3)
        for k in (1, 2):
            paint(img, rect_mask(S, S, k * S / 3 - 0.5, 0, k * S / 3 + 0.5, S) | rect_mask(S, S, 0, k * S / 3 - 0.5, S, k * S / 3 + 0.5), (150, 150, 150))
    else:
        img = canvas(S, S, jitter((250, 250, 250), nrng, 4))
    for cell, col in zip(nrng.permutation(9)[: len(colours)], colours):
        cx, cy = (cell % 3 + 0.5) * S / 3 + nrng.uniform(-1.5, 1.5), (cell // 3 + 0.5) * S / 3 + nrng.uniform(-1.5, 1.5)
        size = nrng.uniform(10, 12) if shifted else nrng.uniform(12, 15)
        m = shape_mask(S, S, pick(nrng, VP_SHAPES), cx, cy, size)
        rgb = COLOURS[col]
        if shifted:
            f = pick(nrng, [0.75, 1.15])
            rgb = tuple(int(min(255, v * f)) for v in rgb)  # type: ignore[assignment]
            paint(img, outline(m), (20, 20, 20))
        paint(img, m, jitter(rgb, nrng, 12))
    return img


def _count_all(nrng: np.random.Generator, split: str) -> Q:
    n = int(nrng.integers(1, 6))
    img = _tray(nrng, [pick(nrng, VP_COLOURS) for _ in range(n)], split == "test")
    return img, "How many objects are there?", [str(n)], {"type": "simple"}


def _count_red(nrng: np.random.Generator, split: str) -> Q:
    n = int(nrng.integers(0, 4))
    colours = ["red"] * n + [pick(nrng, VP_OTHER) for _ in range(int(nrng.integers(1, 4)))]
    return _tray(nrng, colours, split == "test"), "How many red objects are there?", [str(n)], {"type": "complex"}


def _more_red(nrng: np.random.Generator, split: str) -> Q:
    red, blue, yes = red_blue_counts(nrng)
    img = _tray(nrng, ["red"] * red + ["blue"] * blue, split == "test")
    return img, "Are there more red objects than blue objects?", [yes_no(yes)], {"type": "compare"}


def _bigger(nrng: np.random.Generator, split: str) -> Q:
    """Two objects side by side, one at least 1.8 times the other's size: which side holds the bigger one."""
    left = bool(nrng.random() < 0.5)
    shifted = split == "test"
    img = _tray(nrng, [], shifted)
    big, small = nrng.uniform(22, 26), nrng.uniform(8, 12)
    for x, size, col in zip((S * 0.27, S * 0.73), (big, small) if left else (small, big), nrng.permutation(list(VP_COLOURS))[:2]):
        m = shape_mask(S, S, pick(nrng, VP_SHAPES), x + nrng.uniform(-2, 2), S / 2 + nrng.uniform(-3, 3), size)
        if shifted:
            paint(img, outline(m), (20, 20, 20))
        paint(img, m, jitter(COLOURS[str(col)], nrng, 12))
    answer = "left" if left else "right"
    return img, "Which object is bigger, the left one or the right one?", [answer], {"type": "size"}


VP_TYPES = (_count_all, _count_red, _more_red, _bigger)

# ---------------------------------------------------------------- GUI
MESSAGES = {"error": "red", "warning": "yellow", "success": "green", "info": "blue"}


def _window(nrng: np.random.Generator, shifted: bool) -> tuple[np.ndarray, RGB, RGB]:
    """An app window (title bar on a plain page); returns the image, its text/line colour and its panel colour.
    Train: grey-blue page, blue title bar. Test: another theme, a warm or mint page with a dark title bar."""
    if shifted:
        bg, bar = pick(nrng, [(246, 236, 220), (222, 242, 232)]), pick(nrng, [(50, 50, 56), (40, 90, 70)])
    else:
        bg, bar = (238, 240, 244), (70, 110, 170)
    img = canvas(S, S, jitter(bg, nrng, 6))
    paint(img, rect_mask(S, S, 0, 0, S, 6 if shifted else 8), jitter(bar, nrng, 15))
    fg: RGB = (70, 50, 40) if shifted else (40, 40, 48)
    return img, fg, (252, 252, 252)


def _switch(nrng: np.random.Generator, split: str) -> Q:
    """A toggle switch: on = green track, knob right; off = grey track, knob left."""
    on = bool(nrng.random() < 0.5)
    shifted = split == "test"
    img, fg, _ = _window(nrng, shifted)
    w, h = (nrng.uniform(30, 36), nrng.uniform(13, 16)) if shifted else (nrng.uniform(36, 42), nrng.uniform(15, 18))
    cx, cy = S / 2 + nrng.uniform(-6, 6), 36 + nrng.uniform(-8, 8)
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    r = h / 2
    track = rect_mask(S, S, x0 + r, y0, x1 - r, y1) | circle_mask(S, S, x0 + r, cy, r) | circle_mask(S, S, x1 - r, cy, r)
    paint(img, track, jitter(COLOURS["green"] if on else ((160, 150, 140) if shifted else (175, 175, 180)), nrng, 10))
    if shifted:
        paint(img, outline(track), fg)
    knob = circle_mask(S, S, (x1 - r) if on else (x0 + r), cy, r - 2)
    paint(img, knob, (250, 250, 250))
    q, answers, meta = _choice("Is the switch on or off?", ["on", "off"], 0 if on else 1)
    return img, q, answers, meta


def _message(nrng: np.random.Generator, split: str) -> Q:
    """A message box whose icon and header carry the message kind's colour."""
    kind = pick(nrng, list(MESSAGES))
    shifted = split == "test"
    img, fg, panel = _window(nrng, shifted)
    x0, y0 = nrng.uniform(4, 8), nrng.uniform(13, 18)
    x1, y1 = S - nrng.uniform(4, 8), y0 + nrng.uniform(34, 42)
    box = rect_mask(S, S, x0, y0, x1, y1)
    paint(img, box, panel)
    paint(img, outline(box), fg if shifted else (150, 150, 160))
    colour = jitter(COLOURS[MESSAGES[kind]], nrng, 12)
    if shifted:  # a coloured frame, icon at the right
        paint(img, outline(box, 2) & ~outline(box), colour)
        icon_x = x1 - 10
    else:  # a coloured header, icon at the left
        paint(img, rect_mask(S, S, x0, y0, x1, y0 + 5), colour)
        icon_x = x0 + 10
    paint(img, circle_mask(S, S, icon_x, (y0 + y1) / 2 + 2, 6), colour)
    for i in range(2):  # two lines of "text"
        lx = x0 + 4 if shifted else icon_x + 9
        paint(img, rect_mask(S, S, lx, (y0 + y1) / 2 - 2 + 6 * i, lx + nrng.uniform(20, 30), (y0 + y1) / 2 + 6 * i), fg)
    q, answers, meta = _choice("What kind of message is shown?", list(MESSAGES), list(MESSAGES).index(kind))
    return img, q, answers, meta


def _slider(nrng: np.random.Generator, split: str) -> Q:
    """A horizontal slider filled up to its knob at about 15, 50 or 85 percent."""
    level = int(nrng.integers(3))
    shifted = split == "test"
    img, fg, _ = _window(nrng, shifted)
    x0, x1 = nrng.uniform(6, 10), S - nrng.uniform(6, 10)
    cy = 36 + nrng.uniform(-10, 10)
    pos = x0 + (x1 - x0) * ((0.15, 0.5, 0.85)[level] + nrng.uniform(-0.07, 0.07))
    paint(img, line_mask(S, S, x0, cy, x1, cy, 3), (100, 100, 108) if shifted else (195, 195, 200))
    accent = jitter(COLOURS["purple"] if shifted else COLOURS["blue"], nrng, 12)
    paint(img, line_mask(S, S, x0, cy, pos, cy, 3), accent)
    knob = circle_mask(S, S, pos, cy, 5)
    paint(img, knob, (250, 250, 250))
    paint(img, outline(knob), accent)
    q, answers, meta = _choice("What is the volume level?", ["low", "medium", "high"], level)
    return img, q, answers, meta


def _checkbox(nrng: np.random.Generator, split: str) -> Q:
    """A checkbox next to a label bar, with or without a tick."""
    checked = bool(nrng.random() < 0.5)
    shifted = split == "test"
    img, fg, panel = _window(nrng, shifted)
    side = nrng.uniform(14, 18) if not shifted else nrng.uniform(12, 15)
    x0, y0 = nrng.uniform(6, 12), 36 - side / 2 + nrng.uniform(-10, 10)
    box = rect_mask(S, S, x0, y0, x0 + side, y0 + side)
    accent = jitter(COLOURS["green"] if shifted else COLOURS["blue"], nrng, 12)
    paint(img, box, accent if checked else panel)
    paint(img, outline(box), fg)
    if checked:
        tick = line_mask(S, S, x0 + side * 0.2, y0 + side * 0.5, x0 + side * 0.42, y0 + side * 0.75, 2.5)
        tick |= line_mask(S, S, x0 + side * 0.42, y0 + side * 0.75, x0 + side * 0.82, y0 + side * 0.22, 2.5)
        paint(img, tick, (250, 250, 250))
    paint(img, rect_mask(S, S, x0 + side + 5, y0 + side / 2 - 2, x0 + side + 5 + nrng.uniform(20, 30), y0 + side / 2 + 2), fg)
    q, answers, meta = _choice("Is the box checked?", ["yes", "no"], 0 if checked else 1)
    return img, q, answers, meta


GUI_TYPES = (_switch, _message, _slider, _checkbox)

ACL_MINI = BenchmarkSpec(
    name="acl-mini",
    tasks=(
        paper_task("OCR", OCR_TYPES),
        paper_task("Math", MATH_TYPES),
        paper_task("VP", VP_TYPES),
        paper_task("GUI", GUI_TYPES),
    ),
    iid=False,
    summary="ability stream OCR → Math → VP → GUI at the tiny base's scale; the test split is drawn from shifted renders",
)
BENCHMARKS.register(ACL_MINI.name, ACL_MINI)
