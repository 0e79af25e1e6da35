"""``acl-glyphs``: the ability stream (ACL) with glyph reading, for bases that can read.

This was ``acl-mini`` until the mini stream was redesigned for the tiny base (see :mod:`.acl`): its OCR, Math
and GUI questions need glyphs read, which the 3.8 M-parameter from-scratch base does not learn (measured in
``bench/results/{cpu,gpu}/*_probe.jsonl``: its experts stay at OCR 13-24, Math 13-22, GUI 22-29% on the
shifted test with up to 10x the data and 40x the steps). Use it with a capable base (``base.path``).

Four abilities in the paper's order. As in the paper, the stream is non-IID: the ``test`` split of
every task is drawn from a *shifted* distribution (other glyph scales, colours, backgrounds and
layouts), while ``train`` stays on the base distribution:

| task | question types → answers |
|---|---|
| OCR | read the word (24 words) · first letter · letter count 3-5 |
| Math | ``a+b=?`` / ``a-b=?`` (60 expressions): free-form 0-9 · multiple choice A-D |
| VP | count one shape, alone (1-6) or among distractors (0-4) · more red than blue? yes/no |
| GUI | which button (A-D) is <colour> · does <action> (+ - × ?) · is selected |

| task | train look | test shift |
|---|---|---|
| OCR | dark 10×14 px glyphs on a light sign band, muted wall | 10×21 px glyphs, shadow, dark/saturated band, other walls |
| Math | one line, dark ink on white squared paper | two lines, 10×21 px glyphs; tinted paper, other grid, or chalkboard |
| VP | flat 8.5-14.5 px shapes on white | 7-9 or 14-16 px outlined shapes in other shades on textured tinted paper |
| GUI | light theme, filled buttons | dark theme, outlined buttons, icon above letter, other spacing |

All images are 64×64; glyphs are at least 14 px tall so they survive the model's resize.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cl_service.data.synth._common import LETTERS, options_text, paper_task, pick, yes_no
from cl_service.data.synth.base import BENCHMARKS, BenchmarkSpec
from cl_service.data.synth.render import (
    COLOURS,
    RGB,
    canvas,
    draw_text_centered,
    jitter,
    outline,
    paint,
    rect_mask,
    scatter,
    shape_mask,
    squared_paper,
    text_size,
    texture,
)

Q = tuple[np.ndarray, str, list[str], dict[str, Any]]
S = 64


WALLS: tuple[RGB, ...] = ((120, 110, 100), (100, 115, 105), (125, 120, 135))
TEST_WALLS: tuple[RGB, ...] = ((150, 90, 70), (70, 100, 140), (90, 130, 80))


def _sign(nrng: np.random.Generator, cy: float, text_h: int, shifted: bool) -> tuple[np.ndarray, RGB]:
    """OCR look: a bordered sign band across a muted textured wall; returns image and ink colour.
    Train: light band, dark ink. Test: dark band with light ink, or a saturated band, over
    another wall colour."""
    wall = pick(nrng, TEST_WALLS if shifted else WALLS)
    img = texture(nrng, S, S, jitter(wall, nrng, 10), jitter(tuple(v + 40 for v in wall), nrng, 10), cell=6, grain=0.3)
    edge: RGB
    if not shifted:
        band, edge = pick(nrng, [(250, 250, 245), (245, 235, 205)]), (40, 40, 40)
        ink = pick(nrng, [(15, 15, 15), (20, 30, 90)])
    elif nrng.random() < 0.5:  # dark band, light ink: inverted polarity
        band, edge = pick(nrng, [(20, 30, 60), (15, 60, 35), (30, 30, 30)]), (230, 230, 230)
        ink = pick(nrng, [COLOURS["yellow"], COLOURS["white"]])
    else:
        band, edge = pick(nrng, [(250, 200, 60), (120, 200, 240)]), (20, 20, 20)
        ink = pick(nrng, [(20, 20, 20), COLOURS["purple"]])
    y0, y1 = cy - text_h / 2 - 5, cy + text_h / 2 + 5
    paint(img, rect_mask(S, S, 1, y0 - 2, S - 1, y1 + 2), edge)
    paint(img, rect_mask(S, S, 2, y0, S - 2, y1), jitter(band, nrng, 8))
    return img, jitter(ink, nrng, 10)


def _exercise_paper(nrng: np.random.Generator, shifted: bool) -> tuple[np.ndarray, RGB]:
    """Math look: squared exercise paper with a margin line; returns image and ink colour.
    Train: white paper, blue 8 px grid, dark ink. Test: tinted paper with a 6 px grid of another
    colour and coloured ink, or a dark chalkboard with a faint grid and chalk-white ink."""
    if not shifted:
        paper, grid, step, ink = (250, 250, 246), (170, 200, 235), 8, pick(nrng, [(15, 15, 15), (20, 30, 90)])
    elif nrng.random() < 0.5:
        paper, grid, step = pick(nrng, [(250, 245, 200), (225, 245, 225)]), (150, 190, 150), 6
        ink = pick(nrng, [COLOURS["red"], COLOURS["purple"], COLOURS["blue"]])
    else:
        paper, grid, step, ink = (35, 70, 50), (70, 105, 85), 6, (240, 240, 235)
    img = squared_paper(nrng, S, paper, grid, step)
    return img, jitter(ink, nrng, 10)


def _glyph_style(shifted: bool) -> dict[str, int]:
    # train glyphs are 10×14 px; shifted glyphs are 10×21 px (taller, same width so 5 letters fit)
    return {"sx": 2, "sy": 3 if shifted else 2}


def _write(img: np.ndarray, text: str, cx: float, cy: float, ink: RGB, shifted: bool) -> None:
    style = _glyph_style(shifted)
    if shifted:  # drop shadow: another look of the same strokes
        draw_text_centered(img, text, cx + 1, cy + 1, (0, 0, 0) if sum(ink) > 380 else (255, 255, 255), **style)
    draw_text_centered(img, text, cx, cy, ink, **style)


# ---------------------------------------------------------------- OCR
# Eight words per length: few enough that a tiny model sees each word many times in a task's
# training set, varied enough that the first letter and the length are separate questions.
WORDS: dict[int, tuple[str, ...]] = {
    3: ("CAT", "DOG", "SUN", "MAP", "BOX", "KEY", "HAT", "JAM"),
    4: ("TREE", "BOOK", "FISH", "MOON", "STAR", "LAMP", "GOLD", "WOLF"),
    5: ("HOUSE", "APPLE", "TRAIN", "CLOUD", "RIVER", "PLANT", "QUEEN", "ZEBRA"),
}


def _word_image(nrng: np.random.Generator, word: str, shifted: bool) -> np.ndarray:
    """The word centred on its sign (±2 px across), so letter positions depend on its length only."""
    _, text_h = text_size(word, **_glyph_style(shifted))
    cy = S / 2 + nrng.uniform(-6, 6)
    img, ink = _sign(nrng, cy, text_h, shifted)
    _write(img, word, S / 2 + nrng.uniform(-2, 2), cy, ink, shifted)
    return img


def _read_word(nrng: np.random.Generator, split: str) -> Q:
    word = pick(nrng, WORDS[int(nrng.integers(3, 6))])
    img = _word_image(nrng, word, split == "test")
    return img, "What is written in the image?", [word, word.lower()], {"answer_type": "word"}


def _first_letter(nrng: np.random.Generator, split: str) -> Q:
    word = pick(nrng, WORDS[int(nrng.integers(3, 6))])
    img = _word_image(nrng, word, split == "test")
    return img, "What is the first letter?", [word[0]], {"answer_type": "letter"}


def _letter_count(nrng: np.random.Generator, split: str) -> Q:
    n = int(nrng.integers(3, 6))
    img = _word_image(nrng, pick(nrng, WORDS[n]), split == "test")
    return img, "How many letters are in the word?", [str(n)], {"answer_type": "number"}


OCR_TYPES = (_read_word, _first_letter, _letter_count)

# ---------------------------------------------------------------- Math


# A small closed set of one-digit sums and differences (values 0-9): each expression recurs often
# enough in a task's training set for a tiny model to learn it, yet the value needs both operands
# and the operator.
EXPRESSIONS: dict[int, tuple[str, ...]] = {
    r: tuple(
        [f"{a}+{r - a}" for a in range(6) if 0 <= r - a <= 5] + [f"{a}-{a - r}" for a in range(5, 10) if 1 <= a - r <= 5]
    )
    for r in range(10)
}


def _expression(nrng: np.random.Generator, result: int) -> str:
    """A one-digit expression ``a+b`` or ``a-b`` whose value is ``result`` (0-9)."""
    return pick(nrng, EXPRESSIONS[result])


def _expression_image(nrng: np.random.Generator, expr: str, shifted: bool) -> np.ndarray:
    img, ink = _exercise_paper(nrng, shifted)
    dx, dy = nrng.uniform(-1.5, 1.5), nrng.uniform(-8, 8)
    if not shifted:
        _write(img, f"{expr}=?", S / 2 + dx, S / 2 + dy, ink, False)
    else:  # two-line layout: the expression above, "=?" below it
        dy = nrng.uniform(-3, 3)
        _write(img, expr, S / 2 + dx, 18 + dy, ink, True)
        _write(img, "=?", S / 2 + dx, 44 + dy, ink, True)
    return img


def _free_form(nrng: np.random.Generator, split: str) -> Q:
    result = int(nrng.integers(0, 10))
    img = _expression_image(nrng, _expression(nrng, result), split == "test")
    q = "What is the value of the expression? Answer with a number."
    return img, q, [str(result)], {"question_type": "free_form", "answer_type": "integer"}


def _multi_choice(nrng: np.random.Generator, split: str) -> Q:
    """Four distinct choices in random order (sorted choices would leak the letter through the
    gaps between values); the value and the letter are drawn independently and uniformly."""
    result, target = int(nrng.integers(0, 10)), int(nrng.integers(4))
    others = [int(v) for v in nrng.permutation([v for v in range(10) if v != result])[:3]]
    choices = [str(v) for v in others[:target] + [result] + others[target:]]
    img = _expression_image(nrng, _expression(nrng, result), split == "test")
    q = f"What is the value of the expression? Choices: {options_text(choices)}"
    meta = {"question_type": "multi_choice", "answer_type": "integer", "choices": choices}
    return img, q, [LETTERS[target]], meta


MATH_TYPES = (_free_form, _multi_choice)

# ---------------------------------------------------------------- VP (counting)
VP_SHAPES = ("circle", "square", "triangle")
VP_COLOURS = ("red", "blue", "green", "yellow", "orange", "purple")


def _objects(nrng: np.random.Generator, specs: list[tuple[str, str]], shifted: bool) -> np.ndarray:
    """Draw ``(shape, colour)`` objects without overlap. Train: flat 8.5-14.5 px shapes on white.
    Test: 7-9 or 14-16 px shapes with a dark outline and shifted shades on textured tinted paper."""
    if shifted:
        c0 = jitter(pick(nrng, [(215, 220, 200), (205, 210, 225), (225, 210, 200)]), nrng, 8)
        img = texture(nrng, S, S, c0, tuple(v - 35 for v in c0), cell=5, grain=0.3)
        small = nrng.random() < 0.5
        sizes = nrng.uniform(7, 9, size=len(specs)) if small else nrng.uniform(14, 16, size=len(specs))
    else:
        img = canvas(S, S, jitter((250, 250, 250), nrng, 4))
        # sizes vary within a scene so that total coloured area is a poor proxy for the count
        sizes = nrng.uniform(8.5, 14.5, size=len(specs))
    for (cx, cy), s, (kind, col) in zip(scatter(nrng, sizes, S, S, gap=2), sizes, specs):
        m = shape_mask(S, S, kind, cx, cy, s)
        rgb = COLOURS[col]
        if shifted:  # lighter or darker shade of the same hue
            f = pick(nrng, [0.7, 1.2])
            rgb = tuple(int(min(255, v * f)) for v in rgb)  # type: ignore[assignment]
            paint(img, outline(m), (20, 20, 20))
        paint(img, m, jitter(rgb, nrng, 12))
    return img


def _count_simple(nrng: np.random.Generator, split: str) -> Q:
    kind, n = pick(nrng, VP_SHAPES), int(nrng.integers(1, 7))
    specs = [(kind, pick(nrng, VP_COLOURS)) for _ in range(n)]
    return _objects(nrng, specs, split == "test"), f"How many {kind}s are there?", [str(n)], {"type": "simple"}


def _count_complex(nrng: np.random.Generator, split: str) -> Q:
    kind, n = pick(nrng, VP_SHAPES), int(nrng.integers(0, 5))
    others = [s for s in VP_SHAPES if s != kind]
    specs = [(kind, pick(nrng, VP_COLOURS)) for _ in range(n)]
    specs += [(pick(nrng, others), pick(nrng, VP_COLOURS)) for _ in range(int(nrng.integers(1, 4)))]
    order = nrng.permutation(len(specs))
    specs = [specs[int(i)] for i in order]
    return _objects(nrng, specs, split == "test"), f"How many {kind}s are there?", [str(n)], {"type": "complex"}


def red_blue_counts(nrng: np.random.Generator) -> tuple[int, int, bool]:
    """Two different counts 1-4 of red and of blue objects, and whether red has more (drawn first, 50/50)."""
    hi, lo = sorted(int(v) for v in nrng.choice(np.arange(1, 5), size=2, replace=False))[::-1]
    yes = bool(nrng.random() < 0.5)
    return (hi, lo, yes) if yes else (lo, hi, yes)


def _more_red(nrng: np.random.Generator, split: str) -> Q:
    red, blue, yes = red_blue_counts(nrng)
    specs = [(pick(nrng, VP_SHAPES), "red") for _ in range(red)] + [(pick(nrng, VP_SHAPES), "blue") for _ in range(blue)]
    specs += [(pick(nrng, VP_SHAPES), pick(nrng, ["green", "yellow"])) for _ in range(int(nrng.integers(0, 3)))]
    specs = [specs[int(i)] for i in nrng.permutation(len(specs))]
    img = _objects(nrng, specs, split == "test")
    return img, "Are there more red objects than blue objects?", [yes_no(yes)], {"type": "compare"}


VP_TYPES = (_count_simple, _count_complex, _more_red)

# ---------------------------------------------------------------- GUI
GUI_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
GUI_ACTIONS = {"+": "adds an item", "-": "removes an item", "×": "closes the window", "?": "opens help"}


def _button_boxes(nrng: np.random.Generator, shifted: bool) -> tuple[list[tuple[float, float, float, float]], bool]:
    """Four button boxes (x0, y0, x1, y1) in reading order (= labels A-D) and whether the layout
    stacks letter above icon (row layout) or puts them side by side (grid layout)."""
    top = 12 if not shifted else 10 + nrng.uniform(0, 4)
    if nrng.random() < 0.5:  # 2×2 grid
        gap = nrng.uniform(2, 4) if not shifted else nrng.uniform(4, 6)
        bw, bh = (S - 3 * gap) / 2, (S - top - 3 * gap) / 2
        corners = [(gap + (i % 2) * (bw + gap), top + gap + (i // 2) * (bh + gap)) for i in range(4)]
        return [(x, y, x + bw, y + bh) for x, y in corners], False
    bw, gap = 14.0, (S - 56) / 5
    y0 = top + nrng.uniform(0, 4)
    return [(gap + i * (bw + gap), y0, gap + i * (bw + gap) + bw, y0 + 36) for i in range(4)], True


def _screen(
    nrng: np.random.Generator, fills: list[str], icons: list[str], shifted: bool, selected: int | None = None
) -> np.ndarray:
    """An app window: title bar plus four labelled buttons. Train: light theme, filled buttons.
    Test: dark theme, outlined buttons with dark faces, icon placed above the letter. Button
    ``selected`` (if any) gets a black-and-white focus frame, the same cue in both splits."""
    img = canvas(S, S, jitter((40, 42, 50), nrng, 6) if shifted else jitter((238, 240, 244), nrng, 6))
    paint(img, rect_mask(S, S, 0, 0, S, 8), (10, 10, 14) if shifted else jitter((70, 110, 170), nrng, 15))
    boxes, stacked = _button_boxes(nrng, shifted)
    for i, ((x0, y0, x1, y1), fill, icon) in enumerate(zip(boxes, fills, icons)):
        face = rect_mask(S, S, x0, y0, x1, y1)
        rgb = jitter(COLOURS[fill], nrng, 15)
        border = face & ~rect_mask(S, S, x0 + 2, y0 + 2, x1 - 2, y1 - 2)
        if shifted:  # outlined: dark face, coloured border
            paint(img, face, (25, 25, 30))
            paint(img, border, rgb)
            ink: RGB = (235, 235, 235)
        else:
            paint(img, face, rgb)
            ink = (20, 20, 20) if fill in ("yellow", "orange", "green") else (250, 250, 250)
        if i == selected:  # 1 px black outside, 1 px white inside: visible on either theme
            paint(img, border, (10, 10, 10))
            paint(img, border & rect_mask(S, S, x0 + 1, y0 + 1, x1 - 1, y1 - 1), (250, 250, 250))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if stacked:  # letter above icon (train) or icon above letter (test)
            first, second = (icon, LETTERS[i]) if shifted else (LETTERS[i], icon)
            draw_text_centered(img, first, cx, cy - 8, ink, sx=2)
            draw_text_centered(img, second, cx, cy + 9, ink, sx=2)
        else:
            draw_text_centered(img, LETTERS[i], cx - 6, cy, ink, sx=2)
            draw_text_centered(img, icon, cx + 6, cy, ink, sx=2)
    return img


def _gui_scene(nrng: np.random.Generator) -> tuple[list[str], list[str]]:
    fills = [GUI_COLOURS[int(i)] for i in nrng.permutation(len(GUI_COLOURS))[:4]]
    icons = [list(GUI_ACTIONS)[int(i)] for i in nrng.permutation(4)]
    return fills, icons


def _button_colour(nrng: np.random.Generator, split: str) -> Q:
    fills, icons = _gui_scene(nrng)
    target = int(nrng.integers(4))
    q = f"Which button is {fills[target]}? Answer with the letter."
    return _screen(nrng, fills, icons, split == "test"), q, [LETTERS[target]], {}


def _button_action(nrng: np.random.Generator, split: str) -> Q:
    fills, icons = _gui_scene(nrng)
    target = int(nrng.integers(4))
    q = f"Which button {GUI_ACTIONS[icons[target]]}? Answer with the letter."
    return _screen(nrng, fills, icons, split == "test"), q, [LETTERS[target]], {}


def _button_selected(nrng: np.random.Generator, split: str) -> Q:
    fills, icons = _gui_scene(nrng)
    target = int(nrng.integers(4))
    q = "Which button is selected? Answer with the letter."
    return _screen(nrng, fills, icons, split == "test", selected=target), q, [LETTERS[target]], {}


GUI_TYPES = (_button_colour, _button_action, _button_selected)

ACL_GLYPHS = BenchmarkSpec(
    name="acl-glyphs",
    tasks=(
        paper_task("OCR", OCR_TYPES),
        paper_task("Math", MATH_TYPES),
        paper_task("VP", VP_TYPES),
        paper_task("GUI", GUI_TYPES),
    ),
    iid=False,
    summary="ability stream OCR → Math → VP → GUI with glyph reading (for a capable base); shifted test renders",
    seed_key="acl-mini",  # its samples are those it generated as acl-mini
)
BENCHMARKS.register(ACL_GLYPHS.name, ACL_GLYPHS)
