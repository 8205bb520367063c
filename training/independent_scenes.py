"""Shape scenes drawn independently of the training generator, for evaluation only.

A model trained on `training.data.synthetic.scenes` may learn that generator's quirks (one
exact RGB per colour name, axis-aligned aliased polygons, square-ish images) rather than
shapes and colours. `render_independent(seed, kinds, colours)` draws the same kind of
question on pictures made another way, so a score here measures what transfers:

- shapes are geometry (a disc, or a polygon: square, rhombus, triangle, 5-point star,
  hexagon, 12-vertex cross) rasterized with numpy by supersampling (`SAMPLES` x `SAMPLES`
  per pixel) and alpha-composited, so edges are anti-aliased; each is rotated about its
  centre (squares, diamonds and crosses by at most `TILT` degrees, so none turns into
  another kind), with no outline or one darker or lighter than the fill, 1-4 px wide;
- each colour name is an HSV range of its own (`HSV_COLOURS`), never the training RGB:
  every object draws its own shade;
- backgrounds are light: plain, gradient, soft stripes or checker, with light noise;
- width and height are drawn independently from 300-800 px.

A scene holds one target (kind, colour) with 0..10 instances and 0..4 distractors of other
combinations of the vocabulary, often sharing the target's kind or colour. Objects never
overlap; each box is the tight box of its drawn pixels (x1/y1 exclusive) and its centre,
the pointing target, lies inside the shape's fill. Only the question wording is shared
with training (annotations.py's templates), which is what the model was taught to read.
Nothing under training/ but the evaluation may import this module (tests/test_layout.py).
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.data.synthetic.annotations import COUNT_TEMPLATES, POINT_TEMPLATES, query_label
from training.data.synthetic.scenes import SHAPE_KINDS, SceneObject
from training.evaluate import Query

SAMPLES = 4  # supersamples per pixel along each axis
SIZE_RANGE = (300, 800)  # image width and height, drawn independently (pixels)
SIDE_RANGE = (0.08, 0.16)  # object side / shorter image side
MAX_TARGETS, MAX_DISTRACTORS = 10, 4
GAP = 3  # pixels kept free between object boxes
TILT = 20.0  # most rotation (degrees) of the kinds that a larger turn would make another kind
ABSENT_PROB = 0.2  # chance of a point question about a combination not in the picture
# colour name -> (hue centre in degrees, hue jitter +-, saturation range, value range)
HSV_COLOURS: dict[str, tuple[float, float, tuple[float, float], tuple[float, float]]] = {
    "red": (358.0, 6.0, (0.72, 0.95), (0.72, 0.95)),
    "orange": (28.0, 5.0, (0.80, 1.00), (0.88, 1.00)),
    "yellow": (52.0, 4.0, (0.78, 1.00), (0.85, 1.00)),
    "green": (128.0, 12.0, (0.55, 0.85), (0.50, 0.78)),
    "blue": (220.0, 10.0, (0.65, 0.92), (0.68, 0.95)),
    "purple": (280.0, 10.0, (0.50, 0.78), (0.48, 0.75)),
    "pink": (328.0, 8.0, (0.38, 0.60), (0.90, 1.00)),
    "brown": (26.0, 6.0, (0.62, 0.85), (0.32, 0.50)),
}


@dataclass
class IndependentScene:
    image: Image.Image
    objects: list[SceneObject]
    target: tuple[str, str]
    seed: int

    def matching(self, kind: str, colour: str) -> list[SceneObject]:
        return [o for o in self.objects if o.kind == kind and o.colour == colour]


def _outline(kind: str, rng: random.Random) -> np.ndarray:
    """The kind's polygon around (0, 0) within [-1, 1]^2 (unrotated): [V, 2] (x, y)."""
    if kind == "square":
        return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)
    if kind == "diamond":  # a rhombus taller than wide, so it is no turned square
        w = rng.uniform(0.62, 0.8)
        return np.array([(0, -1), (w, 0), (0, 1), (-w, 0)], dtype=np.float64)
    if kind == "triangle":  # equilateral, centroid at the origin
        angles = np.deg2rad([-90.0, 30.0, 150.0])
    elif kind == "hexagon":
        angles = np.deg2rad(np.arange(6) * 60.0)
    elif kind == "star":
        angles = np.deg2rad(-90.0 + np.arange(10) * 36.0)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.4, 0.5))
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    elif kind == "cross":
        a = rng.uniform(0.3, 0.38)  # half the arm's width
        quarter = [(a, -1), (a, -a), (1, -a)]  # one corner's 3 vertices, turned 4 times
        pts = []
        for k in range(4):
            c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][k]
            pts += [(c * x - s * y, s * x + c * y) for x, y in quarter]
        return np.array(pts, dtype=np.float64)
    else:
        raise AssertionError(kind)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _inside_and_depth(kind: str, poly: np.ndarray, r: float, xs: np.ndarray, ys: np.ndarray):
    """For sample points xs, ys ([N] each, relative to the centre, pixels): whether each is
    inside the shape ([N] bool) and its distance to the boundary ([N] float)."""
    if kind == "circle":
        d = np.hypot(xs, ys)
        return d <= r, np.abs(r - d)
    inside = np.zeros(xs.shape, dtype=bool)
    depth = np.full(xs.shape, np.inf)
    for (ax, ay), (bx, by) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        crosses = (ay > ys) != (by > ys)  # even-odd rule on a ray towards +x
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = ax + (ys - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (xs < x_at)
        ex, ey = bx - ax, by - ay
        t = np.clip(((xs - ax) * ex + (ys - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        depth = np.minimum(depth, np.hypot(xs - ax - t * ex, ys - ay - t * ey))
    return inside, depth


def _hsv(colour: str, rng: random.Random) -> np.ndarray:
    hue, jitter, (s0, s1), (v0, v1) = HSV_COLOURS[colour]
    h = ((hue + rng.uniform(-jitter, jitter)) % 360.0) / 360.0
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(s0, s1), rng.uniform(v0, v1)))


def _background(w: int, h: int, rng: random.Random, gen: np.random.Generator) -> np.ndarray:
    """A light background: [H, W, 3] floats in [0, 1]."""

    def light() -> np.ndarray:  # near-white, light grey or cream
        return np.array(
            colorsys.hsv_to_rgb(
                rng.uniform(0.08, 0.15), rng.uniform(0.0, 0.12), rng.uniform(0.88, 0.98)
            )
        )

    base = light()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # [H, W] each
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)  # [H, W] position along a direction
    style = rng.choice(("plain", "gradient", "stripes", "checker"))
    img = np.broadcast_to(base, (h, w, 3)).copy()
    if style == "gradient":
        t = (along - along.min()) / max(1.0, np.ptp(along))
        img = base * (1 - t[..., None]) + light() * t[..., None]
    elif style == "stripes":
        wave = np.sin(along * 2 * math.pi / rng.uniform(18, 60))
        img = img - rng.uniform(0.02, 0.05) * (wave[..., None] + 1)
    elif style == "checker":
        cell = rng.randint(14, 48)
        odd = ((xx // cell + yy // cell) % 2)[..., None]
        img = img - rng.uniform(0.02, 0.05) * odd
    img = img + gen.normal(0.0, rng.uniform(0.0, 0.015), size=(h, w, 1))  # light grey noise
    return np.clip(img, 0.0, 1.0)


def _draw(img: np.ndarray, kind: str, poly: np.ndarray, r: float, cx: float, cy: float,
          colour: str, rng: random.Random) -> tuple[int, int, int, int] | None:  # fmt: skip
    """Composites one shape (`poly` [V, 2] rotated, in pixels around the centre cx, cy; a disc
    of radius r for circles) into img [H, W, 3]; returns its tight box, or None (nothing
    drawn) when the box centre would not lie well inside the shape."""
    ex, ey = (r, r) if kind == "circle" else np.abs(poly).max(axis=0)
    px0, py0, px1, py1 = (
        math.floor(cx - ex),
        math.floor(cy - ey),
        math.ceil(cx + ex),
        math.ceil(cy + ey),
    )
    offs = (np.arange(SAMPLES) + 0.5) / SAMPLES
    xs = (np.arange(px0, px1)[:, None] + offs).ravel() - cx  # [W * S] sample x, centre-relative
    ys = (np.arange(py0, py1)[:, None] + offs).ravel() - cy  # [H * S]
    gx, gy = np.meshgrid(xs, ys)  # [H * S, W * S]
    inside, depth = _inside_and_depth(kind, poly, r, gx.ravel(), gy.ravel())
    inside, depth = inside.reshape(gx.shape), depth.reshape(gx.shape)
    h, w = py1 - py0, px1 - px0

    def coverage(mask: np.ndarray) -> np.ndarray:  # [H * S, W * S] bool -> [H, W] in [0, 1]
        return mask.reshape(h, SAMPLES, w, SAMPLES).mean(axis=(1, 3))

    cov = coverage(inside)
    rows, cols = np.flatnonzero(cov.any(axis=1)), np.flatnonzero(cov.any(axis=0))
    box = (px0 + int(cols[0]), py0 + int(rows[0]), px0 + int(cols[-1]) + 1, py0 + int(rows[-1]) + 1)
    bx, by = (box[0] + box[2]) / 2.0 - cx, (box[1] + box[3]) / 2.0 - cy
    at_centre, d = _inside_and_depth(kind, poly, r, np.array([bx]), np.array([by]))
    if not at_centre[0] or d[0] < 1.5:
        return None
    fill = _hsv(colour, rng)
    style = rng.choice(("none", "darker", "lighter"))
    # The outline lies inside the shape's edge, and stops short of the pointing target.
    thin = 8.0 if kind == "star" else 5.0  # a star's arms are narrow: keep them filled
    width = min(rng.randint(1, 4), int(d[0] - 1.0), max(1, int(r / thin)))
    if style == "none" or width < 1:
        edge, fill_cov = fill, cov
    else:
        t = rng.uniform(0.35, 0.55)
        edge = fill * (1 - t) if style == "darker" else fill + t * (1 - fill)
        fill_cov = coverage(inside & (depth >= width))
    patch = img[py0:py1, px0:px1]  # [H, W, 3], a view: composited in place
    patch *= 1.0 - cov[..., None]
    patch += (cov - fill_cov)[..., None] * edge + fill_cov[..., None] * fill
    return box


def _check(name: str, given: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    unknown = [g for g in given if g not in known]
    if unknown or not given:
        raise ValueError(
            f"{name}: unknown {unknown or 'none given'}; choose from {', '.join(known)}"
        )
    return tuple(dict.fromkeys(given))


def render_independent(seed: int, kinds: Sequence[str] = SHAPE_KINDS,
                       colours: Sequence[str] = tuple(HSV_COLOURS)) -> IndependentScene:  # fmt: skip
    """Draw the independent scene of `seed` from the vocabulary kinds x colours."""
    kinds, colours = (
        _check("kinds", kinds, SHAPE_KINDS),
        _check("colours", colours, tuple(HSV_COLOURS)),
    )
    rng = random.Random(f"independent:{seed}")
    gen = np.random.default_rng(rng.getrandbits(64))
    w, h = rng.randint(*SIZE_RANGE), rng.randint(*SIZE_RANGE)
    combos = [(k, c) for k in kinds for c in colours]
    target = rng.choice(combos)
    others = [x for x in combos if x != target]
    hard = [x for x in others if x[0] == target[0] or x[1] == target[1]]
    wanted = [target] * rng.randint(0, MAX_TARGETS)
    for _ in range(rng.randint(0, MAX_DISTRACTORS) if others else 0):
        wanted.append(rng.choice(hard if hard and rng.random() < 0.6 else others))

    img = _background(w, h, rng, gen)  # [H, W, 3]
    short = min(w, h)
    # Side s: a crowded scene shrinks its objects (to SIDE_RANGE[0]) so that all fit.
    crowded = math.sqrt(0.22 * w * h / max(1, len(wanted)))
    s_lo = SIDE_RANGE[0] * short
    s_hi = max(s_lo, min(SIDE_RANGE[1] * short, crowded))
    taken: list[tuple[int, int, int, int]] = []  # drawn boxes; a new one keeps GAP from them
    objects: list[SceneObject] = []
    for kind, colour in wanted:  # targets first, so crowding drops distractors first
        r = rng.uniform(s_lo, s_hi) / 2.0
        tilt = TILT if kind in ("square", "diamond", "cross") else 180.0
        unit = _outline(kind, rng) if kind != "circle" else np.zeros((0, 2))  # [V, 2]
        # A turn that would put the pointing target near an edge falls back to upright.
        for angle in (math.radians(rng.uniform(-tilt, tilt)), 0.0):
            c, s = math.cos(angle), math.sin(angle)
            poly = unit * r @ np.array([[c, s], [-s, c]])  # [V, 2] rotated, in pixels
            ex, ey = (r + 1.0, r + 1.0) if kind == "circle" else np.abs(poly).max(axis=0) + 1.0
            for _ in range(200):
                cx, cy = rng.uniform(ex + 1, w - ex - 1), rng.uniform(ey + 1, h - ey - 1)
                near = (cx - ex - GAP, cy - ey - GAP, cx + ex + GAP, cy + ey + GAP)
                if not any(near[0] < b[2] and b[0] < near[2] and near[1] < b[3] and b[1] < near[3]
                           for b in taken):  # fmt: skip
                    break
            else:
                break  # no room: not drawn (the truth lists only what is drawn)
            box = _draw(img, kind, poly, r, cx, cy, colour, rng)
            if box is not None:
                taken.append(box)
                objects.append(SceneObject(kind, colour, box))
                break
    pixels = np.round(img * 255.0).astype(np.uint8)  # [H, W, 3]
    return IndependentScene(Image.fromarray(pixels, "RGB"), objects, target, seed)


def independent_queries(n_scenes: int, kinds: Sequence[str] = SHAPE_KINDS,
                        colours: Sequence[str] = tuple(HSV_COLOURS), start: int = 0,
                        tasks: Sequence[str] = ("point", "count")) -> list[Query]:  # fmt: skip
    """Per scene start..start+n-1: a point and a count question about its target, worded as
    in training, and in about 1 scene of 5 a point question about a combination of the
    vocabulary that is not in the picture (no boxes, count 0)."""
    out = []
    for seed in range(start, start + n_scenes):
        scene = render_independent(seed, kinds, colours)
        rng = random.Random(f"independent-questions:{seed}")
        source = {"renderer": "independent", "seed": seed}
        asked = [(scene.target, t) for t in ("point", "count") if t in tasks]
        absent = [(k, c) for k in dict.fromkeys(kinds) for c in dict.fromkeys(colours)
                  if (k, c) != scene.target and not scene.matching(k, c)]  # fmt: skip
        if absent and "point" in tasks and rng.random() < ABSENT_PROB:
            asked.append((rng.choice(absent), "point"))
        for (kind, colour), task in asked:
            boxes = [tuple(float(v) for v in o.box) for o in scene.matching(kind, colour)]
            templates = POINT_TEMPLATES if task == "point" else COUNT_TEMPLATES
            question = rng.choice(templates).format(label=query_label(kind, colour))
            out.append(Query(task, question, scene.image, boxes, len(boxes), source=dict(source)))
    return out
