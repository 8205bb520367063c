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
Molmo's layout. Weight 0 (the default) turns the whole thing off.

`dense_targets(example, geometry, kinds, colours)` gives one image's targets from its
`metadata["objects"]` (or None when it has none); `DenseHead` scores a batch.

The second part is attention grounding. Even with such features, the LLM has to learn to
look, from the position that writes a coordinate, at the object the coordinate belongs to;
from the text loss alone that attention forms slowly (the gradient reaching any one image
token is spread over hundreds). `grounding_targets` finds, in each packed answer, the
characters of every coordinate and the object under that point; `GroundingLoss` is the
cross-entropy between head 0's attention (of the chosen LLM layers, over every key its query
sees) and a uniform distribution over that object's global-view tokens. Measured on the demo
shapes: without it the first character of a coordinate stays near chance for thousands of
images; with it head 0 puts about half its mass on the right object within ~300 steps.

Two refinements, off by default (`benchmarks/demo_ablation.py` measures them): `lead` also
grounds the tokens that open a point (` x`, its index, `="`), where the model decides whether
another point follows and which object it is; `DenseHead(object_attributes=w)` adds the kind
and colour loss once more, averaged over the object tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from molmo_model.config import PreprocessConfig
from molmo_model.points import parse_points
from molmo_model.preprocessing import fit_size
from training.coordinates import coordinate_numbers, single_token
from training.shapes import inside

COORD_SCALE = 10.0  # centre targets in tenths of the image: the LLM writes the tens digit
N_CHARS = 11  # classes of a coordinate's character: digits 0-9 and the decimal point


@dataclass
class DenseTargets:
    """Per global-view token: kind and colour class (0 = background; kind > 0 marks the tokens
    whose centre lies on an object), and that object's centre and coordinate characters."""

    kind: torch.Tensor  # int64 [T]
    colour: torch.Tensor  # int64 [T]
    centre: torch.Tensor  # float32 [T, 2]
    chars: torch.Tensor  # int64 [T, 4]: x's 1st, 2nd, y's 1st, 2nd character (0-9, 10 = ".")

    def to(self, device: torch.device | str) -> DenseTargets:
        return DenseTargets(*(t.to(device) for t in (self.kind, self.colour, self.centre, self.chars)))

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


def _on_box(centres: torch.Tensor, box) -> torch.Tensor:
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
        on = _on_box(centres, o["box"])
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


# ---------------------------------------------------------------- attention grounding


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
            on = _on_box(centres, box).float()
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
                raise ValueError(f"run.grounding_layers: layer {layer} does not exist ({len(blocks)} layers)")
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
