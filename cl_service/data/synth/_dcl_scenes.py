"""Scene generators for the DCL stand-ins RS (aerial), Med (pathology) and AD (six tiled camera views).

Each ``_<qtype>`` function is one question type: it draws its answer uniformly first, then renders
an image that makes the answer true, so answers are balanced within a type and can only be read
from the image. Scenes are rendered at 64×64 (AD: 96×64, six 32×32 views) with large, salient
cues so they survive the model's resize to 64×64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cl_service.data.synth._common import pick, yes_no
from cl_service.data.synth.render import (
    RGB,
    add_grain,
    canvas,
    circle_mask,
    ellipse_mask,
    jitter,
    line_mask,
    paint,
    polygon_mask,
    rect_mask,
    scatter,
    texture,
    tile,
)

Q = tuple[np.ndarray, str, list[str], dict[str, Any]]
S = 64  # side of a square scene

# ---------------------------------------------------------------- RS: aerial scenes
LAND_COVERS = ("farmland", "forest", "desert", "grassland")
ROOFS: tuple[RGB, ...] = ((190, 70, 50), (235, 235, 230), (200, 200, 205), (230, 130, 60))


def _land(nrng: np.random.Generator, cover: str) -> np.ndarray:
    """Background land cover; each class has its own colour *and* texture scale."""
    if cover == "forest":  # dark, fine-grained canopy
        return texture(nrng, S, S, (20, 70, 25), (55, 115, 45), cell=3, grain=0.3)
    if cover == "desert":  # pale sand, broad dunes
        return texture(nrng, S, S, (235, 210, 150), (200, 165, 105), cell=16, grain=0.1)
    if cover == "grassland":  # light, smooth green
        return texture(nrng, S, S, (150, 200, 95), (120, 175, 75), cell=12, grain=0.1)
    # farmland: a patchwork of straight-edged fields in greens, browns and wheat
    img = canvas(S, S)
    field_cols = [(95, 150, 50), (150, 110, 60), (205, 185, 100), (70, 125, 45), (170, 135, 80)]
    xs = np.sort(nrng.choice(np.arange(10, 55), size=2, replace=False))
    ys = np.sort(nrng.choice(np.arange(10, 55), size=2, replace=False))
    xb, yb = [0, *xs.tolist(), S], [0, *ys.tolist(), S]
    for i in range(3):
        for j in range(3):
            col = jitter(pick(nrng, field_cols), nrng, 12)
            img[yb[i] : yb[i + 1], xb[j] : xb[j + 1]] = col
            if nrng.random() < 0.5:  # plough furrows
                img[yb[i] : yb[i + 1] : 3, xb[j] : xb[j + 1]] = jitter(col, nrng, 25)
    return add_grain(img, nrng, 6)


def _aerial(nrng: np.random.Generator, cover: str, water: bool, n_buildings: int) -> np.ndarray:
    img = _land(nrng, cover)
    occupied = np.zeros((S, S), dtype=bool)
    if nrng.random() < 0.5:  # roads are decoration (no question asks about them)
        y0, y1 = nrng.uniform(5, 59, size=2)
        road = line_mask(S, S, -2, y0, S + 2, y1, 4) if nrng.random() < 0.5 else line_mask(S, S, y0, -2, y1, S + 2, 4)
        paint(img, road, jitter((115, 115, 115), nrng, 10))
        occupied |= road
    if water:
        if nrng.random() < 0.5:  # lake
            wmask = ellipse_mask(S, S, *nrng.uniform(18, 46, size=2), *nrng.uniform(9, 15, size=2))
        else:  # river crossing the scene
            pts = nrng.uniform(8, 56, size=3)
            wmask = line_mask(S, S, -3, pts[0], 32, pts[1], 9) | line_mask(S, S, 32, pts[1], S + 3, pts[2], 9)
        img[wmask] = texture(nrng, S, S, (35, 75, 165), (55, 105, 195), cell=6)[wmask]
        occupied |= wmask
    sizes = nrng.uniform(8, 11, size=n_buildings)
    for (cx, cy), s in zip(scatter(nrng, sizes, S, S, gap=3, avoid=occupied), sizes):
        roof = jitter(pick(nrng, ROOFS), nrng, 12)
        x0, y0, x1, y1 = cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2
        paint(img, rect_mask(S, S, x0 + 2, y0 + 2, x1 + 2, y1 + 2), (30, 30, 30))  # cast shadow
        paint(img, rect_mask(S, S, x0, y0, x1, y1), roof)
    return img


def _rs_scene(nrng: np.random.Generator) -> tuple[str, bool, int]:
    return pick(nrng, LAND_COVERS), bool(nrng.random() < 0.5), int(nrng.integers(0, 5))


def _water(nrng: np.random.Generator, split: str) -> Q:
    cover, water, n = _rs_scene(nrng)
    return _aerial(nrng, cover, water, n), "Is there water in the image?", [yes_no(water)], {}


def _buildings(nrng: np.random.Generator, split: str) -> Q:
    cover, water, n = _rs_scene(nrng)
    return _aerial(nrng, cover, water, n), "How many buildings are there?", [str(n)], {}


def _land_cover(nrng: np.random.Generator, split: str) -> Q:
    cover, water, n = _rs_scene(nrng)
    return _aerial(nrng, cover, water, n), "What is the main land cover?", [cover], {}


RS_TYPES = (_water, _buildings, _land_cover)

# ---------------------------------------------------------------- Med: pathology textures
STAINS: dict[str, tuple[RGB, RGB]] = {  # (background light, cytoplasm mid) per stain
    "pink": ((245, 195, 215), (230, 130, 170)),
    "purple": ((210, 180, 230), (160, 100, 195)),
    "brown": ((230, 205, 170), (175, 120, 65)),
    "blue": ((190, 210, 240), (110, 145, 210)),
}


def _dark(c: RGB, f: float) -> RGB:
    return (int(c[0] * f), int(c[1] * f), int(c[2] * f))


def _tissue(nrng: np.random.Generator, stain: str, abnormal: bool) -> np.ndarray:
    """Stained tissue with many nuclei: small, round, evenly spread when normal; large, irregular,
    crowded and darker when abnormal (the classic pleomorphism cue)."""
    light, mid = STAINS[stain]
    img = texture(nrng, S, S, light, mid, cell=7, grain=0.25)
    nuc = _dark(mid, 0.45)
    if abnormal:
        n, rlo, rhi, f = int(nrng.integers(7, 11)), 4.0, 7.0, 0.3
    else:
        n, rlo, rhi, f = int(nrng.integers(14, 20)), 1.8, 2.8, 0.5
    for _ in range(n):
        cx, cy = nrng.uniform(3, S - 3, size=2)
        rx, ry = nrng.uniform(rlo, rhi), nrng.uniform(rlo, rhi) * (nrng.uniform(0.6, 1.0) if abnormal else 1.0)
        colour = jitter(_dark(mid, f), nrng, 10) if abnormal else jitter(nuc, nrng, 8)
        paint(img, ellipse_mask(S, S, cx, cy, rx, ry), colour)
    return img


def _smear(nrng: np.random.Generator, stain: str, n_cells: int) -> np.ndarray:
    """Cytology-like smear: ``n_cells`` large separate cells, each with one dark nucleus."""
    light, mid = STAINS[stain]
    img = texture(nrng, S, S, light, _dark(light, 0.95), cell=10, grain=0.15)
    sizes = nrng.uniform(12, 16, size=n_cells)
    for (cx, cy), s in zip(scatter(nrng, sizes, S, S, gap=3), sizes):
        paint(img, circle_mask(S, S, cx, cy, s / 2), jitter(mid, nrng, 10))
        nx, ny = cx + nrng.uniform(-1.5, 1.5), cy + nrng.uniform(-1.5, 1.5)
        paint(img, circle_mask(S, S, nx, ny, s / 5), _dark(mid, 0.35))
    return img


def _abnormal(nrng: np.random.Generator, split: str) -> Q:
    stain, abn = pick(nrng, list(STAINS)), bool(nrng.random() < 0.5)
    return _tissue(nrng, stain, abn), "Is this tissue abnormal?", [yes_no(abn)], {}


def _stain(nrng: np.random.Generator, split: str) -> Q:
    stain = pick(nrng, list(STAINS))
    # either scene kind, so the stain word is tied to colour only, not to one layout
    if nrng.random() < 0.5:
        img = _tissue(nrng, stain, bool(nrng.random() < 0.5))
    else:
        img = _smear(nrng, stain, int(nrng.integers(1, 6)))
    return img, "What stain colour dominates?", [stain], {}


def _cells(nrng: np.random.Generator, split: str) -> Q:
    stain, n = pick(nrng, list(STAINS)), int(nrng.integers(1, 6))
    return _smear(nrng, stain, n), "How many cells are there?", [str(n)], {}


MED_TYPES = (_abnormal, _stain, _cells)

# ---------------------------------------------------------------- AD: six camera views tiled 2×3
V = 32  # side of one camera view; the tiled image is 96×64 (3 views across, 2 down)
# no red cars: red is reserved for the traffic light the yes/no question asks about
CAR_COLOURS: tuple[RGB, ...] = (
    (40, 80, 220), (240, 240, 240), (240, 210, 40), (30, 30, 30), (170, 175, 185), (40, 200, 210)
)
PED_COLOURS: tuple[RGB, ...] = ((200, 40, 200), (250, 140, 20))


def _view(nrng: np.random.Generator, front: bool) -> np.ndarray:
    """One camera view: sky, roadside silhouettes, a road with lane marks converging at the horizon."""
    hz = int(nrng.integers(11, 15))  # horizon row
    img = canvas(V, V, jitter((170, 195, 225) if front else (150, 170, 200), nrng, 12))
    for _ in range(int(nrng.integers(1, 4))):  # buildings / trees along the horizon
        x0, bw, bh = nrng.uniform(-4, V), nrng.uniform(5, 12), nrng.uniform(3, 9)
        paint(img, rect_mask(V, V, x0, hz - bh, x0 + bw, hz), jitter((105, 115, 100), nrng, 20))
    paint(img, rect_mask(V, V, 0, hz, V, V), jitter((90, 130, 70), nrng, 15))  # verge
    cx = V / 2 + nrng.uniform(-4, 4)
    paint(img, polygon_mask(V, V, [(cx - 2, hz), (cx + 2, hz), (V + 6, V), (-6, V)]), jitter((95, 95, 100), nrng, 8))
    for t in (0.3, 0.65):  # dashed centre line
        y = hz + t * (V - hz)
        paint(img, rect_mask(V, V, cx - 0.6, y, cx + 0.6 + t, y + 3), (235, 235, 235))
    return img


def _car(img: np.ndarray, nrng: np.random.Generator) -> None:
    col = pick(nrng, CAR_COLOURS)
    cx, y = nrng.uniform(9, V - 9), nrng.uniform(19, 23)
    paint(img, rect_mask(V, V, cx - 4, y - 4, cx + 4, y), _dark(col, 0.75))  # cabin
    paint(img, rect_mask(V, V, cx - 7, y, cx + 7, y + 6), col)  # body
    for wx in (cx - 4.5, cx + 4.5):
        paint(img, circle_mask(V, V, wx, y + 6, 1.8), (15, 15, 15))


def _pedestrian(img: np.ndarray, nrng: np.random.Generator, left: bool) -> None:
    # kept to one side of the view so it never hides under a car
    cx, y = (nrng.uniform(3, 7) if left else nrng.uniform(V - 7, V - 3)), nrng.uniform(13, 16)
    paint(img, circle_mask(V, V, cx, y, 2), (235, 190, 150))  # head
    paint(img, rect_mask(V, V, cx - 2, y + 2, cx + 2, y + 9), pick(nrng, PED_COLOURS))  # torso
    legs = line_mask(V, V, cx - 1, y + 9, cx - 2, y + 14, 1.5) | line_mask(V, V, cx + 1, y + 9, cx + 2, y + 14, 1.5)
    paint(img, legs, (40, 40, 60))


def _traffic_light(img: np.ndarray, nrng: np.random.Generator, red: bool, left: bool) -> None:
    x = nrng.uniform(3, 6) if left else nrng.uniform(V - 6, V - 3)
    paint(img, rect_mask(V, V, x - 0.7, 10, x + 0.7, 24), (70, 70, 70))  # pole
    paint(img, rect_mask(V, V, x - 3, 1, x + 3, 13), (25, 25, 25))  # housing
    paint(img, circle_mask(V, V, x, 4 if red else 10, 2.6), (255, 30, 30) if red else (40, 230, 80))


def _drive(nrng: np.random.Generator, n_cars: int, ped_view: int | None, light: str | None) -> np.ndarray:
    """Tile six views (1-3 front left/front/front right, 4-6 back left/back/back right).

    ``light`` is ``"red"``/``"green"``/``None``; the light stands in a front view, on the side
    opposite the pedestrian when they share a view."""
    views = [_view(nrng, front=i < 3) for i in range(6)]
    for v in nrng.permutation(6)[:n_cars]:
        _car(views[int(v)], nrng)
    ped_left = bool(nrng.random() < 0.5)
    if ped_view is not None:
        _pedestrian(views[ped_view], nrng, ped_left)
    if light is not None:
        lv = int(nrng.integers(3))
        left = (not ped_left) if lv == ped_view else bool(nrng.random() < 0.5)
        _traffic_light(views[lv], nrng, light == "red", left)
    return tile(views, 2, 3)


def _ad_extras(nrng: np.random.Generator) -> tuple[int, int | None, str | None]:
    """Random scene content for the attributes a question does not ask about (distractors)."""
    lights = ("red", "green", None)
    ped = int(nrng.integers(6)) if nrng.random() < 0.5 else None
    return int(nrng.integers(0, 5)), ped, lights[int(nrng.integers(3))]


def _red_light(nrng: np.random.Generator, split: str) -> Q:
    red = bool(nrng.random() < 0.5)
    n, ped, _ = _ad_extras(nrng)
    light = "red" if red else ("green" if nrng.random() < 0.5 else None)
    return _drive(nrng, n, ped, light), "Is there a red light?", [yes_no(red)], {}


def _cars(nrng: np.random.Generator, split: str) -> Q:
    _, ped, light = _ad_extras(nrng)
    n = int(nrng.integers(0, 5))
    return _drive(nrng, n, ped, light), "How many cars are there?", [str(n)], {}


def _ped_view(nrng: np.random.Generator, split: str) -> Q:
    n, _, light = _ad_extras(nrng)
    ped = int(nrng.integers(6))
    q = "Which camera view shows a pedestrian? Answer with the view number."
    return _drive(nrng, n, ped, light), q, [str(ped + 1)], {}


AD_TYPES = (_red_light, _cars, _ped_view)
