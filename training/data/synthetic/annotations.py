"""What the shape scenes are asked: pointing, counting by pointing, and a caption.

`scene_annotations(scene)` asks several questions of one scene: pointing ("Point to all
the red circles."), counting by pointing ("How many red circles are there?" ->
"Counting the <points ...>red circles</points>, there are 3."), "There are none." for
things not there, and a short dense caption behind a `long_caption 83:` length-hint prompt.
Point targets are written by `molmo_model.points.format_points` in pixels of the image.
"""

from __future__ import annotations

import random

from molmo_model.points import format_points
from training.data.records import Annotation
from training.data.synthetic.captions import caption_prompt, describe_scene
from training.data.synthetic.render import chat, rng_for
from training.data.synthetic.scenes import PLURALS, Scene, SceneConfig

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
