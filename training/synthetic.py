"""Synthetic PixMo-style training data: shape scenes to point at and count, and clocks to read.

The generators live in `training/shapes.py` (PixMo-Points / PixMo-Count style scenes) and
`training/clocks.py` (PixMo-Clocks style watch faces); this module re-exports them and
adds what turns them into a dataset:

- `split_seed(split, index)`: splits own disjoint seed ranges, so train, val and test never
  share an image.
- `SyntheticConfig` and `make_example(split, index, config)`: one `training.records.Example`
  (the image, several annotations for multi-annotation packing, and metadata with every
  object's kind, colour, box and centre, or the clock's geometry) — a pure function of its
  arguments: the same call gives identical image bytes and annotations.

To look at some, write them to disk with `python -m training.data` (see there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.clocks import (
    CLOCK_TEMPLATES,
    HHMM_QUESTION,
    Clock,
    ClockConfig,
    clock_annotations,
    render_clock,
)
from training.records import Annotation, Example
from training.render import (
    BACKGROUNDS,
    caption_prompt,
    length_hint,
    render_background,
    rng_for,
)
from training.shapes import (
    COLOURS,
    COUNT_TEMPLATES,
    PLURALS,
    POINT_TEMPLATES,
    SHAPE_KINDS,
    Scene,
    SceneConfig,
    SceneObject,
    count_answer,
    describe_scene,
    pointing_annotation,
    query_label,
    render_scene,
    scene_annotations,
)

__all__ = [
    "BACKGROUNDS",
    "CLOCK_TEMPLATES",
    "COLOURS",
    "COUNT_TEMPLATES",
    "HHMM_QUESTION",
    "PLURALS",
    "POINT_TEMPLATES",
    "SHAPE_KINDS",
    "SPLITS",
    "SPLIT_CAPACITY",
    "Annotation",
    "Clock",
    "ClockConfig",
    "Example",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "SyntheticConfig",
    "caption_prompt",
    "clock_annotations",
    "count_answer",
    "describe_scene",
    "length_hint",
    "make_example",
    "pointing_annotation",
    "query_label",
    "render_background",
    "render_clock",
    "render_scene",
    "scene_annotations",
    "split_of_seed",
    "split_seed",
]

SPLITS = ("train", "val", "test")
SPLIT_CAPACITY = 10**12  # examples per split; split k owns seeds [k * capacity, (k + 1) * capacity)
SCENE_SOURCE = "synthetic-points"
CLOCK_SOURCE = "synthetic-clocks"


def split_seed(split: str, index: int) -> int:
    """The seed of example `index` of `split`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= index < SPLIT_CAPACITY:
        raise ValueError(f"index must be in [0, {SPLIT_CAPACITY}), got {index}")
    return SPLITS.index(split) * SPLIT_CAPACITY + index


def split_of_seed(seed: int) -> str:
    """The split that owns `seed`."""
    if not 0 <= seed < len(SPLITS) * SPLIT_CAPACITY:
        raise ValueError(f"seed {seed} belongs to no split")
    return SPLITS[seed // SPLIT_CAPACITY]


@dataclass
class SyntheticConfig:
    """The synthetic mixture: shape scenes and clocks."""

    scene: SceneConfig = field(default_factory=SceneConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    clock_fraction: float = 0.2  # share of examples that are clocks (the paper down-weights them)

    def __post_init__(self) -> None:
        if not 0.0 <= self.clock_fraction <= 1.0:
            raise ValueError(f"clock_fraction must be in [0, 1], got {self.clock_fraction}")


def make_example(split: str, index: int, config: SyntheticConfig | None = None) -> Example:
    """Example `index` of `split`: a scene or (with `clock_fraction`) a clock, fully annotated."""
    cfg = config or SyntheticConfig()
    seed = split_seed(split, index)
    base = {"split": split, "index": index, "seed": seed}
    if rng_for(seed, "task").random() < cfg.clock_fraction:
        clock = render_clock(seed, cfg.clock)
        metadata = {"source": CLOCK_SOURCE, **base, "clock": clock.geometry()}
        return Example(clock.image, clock_annotations(clock, cfg.clock), metadata)
    scene = render_scene(seed, cfg.scene)
    metadata = {
        "source": SCENE_SOURCE,
        **base,
        "target": list(scene.target),
        "background": scene.background,
        "objects": [o.to_dict() for o in scene.objects],
    }
    return Example(scene.image, scene_annotations(scene, cfg.scene), metadata)
