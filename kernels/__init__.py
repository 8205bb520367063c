"""Triton kernels with a PyTorch reference beside each; they know tensor shapes, not models.

- `attention_pool(q [N, H, D], k [N, K, H, D], v [N, K, H, D]) -> [N, H, D]`: one query per
  window attends over the window's K members (kernels/attention_pool.py).
- `annotation_attention(q [B, Hq, S, D], k, v [B, Hkv, S, D], segment_ids [B, S])`: causal
  attention where each packed annotation sees the shared prefix and itself only
  (kernels/annotation_attention.py), with `annotation_mask(segment_ids) -> bool [B, S, S]`.

Each op runs its Triton kernel on CUDA tensors and its reference elsewhere (annotation_attention
also keeps fp32 CUDA inputs on its reference, the faster there); `backend=` or the
MOLMO_KERNELS_BACKEND environment variable ("auto", "triton", "torch", "flex") forces one
(kernels/dispatch.py). annotation_attention's "flex" path is FlexAttention with the same mask
(kernels/annotation_flex.py).
"""

from kernels.annotation_attention import (
    annotation_attention,
    annotation_attention_reference,
    annotation_mask,
)
from kernels.attention_pool import attention_pool, attention_pool_reference

__all__ = [
    "annotation_attention",
    "annotation_attention_reference",
    "annotation_mask",
    "attention_pool",
    "attention_pool_reference",
]
