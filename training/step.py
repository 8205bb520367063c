"""One optimizer step: `train_step` -> `forward_backward_step` per micro-batch.

This rank's micro-batches (training/loader.py, a pure function of the step) -> all_reduce of
their loss-token counts -> for each micro-batch a forward/backward whose summed token loss is
divided by the average number of loss tokens per device (so every device's gradient has the
same scale and DDP's mean gives the global token mean) -> per-component gradient clipping ->
AdamW step -> LR schedule step (training/recipe.py).

The run's extra losses (training/supervision.py) add to the token loss in the same forward,
each divided by its own count of terms per device (images, queries) as the token loss is by
its tokens; their heads live outside DDP, so their gradients are averaged here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from training.distributed import Dist, all_reduce_sum, average_gradients
from training.packing import Batch
from training.recipe import clip_grad_norms
from training.supervision import ExtraLoss


def forward_backward_step(
    model: nn.Module,
    batch: Batch,
    loss_normalizer: float,
    autocast: contextlib.AbstractContextManager,
    response_dropout: float = 0.0,
    losses: Sequence[ExtraLoss] = (),
    normalizers: Sequence[float] = (),
) -> tuple[float, list[float]]:
    """Forward and backward of one micro-batch. Returns its summed token loss and each extra
    loss's sum; extra loss i enters the gradient divided by `normalizers[i]` (its terms in
    the step, per device), as the token loss does by `loss_normalizer`."""
    sums = [0.0] * len(losses)
    with autocast:
        out = model(**batch.model_inputs(), loss_normalizer=loss_normalizer,
                    response_dropout=response_dropout)  # fmt: skip
        loss = out.loss
        for i, extra in enumerate(losses):
            term = extra(batch, out)
            if term is not None:
                sums[i] = float(term.detach())
                loss = loss + extra.weight * term / normalizers[i]
    loss.backward()
    return float(out.loss.detach()) * loss_normalizer, sums


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[Batch],
    d: Dist,
    autocast: contextlib.AbstractContextManager,
    max_grad_norm: float,
    response_dropout: float = 0.0,
    losses: Sequence[ExtraLoss] = (),
) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches; returns the step's metrics."""
    # The paper's normaliser: the average number of loss tokens per device, over all devices.
    local_tokens = sum(b.n_loss_tokens for b in micro_batches)
    global_tokens = all_reduce_sum(local_tokens, d)
    normalizer = max(global_tokens / d.world_size, 1.0)
    # Each extra loss's terms over all devices, and per device.
    counts = [all_reduce_sum(sum(len(b.extras[x.name]) for b in micro_batches if x.name in b.extras), d)
              for x in losses]  # fmt: skip
    normalizers = [max(c / d.world_size, 1.0) for c in counts]
    loss_sum, sums = 0.0, [0.0] * len(losses)
    for i, batch in enumerate(micro_batches):
        batch = batch.to(d.device)
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            token_sum, extra_sums = forward_backward_step(model, batch, normalizer, autocast, response_dropout,
                                                          losses, normalizers)  # fmt: skip
        loss_sum = loss_sum + token_sum
        sums = [a + b for a, b in zip(sums, extra_sums, strict=True)]
    for extra in losses:
        if extra.head is not None:
            average_gradients(extra.head, d)
    norms = clip_grad_norms(optimizer, max_grad_norm)
    lrs = {g["component"]: g["lr"] for g in optimizer.param_groups}
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {
        "loss": all_reduce_sum(loss_sum, d) / max(global_tokens, 1.0),
        "loss_tokens": int(global_tokens),
        "images": int(all_reduce_sum(sum(b.n_images for b in micro_batches), d)),
        "annotations": int(all_reduce_sum(sum(b.n_annotations for b in micro_batches), d)),
        "tokens": int(all_reduce_sum(sum(int((b.segment_ids >= 0).sum()) for b in micro_batches), d)),
        **{f"lr_{k}": v for k, v in lrs.items()},
        **{f"grad_norm_{k}": v for k, v in norms.items()},
    }
    for extra, total, count in zip(losses, sums, counts, strict=True):
        metrics[f"{extra.name}_loss"] = all_reduce_sum(total, d) / max(count, 1.0)
    return metrics
