"""Multi-annotation packing: every annotation of an image in one sequence after the image.

Molmo trains on all QA pairs of an image at once (paper, "multi-annotated images"): the
image is encoded once, its tokens form a shared prefix, and the annotations follow it::

    [BOS, image tokens...] [ User: q1 Assistant: a1<eos>] [ User: q2 Assistant: a2<eos>] [pad...]
    segment 0              segment 1                      segment 2                      -1
    positions 0..P-1       P, P+1, ...                    P, P+1, ...                    0

Tokens of annotation k see (causally) the prefix and annotation k, never another annotation
(`kernels.annotation_attention` applies that rule from the segment ids), and their position
ids restart at P, so each annotation is computed exactly as if it were alone after the image.
Labels are already shifted (labels[t] is the token predicted at position t) and are set only
where the next token is an assistant answer token or the annotation's closing EOS.

`pack_example` builds one sequence (whole annotations that do not fit in `max_len` are
dropped; the first one is always kept, truncated if need be). `split_annotations` gives the
one-annotation-per-sequence baseline. `collate` right-pads several packed sequences into a
batch and concatenates their crops, offsetting `patch_order` as
`molmo_model.generate.stack_image_inputs` does.

Optional supervision (training/supervision.py) rides along in `extras`: a sequence's targets
under the extra's name, joined into the batch's by the targets' own `batch` (`Targets`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from molmo_model.preprocessing import ImageInputs, MolmoPreprocessor, prompt_text
from training.coordinates import coordinate_numbers
from training.data.records import Annotation, Example

IGNORE = -100  # label value with no loss (torch cross_entropy's ignore_index)
PAD_SEGMENT = -1


class Targets(Protocol):
    """An extra's targets: one sequence's, or a batch's once `batch` has joined them."""

    def __len__(self) -> int:
        """The terms its loss sums (images, queries): what the step divides that loss by."""
        ...

    def to(self, device: torch.device | str) -> Targets: ...

    @classmethod
    def batch(cls, items: list[tuple[int, int, Targets]]) -> Targets:
        """Joins (batch row, index of that row's first crop in the batch's images, targets)."""
        ...


@dataclass
class PackedExample:
    """One training sequence: an image and the annotations packed after it."""

    input_ids: torch.Tensor  # int64 [S]
    labels: torch.Tensor  # int64 [S], IGNORE where there is no target
    position_ids: torch.Tensor  # int64 [S]
    segment_ids: torch.Tensor  # int64 [S]: 0 prefix, k annotation k
    response_mask: torch.Tensor  # bool [S]: the token is part of an assistant answer
    image: ImageInputs | None  # None for a text-only example
    n_annotations: int  # annotations packed (whole or truncated)
    n_dropped: int = 0  # annotations that did not fit in max_len
    kept: list[int] | None = None  # segment k + 1 holds the example's annotations[kept[k]]
    extras: dict[str, Targets] = field(default_factory=dict)  # an extra's name -> its targets

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class Batch:
    """Several packed sequences, right-padded, with all their crops concatenated."""

    input_ids: torch.Tensor  # int64 [B, S]
    labels: torch.Tensor  # int64 [B, S]
    position_ids: torch.Tensor  # int64 [B, S]
    segment_ids: torch.Tensor  # int64 [B, S], -1 on padding
    response_mask: torch.Tensor  # bool [B, S]
    images: torch.Tensor | None  # float32 [C, 576, 588]: crops of every example, in batch order
    image_masks: torch.Tensor | None  # float32 [C, 576]
    patch_order: torch.Tensor | None  # int64 [M]: indexes the batch's pooled features [C * T]
    n_images: int
    n_annotations: int
    extras: dict[str, Targets] = field(default_factory=dict)  # an extra's name -> the rows' targets

    @property
    def n_loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            move(self.input_ids), move(self.labels), move(self.position_ids),
            move(self.segment_ids), move(self.response_mask), move(self.images),
            move(self.image_masks), move(self.patch_order), self.n_images, self.n_annotations,
            {name: t.to(device) for name, t in self.extras.items()},
        )  # fmt: skip

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of `MolmoForCausalLM.forward` (labels included)."""
        return {
            "input_ids": self.input_ids,
            "images": self.images,
            "image_masks": self.image_masks,
            "patch_order": self.patch_order,
            "position_ids": self.position_ids,
            "segment_ids": self.segment_ids,
            "labels": self.labels,
            "response_mask": self.response_mask,
        }


def annotation_tokens(annotation: Annotation, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of one annotation (" User: q Assistant: a ... <eos>") and, per token, whether
    it is an answer token (the assistant turns and the final EOS).

    User turns and answers are tokenized separately, the way inference sees them: the prompt
    ends at " Assistant:" and the model then writes " a". Only the last answer is followed by
    EOS, matching Molmo's multi-turn prompt (" ... Assistant: a1 User: q2 Assistant:").
    The x coordinates of the last answer's `masked_points` are not answer tokens: no loss.
    """
    ids: list[int] = []
    is_answer: list[bool] = []
    for i, message in enumerate(annotation.messages):
        role, content = message["role"], message["content"]
        if role == "user":
            piece = tokenizer.encode(prompt_text([{"role": "user", "content": content}]))
            answer = False
        elif role == "assistant":
            piece = tokenizer.encode(" " + content.strip())  # as prompt_text writes earlier turns
            answer = True
        else:
            raise ValueError(f"messages[{i}].role must be 'user' or 'assistant', got {role!r}")
        ids.extend(piece)
        is_answer.extend([answer] * len(piece))
    if not any(is_answer):
        raise ValueError("annotation has no assistant turn to train on")
    if annotation.masked_points:
        masked = {2 * k for k in annotation.masked_points}  # point k's x is coordinate 2k
        start = len(ids) - len(piece)  # the last answer's tokens
        for j, number in enumerate(coordinate_numbers(piece, tokenizer), start=start):
            if number in masked:
                is_answer[j] = False
    ids.append(tokenizer.eos_id)
    is_answer.append(True)
    return ids, is_answer


def pack_tokens(
    prefix: list[int],
    annotations: list[tuple[list[int], list[bool]]],
    max_len: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[int], int]:
    """Lay out a prefix and tokenized annotations (see the module docstring).

    Returns the tensors (input_ids, labels, position_ids, segment_ids, response_mask), the
    indices of the annotations kept (segment k + 1 holds annotations[kept[k]]) and the number
    dropped. Annotations that do not fit whole in
    `max_len` are dropped; the first is always kept, cut to fit if need be.
    """
    p = len(prefix)
    if not annotations:
        raise ValueError("annotations: at least one annotation is needed")
    if max_len is not None and max_len < p + 2:
        raise ValueError(f"max_len={max_len} leaves no room after the {p}-token image prefix")
    ids, labels, positions, segments, answer = (
        list(prefix),
        [IGNORE] * p,
        list(range(p)),
        [0] * p,
        [False] * p,
    )
    kept: list[int] = []
    for index, (tokens, is_answer) in enumerate(annotations):
        room = (max_len - len(ids)) if max_len is not None else len(tokens)
        if len(tokens) > room:
            if kept:
                continue  # a later, shorter annotation may still fit
            tokens, is_answer = tokens[:room], is_answer[:room]
        n = len(tokens)
        ids.extend(tokens)
        # labels[t] = the token at t + 1 when that is an answer token of this annotation; the
        # last token of the prefix or of the previous annotation predicts nothing.
        labels.extend(tokens[j + 1] if j + 1 < n and is_answer[j + 1] else IGNORE for j in range(n))
        positions.extend(range(p, p + n))
        segments.extend([len(kept) + 1] * n)
        answer.extend(is_answer)
        kept.append(index)
    dropped = len(annotations) - len(kept)
    tensors = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "segment_ids": torch.tensor(segments, dtype=torch.long),
        "response_mask": torch.tensor(answer, dtype=torch.bool),
    }
    return tensors, kept, dropped


def pack_example(
    example: Example,
    preprocessor: MolmoPreprocessor,
    max_len: int | None = None,
    image: ImageInputs | None = None,
) -> PackedExample:
    """All annotations of `example` in one sequence after its image (`image` reuses an
    already preprocessed copy)."""
    tok = preprocessor.tokenizer
    if image is None:
        image = preprocessor.preprocess(example.image)
    prefix = [tok.bos_id, *image.tokens]
    annotations = [annotation_tokens(a, tok) for a in example.annotations]
    tensors, kept, dropped = pack_tokens(prefix, annotations, max_len)
    return PackedExample(image=image, n_annotations=len(kept), n_dropped=dropped, kept=kept, **tensors)


def split_annotations(example: Example) -> list[Example]:
    """The baseline without packing: one example per annotation (the image repeated)."""
    return [Example(example.image, [a], example.metadata) for a in example.annotations]


def collate(examples: list[PackedExample], pad_id: int, tokens_per_crop: int) -> Batch:
    """Right-pad packed sequences to the longest and concatenate their crops in batch order.

    `patch_order` of example b is offset by the pooled features of the crops before it, so it
    indexes the batch's features flattened as [C * tokens_per_crop]; the model adds them to
    the `<im_patch>` tokens in row-major order over [B, S], which is this order.
    """
    if not examples:
        raise ValueError("examples: an empty batch")
    b, s = len(examples), max(e.length for e in examples)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    labels = torch.full((b, s), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((b, s), dtype=torch.long)
    segment_ids = torch.full((b, s), PAD_SEGMENT, dtype=torch.long)
    response_mask = torch.zeros((b, s), dtype=torch.bool)
    images, masks, orders, offset = [], [], [], 0
    extras: dict[str, list[tuple[int, int, Targets]]] = {}
    n_crops = 0  # crops of the rows before this one
    for i, e in enumerate(examples):
        for name, targets in e.extras.items():
            extras.setdefault(name, []).append((i, n_crops, targets))
        n = e.length
        input_ids[i, :n] = e.input_ids
        labels[i, :n] = e.labels
        position_ids[i, :n] = e.position_ids
        segment_ids[i, :n] = e.segment_ids
        response_mask[i, :n] = e.response_mask
        if e.image is not None:
            n_crops += e.image.n_crops
            images.append(e.image.images)
            masks.append(e.image.image_masks)
            orders.append(e.image.patch_order + offset)
            offset += e.image.images.shape[0] * tokens_per_crop
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        segment_ids=segment_ids,
        response_mask=response_mask,
        images=torch.cat(images) if images else None,
        image_masks=torch.cat(masks) if masks else None,
        patch_order=torch.cat(orders) if orders else None,
        n_images=len(images),
        n_annotations=sum(e.n_annotations for e in examples),
        extras={name: type(items[0][2]).batch(items) for name, items in extras.items()},
    )
