"""Order recovery: pointing answers in which one point is written ahead of its turn.

Molmo lists points top-down, then left-right (`molmo_model.points.format_points`). For two
objects in nearly the same row that order turns on a few pixels of height, which a small model
reads no better than a coin toss: it writes the left one first, say, when the right one sits
slightly higher. Teacher forcing only ever shows lists in order, so after that slip the model
has never seen an object left behind, does not go back for it, and the count comes out short.
(In the first demo model's counting answers that are short, most point only at right objects
and skip one between them, beside a neighbour in its row.)

`recover_order` rewrites an answer so that, of two neighbours in the order whose centres lie
within `ROW` of the image height, the later one is written first. That point's x, the wrong
turn, carries no loss (`Annotation.masked_points`), nor any grounding; the neighbour written
next (going back for it) and everything after are trained as usual, as is the count at the
end, which does not change. The model so learns to come back for an object it passed, from
the states its own slips lead to, as in DAgger-style training (Ross et al., 2011).

`recover_example(example, prob, rng)` applies it to each pointing or counting annotation of
an image with probability `prob` (`extras.recovery.prob`); `RecoveryExtra` has the loader call
it on training batches only, with a generator seeded by the stream position, so batches stay a
pure function of the step.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from molmo_model.points import format_points, reading_order
from training.data.records import Annotation, Example
from training.supervision import Extra

ROW = 0.12  # two centres this close in height (a fraction of it) are in one row


def recover_order(
    annotation: Annotation, width: int, height: int, rng: random.Random
) -> Annotation | None:
    """`annotation` with one same-row pair of its points written in reverse and the first of
    them masked, or None when it has no such pair or its answer is not format_points' text."""
    points = annotation.points
    if (
        annotation.task not in ("point", "count")
        or not points
        or len(points) < 2
        or annotation.label is None
    ):
        return None
    order = [points[i] for i in reading_order(points, width, height)]
    pairs = [i for i in range(len(order) - 1) if abs(order[i + 1][1] - order[i][1]) <= ROW * height]
    if not pairs:
        return None
    tag = format_points(order, annotation.label, width=width, height=height)
    answer = annotation.answer
    if answer.count(tag) != 1:
        return None
    i = rng.choice(pairs)
    swapped = order[:i] + [order[i + 1], order[i]] + order[i + 2 :]
    new_tag = format_points(swapped, annotation.label, width=width, height=height, keep_order=True)
    messages = [dict(m) for m in annotation.messages]
    messages[-1]["content"] = answer.replace(tag, new_tag)
    return dataclasses.replace(annotation, messages=messages, points=swapped, masked_points=(i,))


def recover_example(example: Example, prob: float, rng: random.Random) -> Example:
    """`example` with each annotation that has a same-row pair rewritten with probability `prob`."""
    if prob <= 0:
        return example
    width, height = example.image.size
    annotations = []
    for annotation in example.annotations:
        new = recover_order(annotation, width, height, rng) if rng.random() < prob else None
        annotations.append(new or annotation)
    return dataclasses.replace(example, annotations=annotations)


@dataclass
class RecoveryConfig:
    """`[extras.recovery]`: order recovery in the pointing answers."""

    prob: float = 0.0  # chance a pointing answer is rewritten to go back for a passed object; 0 = off

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"extras.recovery.prob must be in [0, 1], got {self.prob}")


class RecoveryExtra(Extra):
    """Rewrites examples before packing; adds no loss of its own (the wrong turn's x is masked)."""

    name = "recovery"

    def __init__(self, config: RecoveryConfig) -> None:
        self.config = config

    def prepare(self, example: Example, seed: int, position: int) -> Example:
        # Seeded by the position: a batch is a function of its step.
        return recover_example(example, self.config.prob, random.Random(f"recovery:{seed}:{position}"))
