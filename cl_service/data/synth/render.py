"""Tiny raster toolkit for the procedural benchmarks: a built-in bitmap font, masks, textures, charts.

Everything works on ``uint8`` RGB arrays of shape ``(H, W, 3)`` and is deterministic: randomness comes
only from a :class:`numpy.random.Generator` that the caller derives from its ``random.Random`` with
:func:`np_rng`. No system fonts are used, so renders are identical on every machine.

The model sees images resized to 64×64 (patch 8); helpers default to large, salient marks so the cues
that answers depend on survive that resize.
"""

from __future__ import annotations

import io
import random
from typing import Sequence

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]

#: Named colours shared by all generators; answer words that name colours come from these keys.
COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "pink": (240, 130, 180),
    "brown": (140, 90, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "cyan": (40, 200, 210),
}

# 5×7 glyphs, rows top to bottom separated by spaces; '#' is ink. Upper case only: the benchmarks'
# answers are case-insensitive and one case keeps the font small.
_GLYPH_ROWS: dict[str, str] = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "×": "..... #...# .#.#. ..#.. .#.#. #...# .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    " ": "..... ..... ..... ..... ..... ..... .....",
}
GLYPH_W, GLYPH_H = 5, 7
GLYPHS: dict[str, np.ndarray] = {
    ch: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)
    for ch, rows in _GLYPH_ROWS.items()
}


def np_rng(rng: random.Random) -> np.random.Generator:
    """A numpy generator seeded from ``rng`` (consumes 64 bits of it), so both stay in lock-step."""
    return np.random.default_rng(rng.getrandbits(64))


def canvas(h: int, w: int, colour: RGB | Sequence[int] = COLOURS["white"]) -> np.ndarray:
    """A plain ``(h, w, 3)`` uint8 image filled with ``colour``."""
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = np.asarray(colour, dtype=np.uint8)
    return img


def encode_png(img: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as RGB PNG bytes (zlib output is deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def jitter(colour: RGB | Sequence[int], nrng: np.random.Generator, amount: int = 20) -> RGB:
    """``colour`` moved by up to ±``amount`` per channel: keeps a hue recognisable yet not constant."""
    c = np.clip(np.asarray(colour) + nrng.integers(-amount, amount + 1, size=3), 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def paint(img: np.ndarray, mask: np.ndarray, colour: RGB | Sequence[int]) -> np.ndarray:
    """Set ``img`` to ``colour`` where the boolean ``(H, W)`` mask holds (in place); returns ``img``."""
    img[mask] = np.asarray(colour, dtype=np.uint8)
    return img


# ---------------------------------------------------------------- masks
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    return yy + 0.5, xx + 0.5  # pixel centres, so shapes are symmetric around their centre


def circle_mask(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Disc of radius ``r`` centred at (``cx``, ``cy``) in pixel coordinates."""
    yy, xx = _grid(h, w)
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def ellipse_mask(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Axis-aligned ellipse with radii ``rx``, ``ry``."""
    yy, xx = _grid(h, w)
    return ((xx - cx) / max(rx, 1e-6)) ** 2 + ((yy - cy) / max(ry, 1e-6)) ** 2 <= 1.0


def rect_mask(h: int, w: int, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Filled rectangle covering pixel centres with ``x0 <= x < x1`` and ``y0 <= y < y1``."""
    yy, xx = _grid(h, w)
    return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)


def polygon_mask(h: int, w: int, pts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Filled polygon (even-odd rule) with vertices ``pts`` as (x, y)."""
    yy, xx = _grid(h, w)
    inside = np.zeros((h, w), dtype=bool)
    n = len(pts)
    for i in range(n):
        x0, y0 = pts[i]
        x1, y1 = pts[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (yy >= min(y0, y1)) & (yy < max(y0, y1))
        x_at = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xx < x_at)
    return inside


def line_mask(h: int, w: int, x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
    """Segment from (x0, y0) to (x1, y1) drawn ``width`` pixels thick with round caps."""
    yy, xx = _grid(h, w)
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return (xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2 <= (width / 2.0) ** 2


def shape_mask(h: int, w: int, kind: str, cx: float, cy: float, size: float) -> np.ndarray:
    """One of the benchmark shapes (``circle``, ``square``, ``triangle``, ``star``, ``diamond``)
    fitting a box of side ``size`` centred at (``cx``, ``cy``)."""
    r = size / 2.0
    if kind == "circle":
        return circle_mask(h, w, cx, cy, r)
    if kind == "square":
        return rect_mask(h, w, cx - r, cy - r, cx + r, cy + r)
    if kind == "triangle":
        return polygon_mask(h, w, [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)])
    if kind == "diamond":
        return polygon_mask(h, w, [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)])
    if kind == "star":
        ang = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return polygon_mask(h, w, list(zip(cx + rad * np.cos(ang), cy - rad * np.sin(ang))))
    raise ValueError(f"unknown shape {kind!r}")


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)² square; used to make glyphs bold and outlines thick."""
    if radius <= 0:
        return mask
    h, w = mask.shape
    pad = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= pad[dy : dy + h, dx : dx + w]
    return out


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The ring of ``width`` pixels just outside ``mask``."""
    return dilate(mask, width) & ~mask


def scatter(
    nrng: np.random.Generator,
    sizes: Sequence[float],
    h: int,
    w: int,
    gap: float = 2.0,
    margin: float = 1.0,
    avoid: np.ndarray | None = None,
) -> list[tuple[float, float]]:
    """Centres for objects of the given ``sizes`` that do not overlap each other (nor ``avoid``).

    Objects are treated as discs of diameter ``size`` + ``gap``. Rejection sampling first; if the
    scene is too crowded, falls back to a shuffled jittered grid so the requested count (which is
    often the answer) is always honoured.
    """
    centres: list[tuple[float, float]] = []
    for s in sizes:
        r = s / 2.0
        for _ in range(300):
            cx = float(nrng.uniform(margin + r, w - margin - r))
            cy = float(nrng.uniform(margin + r, h - margin - r))
            if all((cx - x) ** 2 + (cy - y) ** 2 >= ((s + so) / 2.0 + gap) ** 2 for (x, y), so in zip(centres, sizes)):
                if avoid is None or not avoid[int(cy), int(cx)]:
                    centres.append((cx, cy))
                    break
        else:
            return _grid_places(nrng, sizes, h, w)
    return centres


def _grid_places(nrng: np.random.Generator, sizes: Sequence[float], h: int, w: int) -> list[tuple[float, float]]:
    n = len(sizes)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    cells = nrng.permutation(rows * cols)[:n]
    return [(w * (c % cols + 0.5) / cols, h * (c // cols + 0.5) / rows) for c in cells]


# ---------------------------------------------------------------- text
def text_mask(text: str, sx: int = 2, sy: int | None = None, bold: int = 0, spacing: int = 1) -> np.ndarray:
    """Boolean mask of ``text`` in the built-in font.

    Each font pixel becomes ``sy``×``sx`` pixels (``sy`` defaults to ``sx``); ``spacing`` is the gap
    between glyphs in font pixels; ``bold`` dilates strokes by that many pixels. Shape
    ``(7*sy + 2*bold, (6*n - 1)*sx + 2*bold)`` for ``spacing=1``. Bold text needs
    ``spacing*sx > 2*bold`` or neighbouring glyphs merge.
    """
    sy = sx if sy is None else sy
    cols: list[np.ndarray] = []
    gap = np.zeros((GLYPH_H, spacing), dtype=bool)
    for i, ch in enumerate(text.upper()):
        if ch not in GLYPHS:
            raise ValueError(f"character {ch!r} is not in the built-in font")
        if i:
            cols.append(gap)
        cols.append(GLYPHS[ch])
    unit = np.concatenate(cols, axis=1) if cols else np.zeros((GLYPH_H, 0), dtype=bool)
    big = np.kron(unit, np.ones((sy, sx), dtype=bool))
    return dilate(np.pad(big, bold), bold) if bold else big


def text_size(text: str, sx: int = 2, sy: int | None = None, bold: int = 0, spacing: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of :func:`text_mask` for the same arguments."""
    sy = sx if sy is None else sy
    n = len(text)
    return (n * GLYPH_W + max(n - 1, 0) * spacing) * sx + 2 * bold, GLYPH_H * sy + 2 * bold


def draw_text(
    img: np.ndarray,
    text: str,
    x: int,
    y: int,
    colour: RGB | Sequence[int],
    sx: int = 2,
    sy: int | None = None,
    bold: int = 0,
    spacing: int = 1,
) -> tuple[int, int, int, int]:
    """Draw ``text`` with its top-left corner at (``x``, ``y``); clipped to the image.

    Returns the box ``(x0, y0, x1, y1)`` the text covers (before clipping)."""
    m = text_mask(text, sx, sy, bold, spacing)
    th, tw = m.shape
    h, w = img.shape[:2]
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + tw, w), min(y + th, h)
    if x1 > x0 and y1 > y0:
        sub = m[y0 - y : y1 - y, x0 - x : x1 - x]
        img[y0:y1, x0:x1][sub] = np.asarray(colour, dtype=np.uint8)
    return x, y, x + tw, y + th


def draw_text_centered(
    img: np.ndarray, text: str, cx: float, cy: float, colour: RGB | Sequence[int], **kw: int
) -> tuple[int, int, int, int]:
    """:func:`draw_text` centred at (``cx``, ``cy``); keyword arguments as for :func:`text_mask`."""
    tw, th = text_size(text, **kw)
    return draw_text(img, text, int(round(cx - tw / 2)), int(round(cy - th / 2)), colour, **kw)


# ---------------------------------------------------------------- textures
def squared_paper(nrng: np.random.Generator, size: int, paper: RGB | Sequence[int], grid: RGB | Sequence[int],
                  step: int) -> np.ndarray:
    """Exercise paper: ``paper`` (jittered) ruled in ``grid`` squares of ``step`` px at a random offset, with a
    red margin line at x = 5."""
    img = canvas(size, size, jitter(paper, nrng, 5))
    off = int(nrng.integers(step))
    lines = np.zeros((size, size), dtype=bool)
    lines[off::step, :] = True
    lines[:, off::step] = True
    paint(img, lines, grid)
    paint(img, rect_mask(size, size, 5, 0, 6, size), (220, 90, 90))  # the margin line
    return img


def value_noise(nrng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise in [0, 1] of shape ``(h, w)``: random values on a ``cell``-spaced lattice,
    bilinearly interpolated. Larger ``cell`` = blotchier texture."""
    gh, gw = h // cell + 2, w // cell + 2
    lat = nrng.random((gh, gw))
    ys = np.arange(h) / cell
    xs = np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = lat[y0][:, x0]
    b = lat[y0][:, x0 + 1]
    c = lat[y0 + 1][:, x0]
    d = lat[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def texture(
    nrng: np.random.Generator,
    h: int,
    w: int,
    c0: RGB | Sequence[int],
    c1: RGB | Sequence[int],
    cell: int = 8,
    grain: float = 0.0,
) -> np.ndarray:
    """An image mixing colours ``c0``→``c1`` by value noise, plus optional per-pixel ``grain`` (0..1)."""
    t = value_noise(nrng, h, w, cell)
    if grain:
        t = np.clip(t + grain * (nrng.random((h, w)) - 0.5), 0.0, 1.0)
    a, b = np.asarray(c0, dtype=np.float32), np.asarray(c1, dtype=np.float32)
    return (a + (b - a) * t[..., None]).astype(np.uint8)


def add_grain(img: np.ndarray, nrng: np.random.Generator, amount: int) -> np.ndarray:
    """Per-pixel noise of ±``amount`` grey levels (returns a new array)."""
    n = nrng.integers(-amount, amount + 1, size=img.shape[:2])[..., None]
    return np.clip(img.astype(np.int16) + n, 0, 255).astype(np.uint8)


def tile(images: Sequence[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Tile ``rows*cols`` equally sized images row-major into one image."""
    if len(images) != rows * cols:
        raise ValueError(f"need {rows * cols} images, got {len(images)}")
    return np.concatenate([np.concatenate(images[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0)


# ---------------------------------------------------------------- charts
def draw_candles(
    img: np.ndarray,
    opens: Sequence[float],
    closes: Sequence[float],
    highs: Sequence[float],
    lows: Sequence[float],
    box: tuple[int, int, int, int],
    up: RGB = COLOURS["green"],
    down: RGB = COLOURS["red"],
    body_frac: float = 0.7,
) -> list[float]:
    """Candlestick chart of ``n`` days inside ``box=(x0, y0, x1, y1)``; price axis auto-scaled.

    Returns the x centre of each candle (so callers can put labels under them)."""
    x0, y0, x1, y1 = box
    h, w = img.shape[:2]
    lo, hi = min(lows), max(highs)
    span = max(hi - lo, 1e-9)

    def py(v: float) -> float:
        return y1 - (v - lo) / span * (y1 - y0)

    n = len(opens)
    step = (x1 - x0) / n
    bw = max(step * body_frac, 2.0)
    centres: list[float] = []
    for i in range(n):
        cx = x0 + step * (i + 0.5)
        col = up if closes[i] >= opens[i] else down
        paint(img, rect_mask(h, w, cx - 0.75, py(highs[i]), cx + 0.75, py(lows[i]) + 1), col)
        top, bot = py(max(opens[i], closes[i])), py(min(opens[i], closes[i]))
        paint(img, rect_mask(h, w, cx - bw / 2, top, cx + bw / 2, max(bot, top + 2)), col)
        centres.append(cx)
    return centres
