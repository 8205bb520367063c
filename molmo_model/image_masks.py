"""The image-mask rule: which padding mask each crop carries, and how the vision backbone
reads it. A checkpoint names its rule in `PreprocessConfig.image_mask_rule` (config.json's
`image_mask_rule`); the preprocessor (through `crop_masks`) and the vision backbone
(through `padding_flags`) both follow that one field, so training, the reference
generator and the vLLM plugin agree with the checkpoint.

Both rules start from the per-crop masks the preprocessor measures: for every crop (global
view first) the fraction of each patch's pixels that are image, not padding.

* "ai2": the rule Ai2's released checkpoints were trained with (their training
  preprocessor and released HF processor): the mask rows are shifted by one crop — the
  global view carries the first high-res crop's mask, each crop the next one's, and the
  last crop all -1. The backbone (Ai2's `pad_and_partial_pad`) adds pad_embed[0] where the
  mask is 0 and pad_embed[1] where it is < 1 and not 0, so -1 counts as partial padding.
  A config.json without the field (every Ai2 release) gets this rule.
* "per_crop": each crop carries its own mask; pad_embed[0] where a patch is all padding,
  pad_embed[1] where it is partly padding (0 < mask < 1).

New trainings use Ai2's rule (the default of every preset but `demo`), so that a model we
train serves the same under Ai2's code and other Molmo servers, and a fine-tune of a release
keeps the rule the release learned. The committed demo model was trained with "per_crop"
and says so in its config.json; the `demo` preset keeps that rule so its recipe reproduces
it. Fidelity to Ai2's code: tests/test_ai2_golden.py.
"""

from __future__ import annotations

import torch

from molmo_model.config import AI2_MASK_RULE, IMAGE_MASK_RULES, PER_CROP_MASK_RULE


def crop_masks(masks: torch.Tensor, rule: str) -> torch.Tensor:
    """The image_masks rows a model with `rule` takes, from the per-crop masks
    [n_crops, N] (global view first) of one image."""
    if rule == AI2_MASK_RULE:
        return torch.cat([masks[1:], torch.full_like(masks[:1], -1.0)])  # [n_crops, N]
    if rule == PER_CROP_MASK_RULE:
        return masks
    raise ValueError(f"image_mask_rule must be one of {IMAGE_MASK_RULES}, got {rule!r}")


def padding_flags(masks: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(all_pad, partial_pad): bool tensors shaped like `masks`, where pad_embed[0] and
    pad_embed[1] are added."""
    all_pad = masks == 0
    if rule == AI2_MASK_RULE:
        return all_pad, (masks < 1) & ~all_pad  # -1 (Ai2's last crop) is partial padding
    if rule == PER_CROP_MASK_RULE:
        return all_pad, (masks > 0) & (masks < 1)
    raise ValueError(f"image_mask_rule must be one of {IMAGE_MASK_RULES}, got {rule!r}")
