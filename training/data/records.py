"""The record every training dataset yields: one image with all of its annotations.

An `Example` is one image plus a list of `Annotation`s (question/answer chats about that
image). Multi-annotation training packs all of them into one sequence after the image, so
datasets hand out whole images, never single QA pairs. Both the synthetic generators
(`training/data/synthetic/`) and the JSONL loader (`training/data/jsonl.py`) produce these,
so the trainer and the evaluation see one type.

Objects an image's metadata lists (`metadata["objects"]`: kind, colour, `box` and centre in
pixels) are hit by a point as `inside` says; scoring and the grounding targets share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from molmo_model.points import inside  # noqa: F401  (the one definition; re-exported)

ROLES = ("user", "assistant")


@dataclass
class Annotation:
    """One chat about the image; the assistant turns are the training targets."""

    messages: list[
        dict[str, str]
    ]  # [{"role": "user"|"assistant", "content": str}, ...], alternating
    points: list[tuple[float, float]] | None = None  # target points (x, y) in pixels, if any
    label: str | None = None  # what the points point at ("red circles")
    task: str | None = None  # free-form tag: "point", "count", "caption", "clock", ...
    info: dict[str, Any] = field(default_factory=dict)  # JSON-safe facts for evaluation
    # Points (0-based, in the order the answer writes them) whose x carries no loss: a
    # training augmentation's deliberate wrong turn (training/extras/recovery.py).
    masked_points: tuple[int, ...] = ()

    @property
    def question(self) -> str:
        """The first user turn."""
        return self.messages[0]["content"]

    @property
    def answer(self) -> str:
        """The last assistant turn."""
        return self.messages[-1]["content"]

    def to_dict(self) -> dict[str, Any]:
        """This annotation as one entry of a JSONL line's "annotations" list."""
        d: dict[str, Any] = {"messages": [dict(m) for m in self.messages]}
        if self.points is not None:
            d["points"] = [[x, y] for x, y in self.points]
        if self.label is not None:
            d["label"] = self.label
        if self.task is not None:
            d["task"] = self.task
        if self.info:
            d["info"] = self.info
        return d


@dataclass
class Example:
    """One image and every annotation of it."""

    image: Image.Image  # RGB
    annotations: list[Annotation]
    metadata: dict[str, Any] = field(
        default_factory=dict
    )  # JSON-safe (objects, clock geometry, ...)


