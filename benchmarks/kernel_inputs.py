"""Inputs and a baseline of benchmarks/kernels_frontier.py: packed segment ids as training packs
them, the mask's work counts, and annotation attention through flash-attention's varlen kernel.

Nothing here imports `kernels` at module level: the frontier script must choose Triton's
interpreter (`--device cpu`) before the first import of the kernel modules.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

MASK_BLOCK = 128  # the block of the TFLOP/s count and of the BlockMask


def packed_annotations(b: int, s: int, prefix: int, seed: int, *, lead: int = 0,
                       padding: bool = True) -> torch.Tensor:
    """[B, S] int32 ids as training packs a batch: `lead` padding tokens (row 0 only), the image
    prefix (0), 4-16 annotations (1, 2, ...) of random lengths, then 0-5% padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(b):
        head = lead if i == 0 else 0
        tail = int(torch.randint(0, s // 20 + 1, (), generator=gen)) if padding else 0
        body = s - head - prefix - tail
        n = min(body, int(torch.randint(4, 17, (), generator=gen)))
        weights = torch.rand(n, generator=gen) + 0.25
        lengths = (weights / weights.sum() * body).long().clamp_min(1)  # [n]
        lengths[-1] = body - lengths[:-1].sum()
        assert lengths.min() >= 1, "annotations too many for the room left"
        ids = torch.repeat_interleave(torch.arange(1, n + 1), lengths)
        rows.append(torch.cat([torch.full((head,), -1), torch.zeros(prefix, dtype=torch.long),
                               ids, torch.full((tail,), -1)]))
    return torch.stack(rows).to(torch.int32)


def mask_stats(seg: torch.Tensor) -> dict:
    """Per head: (query, key) pairs the mask keeps, and pairs in the 128x128 blocks it does not
    empty (the TFLOP/s numerator)."""
    from kernels.annotation_attention import annotation_mask

    b, s = seg.shape
    blocks = -(-s // MASK_BLOCK)
    mask = annotation_mask(seg)  # [B, S, S]
    padded = torch.zeros(b, blocks * MASK_BLOCK, blocks * MASK_BLOCK, dtype=torch.bool,
                         device=seg.device)
    padded[:, :s, :s] = mask
    tiles = padded.view(b, blocks, MASK_BLOCK, blocks, MASK_BLOCK).any(dim=(2, 4))
    return dict(visible_pairs=int(mask.sum()),
                block_pairs=int(tiles.sum()) * MASK_BLOCK * MASK_BLOCK)


# ------------------------------------------------------------ flash-attention varlen baseline

def flash_varlen_fn(seg: torch.Tensor) -> tuple[Callable | None, str]:
    """(fn(q, k, v) -> [B, Hq, S, D] with the annotation rule, or None; why None)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        return None, f"flash_attn not installed ({err})"
    b, s = seg.shape
    q_rows, kv_rows, cu_q, cu_k = [], [], [0], [0]
    for i, row in enumerate(seg.tolist()):
        prefix = [i * s + j for j, x in enumerate(row) if x == 0]
        if not prefix:
            return None, "a row has no prefix"
        bounds = [j for j in range(s) if j == 0 or row[j] != row[j - 1]] + [s]
        for lo, hi in pairwise(bounds):  # contiguous runs of one segment
            if row[lo] < 0:
                continue  # padding queries: not computed
            if row[lo] == 0 and (lo, hi) != (prefix[0] - i * s, prefix[-1] - i * s + 1):
                return None, "the prefix is not one contiguous run"
            q_rows += range(i * s + lo, i * s + hi)
            kv_rows += prefix + ([] if row[lo] == 0 else list(range(i * s + lo, i * s + hi)))
            cu_q.append(len(q_rows))
            cu_k.append(len(kv_rows))
    dev = seg.device
    q_idx, kv_idx = torch.tensor(q_rows, device=dev), torch.tensor(kv_rows, device=dev)
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=dev)
    cu_k_t = torch.tensor(cu_k, dtype=torch.int32, device=dev)
    max_q = max(hi - lo for lo, hi in pairwise(cu_q))
    max_k = max(hi - lo for lo, hi in pairwise(cu_k))

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        hq, d, hkv = q.shape[1], q.shape[3], k.shape[1]
        qt = q.transpose(1, 2).reshape(b * s, hq, d)[q_idx]  # [T, Hq, D]
        kt = k.transpose(1, 2).reshape(b * s, hkv, d)[kv_idx]  # [Tk, Hkv, D]
        vt = v.transpose(1, 2).reshape(b * s, hkv, d)[kv_idx]
        out = flash_attn_varlen_func(qt, kt, vt, cu_q_t, cu_k_t, max_q, max_k, causal=True)
        full = q.new_zeros(b * s, hq, d).index_copy(0, q_idx, out)  # [B*S, Hq, D]
        return full.view(b, s, hq, d).transpose(1, 2)

    return fn, ""
