"""Dense supervision of the image tokens: a stand-in for a pre-trained vision tower.

Molmo starts from a pre-trained CLIP ViT, whose patch features already say what is where;
the LLM then only learns to read them. A demo trained from nothing has no such tower, and
with only the text loss its image tokens learn "where" too slowly for pointing to form in a
45-minute CPU run. When the training data knows its objects (the synthetic scenes record
every object's kind, colour and box), this module adds a small per-token loss on the image
features the LLM receives (the connector's output, global view only):

- which kind and which colour of object covers the token's centre (or background),
- that object's centre in image coordinates (x, y as fractions of width and height, x10),
- and the first two characters of its x and y as Molmo writes them ("61.5" -> 6, 1;
  "8.3" -> 8, "."), so the very tokens the LLM writes are linear read-outs of the features.

The head is a single linear layer that lives beside the model during training only: it is
saved in training checkpoints (exact resume) and never in the served model, which stays
Molmo's layout. Weight 0 (`extras.dense.weight`, the default) turns the whole thing off;
`extras.dense.object_attributes = w` adds the kind and colour loss once more, averaged over
the object tokens only (`experiments/demo_ablation.py` measures it).

`dense_targets(metadata, width, height, geometry, kinds, colours)` gives one image's targets
from its `metadata["objects"]` (or None when it has none); `DenseHead` scores a batch;
`DenseExtra` plugs both into the trainer (training/supervision.py). The kinds and colours it
classifies come from the data: the synthetic scenes' lists, or those a JSONL file's objects
name. `global_token_centres`, `on_box` and `FeatureTap` serve the grounding extra too.
"""


from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from molmo_model.config import PreprocessConfig
from molmo_model.preprocessing import fit_size
from training.data.records import Example
from training.packing import Batch, PackedExample
from training.supervision import Extra, ExtraLoss

if TYPE_CHECKING:
    from training.config import DataConfig  # the root config imports the extras, not back

COORD_SCALE = 10.0  # centre targets in tenths of the image: the LLM writes the tens digit
N_CHARS = 11  # classes of a coordinate's character: digits 0-9 and the decimal point


@dataclass
class DenseTargets:
    """Per global-view token: kind and colour class (0 = background; kind > 0 marks the tokens
    whose centre lies on an object), and that object's centre and coordinate characters.
    One image's are [T]; a batch's are stacked [G, T] with `crops` set."""

    kind: torch.Tensor  # int64 [T]
    colour: torch.Tensor  # int64 [T]
    centre: torch.Tensor  # float32 [T, 2]
    chars: torch.Tensor  # int64 [T, 4]: x's 1st, 2nd, y's 1st, 2nd character (0-9, 10 = ".")
    crops: torch.Tensor | None = None  # int64 [G]: each image's global-view crop in the batch

    def __len__(self) -> int:
        return 1 if self.crops is None else int(self.crops.shape[0])

    def to(self, device: torch.device | str) -> DenseTargets:
        tensors = (self.kind, self.colour, self.centre, self.chars)
        crops = None if self.crops is None else self.crops.to(device, non_blocking=True)
        return DenseTargets(*(t.to(device) for t in tensors), crops)

    @classmethod
    def batch(cls, items: list[tuple[int, int, DenseTargets]]) -> DenseTargets:
        """The images' targets stacked; an image's global view is its first crop."""
        stacked = cls.stack([t for _, _, t in items])
        stacked.crops = torch.tensor([crop for _, crop, _ in items], dtype=torch.long)
        return stacked

    @staticmethod
    def stack(targets: list[DenseTargets]) -> DenseTargets:
        return DenseTargets(
            torch.stack([t.kind for t in targets]),
            torch.stack([t.colour for t in targets]),
            torch.stack([t.centre for t in targets]),
            torch.stack([t.chars for t in targets]),
        )


def coordinate_chars(value: float) -> tuple[int, int]:
    """The first two characters of a percentage as `format_points` writes it, as classes:
    digits 0-9, 10 for the decimal point ("61.5" -> (6, 1), "8.3" -> (8, 10))."""
    text = f"{value * 100:.1f}"
    return tuple(10 if c == "." else int(c) for c in text[:2])  # type: ignore[return-value]


def global_token_centres(width: int, height: int, geo: PreprocessConfig) -> torch.Tensor:
    """[T, 2]: the image pixel (x, y) under the centre of each pooled token of the global view
    (row-major), given Ai2's resize-and-centre onto the crop_size x crop_size canvas."""
    size = geo.crop_size
    new_h, new_w = fit_size(height, width, size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    step = size / geo.tokens_per_side
    pos = torch.arange(geo.tokens_per_side, dtype=torch.float32) * step + step / 2
    ys, xs = torch.meshgrid(pos, pos, indexing="ij")
    x = (xs.flatten() - left) * (width / new_w)
    y = (ys.flatten() - top) * (height / new_h)
    return torch.stack([x, y], dim=-1)


def on_box(centres: torch.Tensor, box) -> torch.Tensor:
    """bool [T]: the token centres [T, 2] that lie in `box` (x0, y0, x1, y1; x1/y1 exclusive)."""
    x, y = centres[:, 0], centres[:, 1]
    return (x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])


def dense_targets(
    metadata: dict[str, Any],
    width: int,
    height: int,
    geo: PreprocessConfig,
    kinds: tuple[str, ...],
    colours: tuple[str, ...],
) -> DenseTargets | None:
    """The targets of one image from `metadata["objects"]` ({kind, colour, box, centre} each,
    box in pixels), or None for an image with no object list (clocks, users' JSONL data)."""
    objects = metadata.get("objects")
    if objects is None:
        return None
    centres = global_token_centres(width, height, geo)  # [T, 2]
    n = centres.shape[0]
    kind = torch.zeros(n, dtype=torch.long)
    colour = torch.zeros(n, dtype=torch.long)
    centre = torch.zeros(n, 2)
    chars = torch.zeros(n, 4, dtype=torch.long)
    for o in objects:
        if o["kind"] not in kinds or o["colour"] not in colours:
            continue
        on = on_box(centres, o["box"])
        kind[on] = kinds.index(o["kind"]) + 1
        colour[on] = colours.index(o["colour"]) + 1
        cx, cy = o["centre"][0] / width, o["centre"][1] / height
        centre[on] = torch.tensor([cx, cy])
        chars[on] = torch.tensor([*coordinate_chars(cx), *coordinate_chars(cy)])
    return DenseTargets(kind, colour, centre, chars)


class DenseHead(nn.Module):
    """Linear read-out of kind, colour, object centre and coordinate characters from each
    image feature."""

    def __init__(self, d_model: int, n_kinds: int, n_colours: int, object_attributes: float = 0.0):
        super().__init__()
        self.n_kinds, self.n_colours = n_kinds + 1, n_colours + 1
        # Weight of the kind and colour cross-entropy again, averaged over the object tokens
        # only: over all tokens (background is most of them) an object's kind weighs little.
        self.object_attributes = object_attributes
        self.proj = nn.Linear(d_model, self.n_kinds + self.n_colours + 2 + 4 * N_CHARS)

    def read_out(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """feats [..., T, d] -> kind logits [..., T, K+1], colour logits [..., T, C+1], centre
        (x10) [..., T, 2] and character logits [..., T, 4, N_CHARS]."""
        out = self.proj(feats.float())
        nk, nc = self.n_kinds, self.n_colours
        chars = out[..., nk + nc + 2 :]
        return (out[..., :nk], out[..., nk : nk + nc], out[..., nk + nc : nk + nc + 2],
                chars.reshape(*chars.shape[:-1], 4, N_CHARS))  # fmt: skip

    def forward(self, feats: torch.Tensor, targets: DenseTargets) -> torch.Tensor:
        """feats [G, T, d] (global views), targets stacked [G, T]: the sum over images of each
        image's mean token loss (callers divide by the step's image count, so micro-batches and
        processes add up to the whole batch's mean)."""
        kind_logits, colour_logits, centre, char_logits = self.read_out(feats)
        loss_kind = F.cross_entropy(kind_logits.transpose(1, 2), targets.kind, reduction="none")
        loss_colour = F.cross_entropy(colour_logits.transpose(1, 2), targets.colour, reduction="none")
        on = (targets.kind > 0).float()  # [G, T]
        err = ((centre - targets.centre * COORD_SCALE) ** 2).sum(-1)  # [G, T]
        per_object = 0.5 * err
        if self.object_attributes:
            per_object = per_object + self.object_attributes * (loss_kind + loss_colour)
        per_object = per_object + F.cross_entropy(
            char_logits.permute(0, 3, 1, 2), targets.chars, reduction="none"
        ).sum(-1)  # [G, T]
        loss_object = (per_object * on).sum(1) / on.sum(1).clamp(min=1.0)  # [G]
        return (loss_kind.mean(1) + loss_colour.mean(1) + loss_object).sum()


class FeatureTap:
    """Keeps the last output of a module (the vision backbone's [C, T, d] features)."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.value = output

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("the vision backbone did not run in this forward")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------- the extra


@dataclass
class DenseConfig:
    """`[extras.dense]`: the dense image-token loss."""

    weight: float = 0.0  # of the loss beside the token loss; 0 = off (needs images whose
    # metadata lists their objects: the synthetic scenes)
    object_attributes: float = 0.0  # extra weight of the kind/colour loss on object tokens

    def __post_init__(self) -> None:
        if self.weight < 0 or self.object_attributes < 0:
            raise ValueError("extras.dense.weight and extras.dense.object_attributes must be >= 0")


def object_vocabulary(data: DataConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The kinds and colours the head classifies: the synthetic scenes' own lists, or for JSONL
    data those its images' `metadata["objects"]` name (sorted)."""
    if data.source != "jsonl":
        scene = data.synthetic().scene
        return scene.kinds, scene.colours
    from training.data.jsonl import read_jsonl

    objects = [o for r in read_jsonl(data.path, check_images=False) for o in r.metadata.get("objects", [])]
    if not objects:
        raise ValueError(f"extras.dense: no image of {data.path} lists its objects (metadata.objects)")
    return tuple(sorted({o["kind"] for o in objects})), tuple(sorted({o["colour"] for o in objects}))


class DenseLoss(ExtraLoss):
    """The head on the vision backbone's output (read by a hook), over the global views."""

    name = "dense"

    def __init__(self, head: DenseHead, tap: FeatureTap, weight: float) -> None:
        self.head, self.tap, self.weight = head, tap, weight

    def __call__(self, batch: Batch, output: Any) -> torch.Tensor | None:
        if batch.images is None:  # no image in the batch: the backbone did not run
            return None
        feats = self.tap.take()  # [C, T, d]
        targets = batch.extras.get(self.name)
        return None if targets is None else self.head(feats[targets.crops], targets)


class DenseExtra(Extra):
    """Dense targets of each image from its object list, scored by a `DenseHead`."""

    name = "dense"

    def __init__(self, config: DenseConfig, geometry: PreprocessConfig, kinds: tuple[str, ...],
                 colours: tuple[str, ...]) -> None:  # fmt: skip
        self.config, self.geometry, self.kinds, self.colours = config, geometry, kinds, colours

    def targets(self, example: Example, packed: PackedExample) -> DenseTargets | None:
        if packed.image is None:
            return None
        return dense_targets(example.metadata, *example.image.size, self.geometry, self.kinds, self.colours)

    def bind(self, model: nn.Module, device: torch.device, seed: int) -> DenseLoss:
        torch.manual_seed(seed + 7)  # the head's own draw, apart from the model's
        head = DenseHead(model.config.llm.hidden_size, len(self.kinds), len(self.colours),
                         self.config.object_attributes).to(device)  # fmt: skip
        return DenseLoss(head, FeatureTap(model.model.vision_backbone), self.config.weight)
