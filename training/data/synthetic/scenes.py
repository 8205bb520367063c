"""PixMo-Points / PixMo-Count style scenes: flat coloured shapes to point at and count.

`render_scene(seed)` draws 0..15 instances of one target kind+colour (kinds `SHAPE_KINDS`,
colours `COLOURS`) plus distractor groups of other kinds/colours, of varied sizes, on a
solid, gradient or noisy background. Objects never overlap (a free band of `gap` pixels
is kept around each), so every one is distinctly pointable; each records its kind, colour
and box, and its centre is the pointing target. What the scenes are asked is in
`annotations.py`, their captions in `captions.py`.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from training.data.records import inside
from training.data.synthetic.render import (
    BACKGROUND_STYLES,
    BACKGROUNDS,
    check_range,
    check_subset,
    render_background,
    rng_for,
)

SHAPE_KINDS = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
PLURALS = {kind: kind + "s" for kind in SHAPE_KINDS} | {"cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 0),
    "yellow": (240, 215, 0),
    "green": (30, 165, 60),
    "blue": (30, 80, 225),
    "purple": (135, 50, 190),
    "pink": (250, 110, 185),
    "brown": (125, 75, 30),
}

@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. `box` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        """The point a pointing target uses; it lies inside the drawn shape for every kind."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    def contains(self, x: float, y: float) -> bool:
        return inside((x, y), self.box)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "colour": self.colour,
            "box": list(self.box),
            "centre": list(self.centre),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneObject:
        return cls(d["kind"], d["colour"], tuple(int(v) for v in d["box"]))  # type: ignore[arg-type]


@dataclass
class SceneConfig:
    """How shape scenes are drawn and questioned."""

    width_range: tuple[int, int] = (288, 384)  # image width drawn uniformly from this (pixels)
    height_range: tuple[int, int] = (288, 384)
    kinds: tuple[str, ...] = SHAPE_KINDS
    colours: tuple[str, ...] = tuple(COLOURS)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    max_count: int = 15  # instances of the target kind+colour: 0..max_count (the paper caps at 40)
    max_distractors: int = 10  # other shapes: 0..max_distractors
    size_range: tuple[float, float] = (0.055, 0.13)  # object side / shorter image side
    fill: float = 0.3  # object boxes cover at most this share of the image (shrinks them if needed)
    gap: int = 4  # pixels kept free around every object
    max_questions: int = 4  # point/count questions per scene (besides the optional absent one)
    absent_prob: float = 0.3  # chance of an extra question about something not in the picture
    caption_prob: float = 0.5  # chance of a dense-caption annotation
    hint_prob: float = 0.9  # chance that a caption prompt carries a length hint
    # Rendering variety (all off by default: then scenes are drawn exactly as before, from the
    # same random stream). What should not matter to a pointer: the shade of a colour, an
    # outline, a rotation, soft edges, the background's tint, JPEG artefacts.
    shade: float = 0.0  # 0..1: how far an object's fill strays from its colour's RGB (HSV jitter)
    outline_prob: float = 0.0  # chance that an object has an outline, darker or lighter
    outline_width: tuple[int, int] = (1, 4)  # pixels
    rotation: float = 0.0  # objects other than circles turn by up to this many degrees
    supersample: int = 1  # draw each object this many times larger, then shrink (anti-aliasing)
    background_tint: float = 0.0  # levels a channel the background colour may move
    jpeg_prob: float = 0.0  # chance that the scene goes through JPEG
    jpeg_quality: tuple[int, int] = (30, 90)

    def __post_init__(self) -> None:
        self.width_range = tuple(int(v) for v in self.width_range)  # type: ignore[assignment]
        self.height_range = tuple(int(v) for v in self.height_range)  # type: ignore[assignment]
        self.kinds, self.colours = tuple(self.kinds), tuple(self.colours)
        self.backgrounds = tuple(self.backgrounds)
        check_range("width_range", self.width_range, 32)
        check_range("height_range", self.height_range, 32)
        check_range("size_range", self.size_range, 0.0)
        check_subset("kinds", self.kinds, SHAPE_KINDS)
        check_subset("colours", self.colours, tuple(COLOURS))
        check_subset("backgrounds", self.backgrounds, BACKGROUND_STYLES)
        self.outline_width = tuple(int(v) for v in self.outline_width)  # type: ignore[assignment]
        self.jpeg_quality = tuple(int(v) for v in self.jpeg_quality)  # type: ignore[assignment]
        check_range("outline_width", self.outline_width, 1)
        check_range("jpeg_quality", self.jpeg_quality, 1)
        if self.jpeg_quality[1] > 95:
            raise ValueError(f"jpeg_quality must lie in [1, 95], got {self.jpeg_quality}")
        if not 0.0 <= self.rotation <= 180.0 or not 1 <= self.supersample <= 8:
            raise ValueError("rotation must be in [0, 180] degrees and supersample in [1, 8]")
        if not 0.0 <= self.background_tint <= 64.0:
            raise ValueError(f"background_tint must be in [0, 64], got {self.background_tint}")
        if len(self.kinds) * len(self.colours) < 2:
            raise ValueError("kinds x colours must allow at least 2 combinations (target + others)")
        if not 0 <= self.max_count <= 40:
            raise ValueError(f"max_count must be in [0, 40], got {self.max_count}")
        if self.max_distractors < 0 or self.max_questions < 1 or self.gap < 0:
            raise ValueError("max_distractors and gap must be >= 0, max_questions >= 1")
        if not (0 < self.size_range[0] and self.size_range[1] <= 0.5):
            raise ValueError(f"size_range must lie in (0, 0.5], got {self.size_range}")
        for name in ("fill", "absent_prob", "caption_prob", "hint_prob", "shade", "outline_prob",
                     "jpeg_prob"):  # fmt: skip
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class Scene:
    """A rendered shape scene and the truth about it."""

    image: Image.Image
    objects: list[SceneObject]
    target: tuple[str, str]  # (kind, colour) the scene was built around; may have 0 instances
    background: str  # phrase describing the background
    seed: int

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def matching(self, kind: str | None = None, colour: str | None = None) -> list[SceneObject]:
        """Objects of `kind` and `colour` (None matches any)."""
        return [
            o
            for o in self.objects
            if (kind is None or o.kind == kind) and (colour is None or o.colour == colour)
        ]


def _shape_polygon(kind: str, x0: float, y0: float, s: float) -> list[tuple[float, float]]:
    cx, cy, r = x0 + s / 2.0, y0 + s / 2.0, s / 2.0
    if kind == "triangle":
        return [(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if kind == "diamond":
        return [(cx, y0), (x0 + s, cy), (cx, y0 + s), (x0, cy)]
    if kind == "hexagon":
        return [
            (cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3))
            for k in range(6)
        ]
    if kind == "star":  # 10 vertices, alternately on the outer and inner radius, tip up
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [
            (cx + rr * math.sin(k * math.pi / 5), cy - rr * math.cos(k * math.pi / 5))
            for k, rr in enumerate(radii)
        ]
    raise AssertionError(kind)


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    s = x1 - x0
    if kind == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif kind == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif kind == "cross":
        a, b = round(s / 3), round(2 * s / 3)
        draw.rectangle([x0, y0 + a, x1 - 1, y0 + b - 1], fill=fill)
        draw.rectangle([x0 + a, y0, x0 + b - 1, y1 - 1], fill=fill)
    else:
        draw.polygon(_shape_polygon(kind, x0, y0, s - 1), fill=fill)


def _styled(cfg: SceneConfig) -> bool:
    return bool(cfg.shade or cfg.outline_prob or cfg.rotation or cfg.supersample > 1)


def _shade(rgb: tuple[int, int, int], amount: float, rng: random.Random) -> tuple[int, int, int]:
    """`rgb` moved in HSV: hue by up to 12 degrees, saturation by up to 25% and value by up to 35%, each
    scaled by `amount` (0..1), so the colour keeps its name."""
    h, sat, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    h = (h + amount * rng.uniform(-12.0, 12.0) / 360.0) % 1.0
    sat = min(1.0, max(0.0, sat * (1.0 + amount * rng.uniform(-0.25, 0.1))))
    v = min(1.0, max(0.0, v * (1.0 + amount * rng.uniform(-0.35, 0.2))))
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, sat, v))  # type: ignore[return-value]


def _outline_colour(fill: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    if rng.random() < 0.5:  # darker
        k = rng.uniform(0.2, 0.6)
        return tuple(round(c * k) for c in fill)  # type: ignore[return-value]
    k = rng.uniform(0.4, 0.8)  # lighter: toward white
    return tuple(round(c + (255 - c) * k) for c in fill)  # type: ignore[return-value]


def _outline_polygon(kind: str, s: float) -> list[tuple[float, float]]:
    """The outline of `kind` in a box of side `s` at the origin (circles excluded)."""
    if kind == "square":
        return [(0, 0), (s, 0), (s, s), (0, s)]
    if kind == "cross":
        a, b = s / 3, 2 * s / 3
        return [(a, 0), (b, 0), (b, a), (s, a), (s, b), (b, b), (b, s), (a, s), (a, b), (0, b),
                (0, a), (a, a)]  # fmt: skip
    return _shape_polygon(kind, 0.0, 0.0, s)


def _draw_styled(
    image: Image.Image,
    kind: str,
    spot: tuple[int, int, int],
    colour: tuple[int, int, int],
    cfg: SceneConfig,
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """Draw `kind` inside the square `spot` (x, y, side) with the config's rendering variety;
    returns the box of its drawn pixels (x1/y1 exclusive)."""
    x, y, size = spot
    k = cfg.supersample
    fill = _shade(colour, cfg.shade, rng) if cfg.shade else colour
    width = 0
    if cfg.outline_prob and rng.random() < cfg.outline_prob:
        width = min(rng.randint(*cfg.outline_width), max(1, size // 6))
    line = _outline_colour(fill, rng) if width else None
    angle = math.radians(rng.uniform(-cfg.rotation, cfg.rotation)) if cfg.rotation else 0.0
    layer = Image.new("RGBA", (size * k, size * k), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if kind == "circle":
        draw.ellipse([0, 0, size * k - 1, size * k - 1], fill=fill, outline=line, width=width * k)
    else:
        pts = _outline_polygon(kind, 1.0)
        c, s = math.cos(angle), math.sin(angle)
        turned = [((px - 0.5) * c - (py - 0.5) * s, (px - 0.5) * s + (py - 0.5) * c) for px, py in pts]
        extent = max(max(abs(px), abs(py)) for px, py in turned)  # fit the turned shape in the box
        side = (size * k - 1) / 2.0
        poly = [(side + px / extent * side, side + py / extent * side) for px, py in turned]
        draw.polygon(poly, fill=fill, outline=line, width=width * k)
    if k > 1:
        layer = layer.resize((size, size), Image.Resampling.BOX)
    image.paste(layer, (x, y), layer)  # the RGB scene, through the layer's alpha
    alpha = np.asarray(layer)[..., 3] > 32  # [size, size]: the drawn pixels
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    return (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1)


def _free_spot(occupied: np.ndarray, size: int, rng: random.Random) -> tuple[int, int] | None:
    """A uniformly chosen top-left corner where a size x size box touches nothing occupied."""
    h, w = occupied.shape
    if size > h or size > w:
        return None
    # Rejection sampling first (uniform over the free corners, and cheap while there is room);
    # when it keeps missing, list every free corner with an integral image.
    for _ in range(20):
        x, y = rng.randrange(w - size + 1), rng.randrange(h - size + 1)
        if not occupied[y : y + size, x : x + size].any():
            return x, y
    integral = np.zeros((h + 1, w + 1), dtype=np.int32)
    integral[1:, 1:] = occupied.cumsum(0, dtype=np.int32).cumsum(1)
    s = size
    # Occupied pixels inside the box whose top-left is (y, x): [h - s + 1, w - s + 1].
    inside = integral[s:, s:] - integral[:-s, s:] - integral[s:, :-s] + integral[:-s, :-s]
    free = np.flatnonzero(inside == 0)
    if free.size == 0:
        return None
    y, x = divmod(int(free[rng.randrange(free.size)]), inside.shape[1])
    return x, y


def render_scene(seed: int, config: SceneConfig | None = None) -> Scene:
    """Draw the shape scene of `seed` (see the module docstring)."""
    cfg = config or SceneConfig()
    rng = rng_for(seed, "scene")
    width, height = rng.randint(*cfg.width_range), rng.randint(*cfg.height_range)
    combos = [(k, c) for k in cfg.kinds for c in cfg.colours]
    target = rng.choice(combos)
    others = [combo for combo in combos if combo != target]
    # Distractors come in a few groups; often one is a hard negative that shares the
    # target's kind or colour, so a right answer must attend to both.
    groups = rng.sample(others, k=min(len(others), rng.randint(1, 3)))
    hard = [combo for combo in others if combo[0] == target[0] or combo[1] == target[1]]
    if hard and rng.random() < 0.6:
        groups[0] = rng.choice(hard)
    wanted = [target] * rng.randint(0, cfg.max_count)
    wanted += [rng.choice(groups) for _ in range(rng.randint(0, cfg.max_distractors))]

    image, phrase = render_background(
        width, height, rng.choice(cfg.backgrounds), rng, tint=cfg.background_tint
    )
    draw = ImageDraw.Draw(image)
    styled = _styled(cfg)
    short = min(width, height)
    lo = max(6, round(cfg.size_range[0] * short))
    crowded = int(math.sqrt(cfg.fill * width * height / max(1, len(wanted)))) - cfg.gap
    hi = max(lo, min(round(cfg.size_range[1] * short), crowded))
    occupied = np.zeros((height, width), dtype=bool)  # [H, W], objects grown by `gap` + the border
    occupied[:2, :] = occupied[-2:, :] = occupied[:, :2] = occupied[:, -2:] = True

    objects: list[SceneObject] = []
    for kind, colour in wanted:  # targets first, so crowding can only drop distractors
        size = rng.randint(lo, hi)
        spot = _free_spot(occupied, size, rng)
        while spot is None and size > lo:  # crowded: try smaller
            size = max(lo, int(size * 0.8))
            spot = _free_spot(occupied, size, rng)
        if spot is None:
            if (kind, colour) == target:
                raise RuntimeError(
                    f"scene seed {seed}: no room for {len(wanted)} objects in {width}x{height}; "
                    "lower max_count or size_range"
                )
            continue  # a distractor may be dropped; every target instance is drawn
        x, y = spot
        box = (x, y, x + size, y + size)
        occupied[
            max(0, y - cfg.gap) : y + size + cfg.gap, max(0, x - cfg.gap) : x + size + cfg.gap
        ] = True
        if styled:
            box = _draw_styled(image, kind, (x, y, size), COLOURS[colour], cfg, rng)
        else:
            _draw_shape(draw, kind, box, COLOURS[colour])
        objects.append(SceneObject(kind, colour, box))
    if cfg.jpeg_prob and rng.random() < cfg.jpeg_prob:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(*cfg.jpeg_quality))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return Scene(image=image, objects=objects, target=target, background=phrase, seed=seed)
