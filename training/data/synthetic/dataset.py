"""The synthetic mixture as a dataset: seeded splits of shape scenes and clocks.

- `split_seed(split, index)`: splits own disjoint seed ranges, so train, val and test never
  share an image.
- `SyntheticConfig` and `make_example(split, index, config)`: one `training.data.records.Example`
  (the image, several annotations for multi-annotation packing, and metadata with every
  object's kind, colour, box and centre, or the clock's geometry) — a pure function of its
  arguments: the same call gives identical image bytes and annotations.
- `SyntheticDataset(split, size)` serves them on the fly; `write_synthetic_split` writes them
  in the JSONL format (`python -m training.data OUT_DIR --split train --size 1000`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from training.data.jsonl import write_jsonl
from training.data.records import Example
from training.data.synthetic.annotations import scene_annotations
from training.data.synthetic.clocks import ClockConfig, clock_annotations, render_clock
from training.data.synthetic.render import rng_for
from training.data.synthetic.scenes import SceneConfig, render_scene

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


class SyntheticDataset(Dataset):
    """Synthetic examples `start .. start + size - 1` of a split, generated on the fly."""

    def __init__(
        self, split: str, size: int, config: SyntheticConfig | None = None, start: int = 0
    ) -> None:
        split_seed(split, start)  # checks split and start
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.split, self.size, self.start = split, size, start
        self.config = config or SyntheticConfig()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Example:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        return make_example(self.split, self.start + index % self.size, self.config)


def write_synthetic_split(
    out_dir: str | Path,
    split: str,
    size: int,
    config: SyntheticConfig | None = None,
    start: int = 0,
) -> Path:
    """Write synthetic examples `start .. start + size - 1` of `split` as `out_dir/{split}.jsonl`."""
    dataset = SyntheticDataset(split, size, config, start)
    return write_jsonl((dataset[i] for i in range(len(dataset))), out_dir, name=split)
