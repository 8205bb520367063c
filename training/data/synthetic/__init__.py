"""Synthetic PixMo-style training data: shape scenes to point at and count, and clocks to read.

    scenes.py       the shape scenes (PixMo-Points / PixMo-Count style) and how they are drawn
    annotations.py  what a scene is asked: point and count questions, a caption
    captions.py     the scenes' dense captions and the length-hinted caption prompt
    clocks.py       PixMo-Clocks style watch faces and their readings
    render.py       seeded random streams, backgrounds, chat turns
    dataset.py      seeded splits, `make_example`, `SyntheticDataset`, JSONL export

The names below are the package's public surface. To look at some examples, write them to
disk with `python -m training.data OUT_DIR --split train --size 16`.
"""

from training.data.synthetic.annotations import (
    COUNT_TEMPLATES,
    POINT_TEMPLATES,
    count_answer,
    pointing_annotation,
    query_label,
    scene_annotations,
)
from training.data.synthetic.captions import caption_prompt, describe_scene, length_hint
from training.data.synthetic.clocks import (
    CLOCK_TEMPLATES,
    HHMM_QUESTION,
    Clock,
    ClockConfig,
    clock_annotations,
    render_clock,
)
from training.data.synthetic.dataset import (
    SPLIT_CAPACITY,
    SPLITS,
    SyntheticConfig,
    SyntheticDataset,
    make_example,
    split_of_seed,
    split_seed,
    write_synthetic_split,
)
from training.data.synthetic.render import BACKGROUNDS, render_background
from training.data.synthetic.scenes import (
    COLOURS,
    PLURALS,
    SHAPE_KINDS,
    Scene,
    SceneConfig,
    SceneObject,
    render_scene,
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
    "Clock",
    "ClockConfig",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "SyntheticConfig",
    "SyntheticDataset",
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
    "write_synthetic_split",
]
