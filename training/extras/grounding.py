"""Attention grounding: the answers' coordinates learn to look at their objects.

Even with dense image features (dense.py), the LLM has to learn to
look, from the position that writes a coordinate, at the object the coordinate belongs to;
from the text loss alone that attention forms slowly (the gradient reaching any one image
token is spread over hundreds). `grounding_targets` finds, in each packed answer, the
characters of every coordinate and the object under that point; `GroundingLoss` is the
cross-entropy between head 0's attention (of the chosen LLM layers, over every key its query
sees) and a uniform distribution over that object's global-view tokens. Measured on the demo
shapes: without it the first character of a coordinate stays near chance for thousands of
images; with it head 0 puts about half its mass on the right object within ~300 steps.

Two refinements, off by default (`experiments/demo_ablation.py` measures them): `lead` also
grounds the tokens that open a point (` x`, its index, `="`), where the model decides whether
another point follows and which object it is; `start` grounds the answer's first token on all
of its objects at once.

`GroundingExtra` plugs it into the trainer (training/supervision.py), configured by
`[extras.grounding]` (weight, layers, lead, start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from molmo_model.config import PreprocessConfig
from molmo_model.points import parse_points
from training.coordinates import coordinate_numbers, single_token
from training.data.records import Example, inside
from training.extras.dense import FeatureTap, global_token_centres, on_box
from training.packing import Batch, PackedExample
from training.supervision import Extra, ExtraLoss


@dataclass
class Grounding:
    """Where the answers' coordinates should look: for each query position (a token whose
    label is a digit or the point of a coordinate), a distribution over the global view's
    `<im_patch>` tokens (uniform over the tokens on the object that coordinate belongs to)."""

    positions: torch.Tensor  # int64 [Q]: sequence positions of the queries
    keys: torch.Tensor  # int64 [Q, T]: sequence positions of the global view's tokens
    target: torch.Tensor  # float32 [Q, T], rows sum to 1
    rows: torch.Tensor | None = None  # int64 [Q]: batch row of each query (set by collate)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def for_row(self, row: int) -> Grounding:
        return Grounding(self.positions, self.keys, self.target, torch.full_like(self.positions, row))

    def to(self, device: torch.device | str) -> Grounding:
        rows = None if self.rows is None else self.rows.to(device)
        return Grounding(self.positions.to(device), self.keys.to(device), self.target.to(device), rows)

    @classmethod
    def batch(cls, items: list[tuple[int, int, Grounding]]) -> Grounding:
        """The rows' queries in one list, each marked with its batch row."""
        return cls.cat([g.for_row(row) for row, _, g in items])

    @staticmethod
    def cat(parts: list[Grounding]) -> Grounding:
        return Grounding(
            torch.cat([g.positions for g in parts]),
            torch.cat([g.keys for g in parts]),
            torch.cat([g.target for g in parts]),
            torch.cat([g.rows for g in parts]) if all(g.rows is not None for g in parts) else None,
        )


def grounding_targets(
    example, packed, geo: PreprocessConfig, tokenizer, im_patch_id: int, lead: bool = False,
    start: bool = False,
) -> Grounding | None:
    """Attention targets of one packed sequence (`packed.kept` maps segments to annotations).

    Coordinate n of an answer (`training.coordinates`) belongs to point n // 2 of the points
    the answer writes, in the order it writes them; every digit and dot of it targets the
    object under that point (from `metadata["objects"]`). With `lead`, so do the tokens that
    open a point (` x`, its index, `="`): the positions that decide whether there is another
    point and which object it is, before its first digit. With `start`, the position that writes
    the answer's first token targets all of the answer's objects at once (mass spread evenly over
    their tokens): where the model decides whether there is anything to point at, it learns to
    look at exactly the objects that match the question, and at none that share only a colour or
    a kind with them. The answer's `masked_points` (a deliberate wrong turn) and tokens without
    a label give no queries, nor do annotations without points (counts of 0, captions, clocks).
    """
    objects = example.metadata.get("objects")
    if objects is None or packed.kept is None or packed.image is None:
        return None
    x_tok = single_token(tokenizer, " x")
    width, height = example.image.size
    centres = global_token_centres(width, height, geo)
    keys = (packed.input_ids == im_patch_id).nonzero().flatten()[: centres.shape[0]]
    labels, ids, segments = packed.labels.tolist(), packed.input_ids.tolist(), packed.segment_ids
    positions, targets = [], []
    for segment, index in enumerate(packed.kept, start=1):
        annotation = example.annotations[index]
        if not annotation.points:
            continue
        masks, every = [], torch.zeros(centres.shape[0])
        for p in parse_points(annotation.answer, width, height):  # in writing order
            box = next((o["box"] for o in objects if inside((p.x, p.y), o["box"])), None)
            if box is None:
                masks = []
                break
            on = on_box(centres, box).float()
            masks.append(on / on.sum().clamp(min=1.0))
            every = torch.maximum(every, on)
        if not masks:
            continue
        mine = (segments == segment).nonzero().flatten().tolist()
        first = next((t for t in mine if labels[t] >= 0), None)  # writes the answer's first token
        if start and first is not None and every.sum() > 0:
            positions.append(first)
            targets.append(every / every.sum())
        # Coordinates are numbered on the tokens the positions predict (unlabelled ones too, so
        # a masked x still counts); queries go only where there is a label.
        written = [ids[t + 1] if t + 1 < len(ids) else -1 for t in mine]
        last, opening = -1, False
        for t, number in zip(mine, coordinate_numbers(written, tokenizer), strict=True):
            if number >= 0:
                last, opening = number, False
                point = number // 2
            else:
                # ` x` after the last y (or before the first x) opens point (last + 1) // 2.
                opening = opening or (lead and labels[t] == x_tok and last % 2 == 1)
                point = (last + 1) // 2 if opening else None
            if (point is not None and point < len(masks) and point not in annotation.masked_points
                    and labels[t] >= 0 and masks[point].sum() > 0):  # fmt: skip
                positions.append(t)
                targets.append(masks[point])
    if not positions:
        return None
    q = len(positions)
    return Grounding(torch.tensor(positions), keys.expand(q, -1).clone(), torch.stack(targets))


class GroundingLoss:
    """Cross-entropy between one attention head's distribution (head 0 of each of `layers`,
    over every key its query sees, RoPE applied as the model does) and the grounding targets,
    which put all the mass on the object's tokens in the global view: the head learns to look
    at the object and at nothing else. q and k come from forward hooks on those blocks'
    `att_proj`, so the model is untouched."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...]):
        from molmo_model.model import apply_rope, rope_cos_sin

        self._rope, self._cos_sin = apply_rope, rope_cos_sin
        self.cfg = model.config.llm
        self.layers = tuple(layers)
        blocks = model.model.transformer.blocks
        for layer in self.layers:
            if not -len(blocks) <= layer < len(blocks):
                raise ValueError(f"extras.grounding.layers: layer {layer} does not exist ({len(blocks)} layers)")
        self.taps = [FeatureTap(blocks[layer].att_proj) for layer in self.layers]

    def __call__(self, g: Grounding, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """The summed loss over the queries (mean over the supervised layers). position_ids and
        segment_ids [B, S] are the batch's (packed layout: segment 0 is the shared prefix)."""
        hd, h = self.cfg.head_dim, self.cfg.num_attention_heads
        cos, sin = self._cos_sin(position_ids, hd, self.cfg.rope_theta, torch.float32)  # [B, 1, S, D]
        total = 0.0
        for tap in self.taps:
            qkv = tap.take()  # [B, S, (H + 2 KV) * D]
            q = self._rope(qkv[:, None, :, :hd].float(), cos, sin)  # [B, 1, S, D]
            k = self._rope(qkv[:, None, :, h * hd : h * hd + hd].float(), cos, sin)
            layer_loss = 0.0
            for row in g.rows.unique().tolist():  # row by row: [Q_b, S] scores, a fixed order
                mine = g.rows == row
                pos = g.positions[mine]  # [Q_b]
                scores = q[row, 0, pos] @ k[row, 0].T / hd**0.5  # [Q_b, S]
                seg = segment_ids[row]
                key = torch.arange(seg.shape[0], device=seg.device)
                # What each query sees (the packing rule): the prefix, and its own annotation
                # up to itself.
                visible = (seg[None] == 0) | ((seg[None] == seg[pos][:, None]) & (key[None] <= pos[:, None]))
                logp = scores.masked_fill(~visible, float("-inf")).log_softmax(-1)
                picked = logp.gather(1, g.keys[mine])  # [Q_b, T]
                layer_loss = layer_loss - (g.target[mine] * picked).sum()
            total = total + layer_loss
        return total / len(self.taps)

    def clear(self) -> None:
        for tap in self.taps:
            tap.value = None


# ---------------------------------------------------------------- the extra


@dataclass
class GroundingConfig:
    """`[extras.grounding]`: attention grounding of the answers' coordinates."""

    weight: float = 0.0  # of the loss beside the token loss; 0 = off
    layers: tuple[int, ...] = (-1,)  # LLM layers whose head 0 it supervises
    lead: bool = False  # also ground the tokens that open a point (` x`, index, `="`)
    start: bool = False  # and the answer's first token on all of the answer's objects

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"extras.grounding.weight must be >= 0, got {self.weight}")
        self.layers = tuple(int(i) for i in self.layers)
        if self.weight and not self.layers:
            raise ValueError("extras.grounding.layers: name at least one layer")


class GroundingExtraLoss(ExtraLoss):
    """`GroundingLoss` on a batch's grounding targets; its hooks are cleared every forward."""

    name = "grounding"

    def __init__(self, loss: GroundingLoss, weight: float) -> None:
        self.loss, self.weight = loss, weight

    def __call__(self, batch: Batch, output: Any) -> torch.Tensor | None:
        targets = batch.extras.get(self.name)
        term = None if targets is None else self.loss(targets, batch.position_ids, batch.segment_ids)
        self.loss.clear()
        return term


class GroundingExtra(Extra):
    """Grounding targets of each packed answer, scored on the LLM's attention."""

    name = "grounding"

    def __init__(self, config: GroundingConfig, geometry: PreprocessConfig, tokenizer) -> None:
        self.config, self.geometry, self.tokenizer = config, geometry, tokenizer

    def targets(self, example: Example, packed: PackedExample) -> Grounding | None:
        c = self.config
        return grounding_targets(example, packed, self.geometry, self.tokenizer, self.tokenizer.im_patch_id,
                                 c.lead, c.start)  # fmt: skip

    def bind(self, model: nn.Module, device: torch.device, seed: int) -> GroundingExtraLoss:
        return GroundingExtraLoss(GroundingLoss(model, self.config.layers), self.config.weight)
