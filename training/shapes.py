"""PixMo-Points / PixMo-Count style scenes: flat coloured shapes to point at and count.

`render_scene(seed)` draws 0..15 instances of one target kind+colour (kinds `SHAPE_KINDS`,
colours `COLOURS`) plus distractor groups of other kinds/colours, of varied sizes, on a
solid, gradient or noisy background. Objects never overlap (a free band of `gap` pixels
is kept around each), so every one is distinctly pointable; each records its kind, colour
and box, and its centre is the pointing target.

`scene_annotations(scene)` asks several questions of one scene: pointing ("Point to all
the red circles."), counting by pointing ("How many red circles are there?" ->
"Counting the <points ...>red circles</points>, there are 3."), "There are none." for
things not there, and a short dense caption behind a `long_caption 83:` length-hint prompt.
Point targets are written by `molmo_model.points.format_points` in pixels of the image.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from molmo_model.points import format_points
from training.records import Annotation
from training.render import (
    BACKGROUNDS,
    caption_prompt,
    chat,
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

POINT_TEMPLATES = (
    "Point to all the {label}.",
    "Point to the {label}.",
    "Where are the {label}?",
    "Show me where the {label} are.",
    "Point to every one of the {label} in the image.",
    "Find the {label} and point to them.",
    "Can you point out the {label}?",
    "Locate all the {label}.",
)
COUNT_TEMPLATES = (
    "How many {label} are there?",
    "How many {label} are in the image?",
    "Count the {label}.",
    "Count the {label} in this picture.",
    "How many {label} can you see?",
    "What is the number of {label} in the image?",
)


def inside(point: Sequence[float], box: Sequence[float]) -> bool:
    """Whether (x, y) lies in the box (x0, y0, x1, y1), edges included: a hit for pointing."""
    x, y = point
    x0, y0, x1, y1 = box
    return x0 <= x <= x1 and y0 <= y <= y1


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
        check_subset("backgrounds", self.backgrounds, BACKGROUNDS)
        if len(self.kinds) * len(self.colours) < 2:
            raise ValueError("kinds x colours must allow at least 2 combinations (target + others)")
        if not 0 <= self.max_count <= 40:
            raise ValueError(f"max_count must be in [0, 40], got {self.max_count}")
        if self.max_distractors < 0 or self.max_questions < 1 or self.gap < 0:
            raise ValueError("max_distractors and gap must be >= 0, max_questions >= 1")
        if not (0 < self.size_range[0] and self.size_range[1] <= 0.5):
            raise ValueError(f"size_range must lie in (0, 0.5], got {self.size_range}")
        for name in ("fill", "absent_prob", "caption_prob", "hint_prob"):
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

    image, phrase = render_background(width, height, rng.choice(cfg.backgrounds), rng)
    draw = ImageDraw.Draw(image)
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
        _draw_shape(draw, kind, box, COLOURS[colour])
        objects.append(SceneObject(kind, colour, box))
    return Scene(image=image, objects=objects, target=target, background=phrase, seed=seed)


def query_label(kind: str | None, colour: str | None) -> str:
    """How a question names a set of shapes: "red circles", "stars", "blue shapes"."""
    noun = PLURALS[kind] if kind is not None else "shapes"
    return f"{colour} {noun}" if colour is not None else noun


def count_answer(points: list[tuple[float, float]], label: str, width: int, height: int) -> str:
    """Counting by pointing: the numbered points, then the count (the last point's number)."""
    if not points:
        return format_points([], label)  # "not present"
    n = len(points)
    verb = "is" if n == 1 else "are"
    return f"Counting the {format_points(points, label, width=width, height=height)}, there {verb} {n}."


def pointing_annotation(
    scene: Scene, kind: str | None, colour: str | None, task: str, rng: random.Random
) -> Annotation:
    """A "point" or "count" question about the shapes of `kind` and `colour` (None = any)."""
    objects = scene.matching(kind, colour)
    label = query_label(kind, colour)
    points = [o.centre for o in objects]
    if task == "point":
        question = rng.choice(POINT_TEMPLATES).format(label=label)
        answer = format_points(points, label, width=scene.width, height=scene.height)
    elif task == "count":
        question = rng.choice(COUNT_TEMPLATES).format(label=label)
        answer = count_answer(points, label, scene.width, scene.height)
    else:
        raise ValueError(f"task must be 'point' or 'count', got {task!r}")
    info = {"kind": kind, "colour": colour, "count": len(objects)}
    return Annotation(chat(question, answer), points=points, label=label, task=task, info=info)


_NUMBER_WORDS = (
    "no one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()


def _number_word(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _region(x: float, y: float, width: int, height: int) -> str:
    row = ("top", "middle", "bottom")[min(2, int(3 * y / height))]
    col = ("left", "centre", "right")[min(2, int(3 * x / width))]
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"in the {row} {col}"


def _whereabouts(centres: list[tuple[float, float]], width: int, height: int) -> str:
    """Where a group of shapes is: one ninth of the image, one half, or all over."""
    regions = {_region(x, y, width, height) for x, y in centres}
    if len(regions) == 1:
        return regions.pop()
    xs, ys = [x for x, _ in centres], [y for _, y in centres]
    for inside, phrase in (
        (max(ys) < height / 2, "in the upper half"),
        (min(ys) >= height / 2, "in the lower half"),
        (max(xs) < width / 2, "in the left half"),
        (min(xs) >= width / 2, "in the right half"),
    ):
        if inside:
            return phrase
    return "spread across the image"


def describe_scene(scene: Scene) -> str:
    """A short dense caption: the background, what shapes there are, and where."""
    n = len(scene.objects)
    size = f"A {scene.width} by {scene.height} picture"
    if n == 0:
        return f"{size} of {scene.background} with no shapes on it."
    groups = Counter((o.colour, o.kind) for o in scene.objects)
    order = sorted(groups, key=lambda g: (-groups[g], g))
    names = {g: f"{g[0]} {PLURALS[g[1]] if groups[g] > 1 else g[1]}" for g in order}
    listed = [f"{_number_word(groups[g])} {names[g]}" for g in order]
    shapes = "shape" if n == 1 else "shapes"
    sentences = [f"{size} of {_number_word(n)} flat {shapes} on {scene.background}."]
    sentences.append(f"There {'is' if n == 1 else 'are'} {_join(listed)}.")
    places = []
    for g in order:
        centres = [o.centre for o in scene.matching(g[1], g[0])]
        verb = "is" if len(centres) == 1 else "are"
        places.append(f"the {names[g]} {verb} {_whereabouts(centres, scene.width, scene.height)}")
    sentences.append(_join(places)[0].upper() + _join(places)[1:] + ".")
    return " ".join(sentences)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def scene_annotations(scene: Scene, config: SceneConfig | None = None) -> list[Annotation]:
    """Several annotations of one scene, for multi-annotation packing.

    Always a point or count question about the target kind+colour; up to
    `max_questions - 1` more about other present kinds, colours or kind+colour groups; with
    `absent_prob` one about a kind+colour that is not there ("There are none."); with
    `caption_prob` a dense caption behind a `long_caption` prompt.
    """
    cfg = config or SceneConfig()
    rng = rng_for(scene.seed, "scene-qa")
    queries: list[tuple[str | None, str | None]] = [scene.target]
    present = sorted({(o.kind, o.colour) for o in scene.objects} - {scene.target})
    kinds = sorted({o.kind for o in scene.objects})
    colours = sorted({o.colour for o in scene.objects})
    pools: list[list[tuple[str | None, str | None]]] = [
        list(present),
        [(k, None) for k in kinds],
        [(None, c) for c in colours],
    ]
    # A kind-only or colour-only question that picks the same shapes as one already asked
    # adds nothing; every question here selects a different set.
    asked = {frozenset(scene.matching(*scene.target))}
    for _ in range(rng.randint(0, cfg.max_questions - 1)):
        pool = rng.choices(pools, weights=(3, 1, 1))[0]
        fresh = [q for q in pool if frozenset(scene.matching(*q)) not in asked]
        if fresh:
            query = rng.choice(fresh)
            queries.append(query)
            asked.add(frozenset(scene.matching(*query)))
    if rng.random() < cfg.absent_prob:
        absent = [(k, c) for k in cfg.kinds for c in cfg.colours if not scene.matching(k, c)]
        if absent:
            queries.append(rng.choice(absent))

    annotations = [
        pointing_annotation(scene, kind, colour, rng.choice(("point", "count")), rng)
        for kind, colour in queries
    ]
    if rng.random() < cfg.caption_prob:
        caption = describe_scene(scene)
        prompt, hint = caption_prompt(caption, rng, cfg.hint_prob)
        annotations.append(
            Annotation(chat(prompt, caption), task="caption", info={"length_hint": hint})
        )
    rng.shuffle(annotations)
    return annotations
