"""The annotation mask of kernels/annotation_attention.py as a FlexAttention BlockMask.

FlexAttention (`torch.nn.attention.flex_attention`) compiles a flash-attention kernel around a
`mask_mod(b, h, q_idx, kv_idx) -> bool` and skips the key blocks a `BlockMask` marks empty. The
same rule as `annotation_mask` (query i sees key j iff j <= i, seg[j] != -1 and seg[j] is 0 or
seg[i]) written as a mask_mod gives an alternative to the Triton kernel with the same contract:
rows that see no key come out as zeros.

    mask = annotation_block_mask(segment_ids)                  # once per batch, shared by layers
    out = annotation_attention_flex(q, k, v, segment_ids, block_mask=mask)

On CUDA the attention runs through `torch.compile(flex_attention)` (forward and backward). On
the CPU it runs eagerly, forward only: this torch has no FlexAttention backward on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

_compiled: Callable | None = None


def annotation_mask_mod(segment_ids: torch.Tensor) -> Callable:
    """The annotation rule over `segment_ids` [B, S] as a FlexAttention mask_mod."""

    def mask_mod(b, h, q_idx, kv_idx):
        seg_q = segment_ids[b, q_idx]
        seg_k = segment_ids[b, kv_idx]
        return (kv_idx <= q_idx) & (seg_k != -1) & ((seg_k == 0) | (seg_k == seg_q))

    return mask_mod


def annotation_block_mask(segment_ids: torch.Tensor, block_size: int = 128) -> BlockMask:
    """BlockMask [B, 1, S, S] of the annotation rule, on segment_ids' device (heads share it)."""
    b, s = segment_ids.shape
    return create_block_mask(annotation_mask_mod(segment_ids), b, None, s, s,
                             device=segment_ids.device, BLOCK_SIZE=block_size)


def _eager_flex(*args, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():  # "use torch.compile": eager is meant here (the CPU forward)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex(device: torch.device) -> Callable:
    global _compiled
    if device.type != "cuda":
        return _eager_flex
    if _compiled is None:
        _compiled = torch.compile(flex_attention)
    return _compiled


def annotation_attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
    *, block_mask: BlockMask | None = None,
) -> torch.Tensor:
    """`annotation_attention` through FlexAttention; inputs as there (checked by the caller).

    block_mask: `annotation_block_mask(segment_ids)`, built here when not given."""
    if block_mask is None:
        block_mask = annotation_block_mask(segment_ids.to(torch.int32))
    return _flex(q.device)(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
