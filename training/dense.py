"""Dense supervision of the image tokens: a stand-in for a pre-trained vision tower.

Molmo starts from a pre-trained CLIP ViT, whose patch features already say what is where;
the LLM then only learns to read them. A demo trained from nothing has no such tower, and
with only the text loss its image tokens learn "where" too slowly for pointing to form in a
45-minute CPU run. When the training data knows its objects (the synthetic scenes record
every object's kind, colour and box), this module adds a small per-token loss on the image
features the LLM receives (the connector's output, global view only):

- which kind and which colour of object covers the token's centre (or background), and
- that object's centre in image coordinates (x, y as fractions of width and height, x10).

The head is a single linear layer that lives beside the model during training only: it is
saved in training checkpoints (exact resume) and never in the served model, which stays
Molmo's layout. Weight 0 (the default) turns the whole thing off.

`dense_targets(example, geometry, kinds, colours)` gives one image's targets from its
`metadata["objects"]` (or None when it has none); `DenseHead` scores a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from molmo_model.config import PreprocessConfig
from molmo_model.preprocessing import fit_size

COORD_SCALE = 10.0  # centre targets in tenths of the image: the LLM writes the tens digit


@dataclass
class DenseTargets:
    """Per global-view token: kind and colour class (0 = background) and the covering object's
    centre; `object` marks tokens whose centre lies on an object."""

    kind: torch.Tensor  # int64 [T]
    colour: torch.Tensor  # int64 [T]
    centre: torch.Tensor  # float32 [T, 2]

    def to(self, device: torch.device | str) -> DenseTargets:
        return DenseTargets(self.kind.to(device), self.colour.to(device), self.centre.to(device))

    @staticmethod
    def stack(targets: list[DenseTargets]) -> DenseTargets:
        return DenseTargets(
            torch.stack([t.kind for t in targets]),
            torch.stack([t.colour for t in targets]),
            torch.stack([t.centre for t in targets]),
        )


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
    x, y = centres[:, 0], centres[:, 1]
    for o in objects:
        if o["kind"] not in kinds or o["colour"] not in colours:
            continue
        x0, y0, x1, y1 = o["box"]
        on = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        kind[on] = kinds.index(o["kind"]) + 1
        colour[on] = colours.index(o["colour"]) + 1
        centre[on] = torch.tensor([o["centre"][0] / width, o["centre"][1] / height])
    return DenseTargets(kind, colour, centre)


class DenseHead(nn.Module):
    """Linear read-out of kind, colour and object centre from each image feature."""

    def __init__(self, d_model: int, n_kinds: int, n_colours: int):
        super().__init__()
        self.n_kinds, self.n_colours = n_kinds + 1, n_colours + 1
        self.proj = nn.Linear(d_model, self.n_kinds + self.n_colours + 2)

    def forward(self, feats: torch.Tensor, targets: DenseTargets) -> torch.Tensor:
        """feats [G, T, d] (global views), targets stacked [G, T]: the mean over images of each
        image's loss (so micro-batches and processes add up to the whole batch's value)."""
        out = self.proj(feats.float())
        nk, nc = self.n_kinds, self.n_colours
        loss_kind = F.cross_entropy(out[..., :nk].transpose(1, 2), targets.kind, reduction="none")
        loss_colour = F.cross_entropy(out[..., nk : nk + nc].transpose(1, 2), targets.colour, reduction="none")
        on = (targets.kind > 0).float()  # [G, T]
        err = ((out[..., nk + nc :] - targets.centre * COORD_SCALE) ** 2).sum(-1)  # [G, T]
        loss_centre = (err * on).sum(1) / (2 * on.sum(1)).clamp(min=1.0)  # [G]
        return (loss_kind.mean(1) + loss_colour.mean(1) + 0.5 * loss_centre).mean()


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
