"""The one interface through which optional supervision plugs into the trainer.

The trainer itself knows only the token loss. An `Extra` adds to it in two places:

- in the loader (training/loader.py, maybe in DataLoader worker processes): `prepare` may
  rewrite an example before it is packed, and `targets` computes a packed sequence's targets
  from the example and its tokens; they travel in `PackedExample.extras[name]` and, joined by
  the targets' own `batch`, in `Batch.extras[name]` (training/packing.py `Targets`);
- in the step (training/step.py): `bind(model)` gives the `ExtraLoss` that turns a batch into
  a summed loss. The step adds `weight * loss / count` to the token loss, where count is the
  step's targets (`len`) per device, logs it as `{name}_loss`, trains the loss's `head` (if
  any) in its own optimizer group `name` and saves it in training checkpoints as
  `{name}_head`, never in the served model.

The demo's extras (dense image-token loss, attention grounding, order recovery) live in
training/extras/ with their config section `[extras]`; `ExtrasConfig.build` makes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.data.records import Example
from training.packing import Batch, PackedExample, Targets


class ExtraLoss:
    """The training-side half of an extra, bound to one model (hooks, a head)."""

    name: str = ""
    weight: float = 0.0
    head: nn.Module | None = None  # trainable parameters outside the model, if any

    def __call__(self, batch: Batch, output: Any) -> torch.Tensor | None:
        """The loss summed over the batch's terms, or None when the batch has no targets.
        Called after every forward, with or without targets, so hooks can drop what they read."""
        raise NotImplementedError


class Extra:
    """An optional supervision: per-sequence targets from the loader, a loss per batch.
    Each method's default does nothing, so an extra overrides only what it uses. Instances
    are handed to loader workers, so they hold no model state: that is `bind`'s."""

    name: str = ""

    def prepare(self, example: Example, seed: int, position: int) -> Example:
        """The example to pack at stream `position` (a pure function of it and `seed`)."""
        return example

    def targets(self, example: Example, packed: PackedExample) -> Targets | None:
        """The targets of one packed sequence of `example`, or None when it has none."""
        return None

    def bind(self, model: nn.Module, device: torch.device, seed: int) -> ExtraLoss | None:
        """The loss on `model`'s outputs (on `device`, a head drawn from `seed`), if any."""
        return None
