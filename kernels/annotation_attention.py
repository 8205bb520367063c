"""Masked attention for sequences that pack several annotations after one shared prefix.

A training sequence holds a shared prefix (segment 0) followed by annotations 1, 2, ... and then
padding (segment -1). Query i sees key j iff

    j <= i  and  seg[j] != -1  and  (seg[j] == 0 or seg[j] == seg[i])

so each annotation attends causally to the prefix and to itself, never to another annotation.
A query row that sees no key (padding with no prefix before it) outputs zeros, with zero
gradients, and never NaN.

Shapes: q [B, Hq, S, D]; k, v [B, Hkv, S, D] with Hq a multiple of Hkv (grouped-query attention:
query head h reads kv head h // (Hq // Hkv)); segment_ids [B, S] integers. Scale D**-0.5.

The Triton kernels are flash-attention style: tiles of queries stream over tiles of keys with an
online softmax (in base 2) and the mask is computed in-kernel from the segment ids. Tiles above
the causal diagonal are never visited. Other fully-masked tiles (another annotation's keys) are
computed and masked rather than skipped: a per-tile runtime branch around the loads stopped
Triton from pipelining them, and on an H100 (bf16, B=4, Hq=28, S=2048, 1500-token prefix, 10
annotations) the forward took 0.85 ms with the branch and 0.53 ms without, while the skippable
tiles are only ~7% of the causal ones when annotations are short next to the image prefix.
The backward pass is three kernels: delta = rowsum(dO * O), then dK/dV per kv head (looping over
the query heads of its group, so the GQA reduction needs no atomics), then dQ.

File order: Triton kernels, host launchers, autograd Function, PyTorch reference, public op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.annotation_flex import annotation_attention_flex
from kernels.dispatch import resolve_backend

_LOG2E = math.log2(math.e)


@triton.jit
def _visible(q_pos, k_pos, q_seg, k_seg, S):
    """The annotation rule on broadcastable position / segment tensors."""
    return (k_pos <= q_pos) & (q_pos < S) & (k_seg != -1) & ((k_seg == 0) | (k_seg == q_seg))


@triton.jit
def _annotation_attention_fwd_kernel(
    Q, K, V, SEG, Out, LSE,  # LSE: [B, Hq, S] fp32, log2 domain
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, sseg_b,
    Hq, S, D, qk_scale,  # qk_scale = D**-0.5 * log2(e)
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hkv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_mask = (offs_m < S)[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :], mask=q_mask,
                other=0.0)  # [M, D]
    seg_q = tl.load(SEG + b * sseg_b + offs_m, mask=offs_m < S, other=-1)  # [M]
    k_base = K + b * sk_b + hkv * sk_h
    v_base = V + b * sv_b + hkv * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, S)  # causal: no key beyond the last query of the tile
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        seg_k = tl.load(SEG + b * sseg_b + offs_n, mask=offs_n < S, other=-1)  # [N]
        vis = _visible(offs_m[:, None], offs_n[None, :], seg_q[:, None], seg_k[None, :], S)
        kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, 0.0, m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _annotation_attention_bwd_delta_kernel(
    Out, DO, DELTA,  # DELTA: [B, Hq, S] fp32
    so_b, so_h, so_s, sdo_b, sdo_h, sdo_s,
    Hq, S, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_s + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, tl.sum(o * do, axis=1), mask=offs_m < S)


@triton.jit
def _annotation_attention_bwd_dkdv_kernel(
    Q, K, V, SEG, DO, LSE, DELTA, DK, DV,  # DK, DV: contiguous [B, Hkv, S, D]
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s, sseg_b,
    Hq, Hkv, S, D, qk_scale, sm_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program owns one key tile of one kv head and sums over the GROUP query heads reading it.
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hkv = (bh % Hkv).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
    k = tl.load(K + b * sk_b + hkv * sk_h + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask,
                other=0.0)  # [N, D]
    v = tl.load(V + b * sv_b + hkv * sv_h + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask,
                other=0.0)
    seg_k = tl.load(SEG + b * sseg_b + offs_n, mask=offs_n < S, other=-1)  # [N]

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = (start_n // BLOCK_M) * BLOCK_M  # causal: queries before this key tile see none of it
    for g in range(GROUP):
        h = hkv * GROUP + g
        q_base = Q + b * sq_b + h * sq_h
        do_base = DO + b * sdo_b + h * sdo_h
        row_base = (b * Hq + h) * S  # into LSE and DELTA
        for start_m in range(lo, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            seg_q = tl.load(SEG + b * sseg_b + offs_m, mask=offs_m < S, other=-1)  # [M]
            # Transposed tiles ([N, M]) so that dK and dV come out as plain dots.
            vis_t = _visible(offs_m[None, :], offs_n[:, None], seg_q[None, :], seg_k[:, None], S)
            q_mask = (offs_m < S)[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * sq_s + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdo_s + offs_d[None, :], mask=q_mask,
                         other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < S, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < S, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [N, M]
            p_t = tl.exp2(tl.where(vis_t, qk_t, float("-inf")) - lse[None, :])
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [N, M]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    out_offs = (b * Hkv + hkv) * S * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _annotation_attention_bwd_dq_kernel(
    Q, K, V, SEG, DO, LSE, DELTA, DQ,  # DQ: contiguous [B, Hq, S, D]
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s, sseg_b,
    Hq, S, D, qk_scale, sm_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hkv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = (offs_m < S)[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_s + offs_d[None, :],
                 mask=q_mask, other=0.0)
    seg_q = tl.load(SEG + b * sseg_b + offs_m, mask=offs_m < S, other=-1)
    row_base = bh.to(tl.int64) * S
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < S, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < S, other=0.0)
    k_base = K + b * sk_b + hkv * sk_h
    v_base = V + b * sv_b + hkv * sv_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, S)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        seg_k = tl.load(SEG + b * sseg_b + offs_n, mask=offs_n < S, other=-1)
        vis = _visible(offs_m[:, None], offs_n[None, :], seg_q[:, None], seg_k[None, :], S)
        kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        p = tl.exp2(tl.where(vis, qk, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [M, N]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    out_offs = bh.to(tl.int64) * S * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DQ + out_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _tile_config(q: torch.Tensor) -> dict:
    """Per kernel (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_D and the fp32 dot precision.

    The half-precision tiles were picked on an H100 (benchmarks/kernel_ops.py shapes): the backward
    kernels hold the long side of their tile fixed (128 keys for dK/dV, 128 queries for dQ)."""
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    if not q.is_cuda:  # the interpreter: small, unequal tiles so small test shapes span several
        return dict(fwd=(16, 16, 1, 1), dkdv=(16, 32, 1, 1), dq=(32, 16, 1, 1), delta=16,
                    block_d=block_d, precision="ieee")
    if q.dtype == torch.float32:  # exact fp32 dots (no tf32) on twice the bytes: small tiles
        tiles = (32, 32, 4, 1)
        return dict(fwd=tiles, dkdv=tiles, dq=tiles, delta=32, block_d=block_d, precision="ieee")
    fwd_warps = 8 if block_d >= 128 else 4  # at D <= 64, 4 warps hold the tile unspilled
    return dict(fwd=(128, 64, fwd_warps, 3), dkdv=(32, 128, 8, 2), dq=(128, 32, 8, 2),
                delta=64, block_d=block_d, precision="tf32")


def annotation_attention_triton_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launch: (out [B, Hq, S, D], lse [B, Hq, S] fp32 in log2 units). Inputs checked."""
    b, hq, s, d = q.shape
    cfg = _tile_config(q)
    block_m, block_n, warps, stages = cfg["fwd"]
    out = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    grid = (triton.cdiv(s, block_m), b * hq)
    _annotation_attention_fwd_kernel[grid](
        q, k, v, segment_ids, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        segment_ids.stride(0),
        hq, s, d, d**-0.5 * _LOG2E,
        GROUP=hq // k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg["block_d"],
        DOT_PRECISION=cfg["precision"], num_warps=warps, num_stages=stages,
    )
    return out, lse


def annotation_attention_triton_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launches: (dq, dk, dv), contiguous, in the inputs' dtype."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    cfg = _tile_config(q)
    block_d = cfg["block_d"]
    dq = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, s, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, hkv, s, d), dtype=v.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv
    delta = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    _annotation_attention_bwd_delta_kernel[(triton.cdiv(s, cfg["delta"]), b * hq)](
        out, grad_out, delta,
        out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        hq, s, d, BLOCK_M=cfg["delta"], BLOCK_D=block_d,
    )
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1),
        grad_out.stride(2), segment_ids.stride(0),
    )
    common = dict(GROUP=hq // hkv, BLOCK_D=block_d, DOT_PRECISION=cfg["precision"])
    block_m, block_n, warps, stages = cfg["dkdv"]
    _annotation_attention_bwd_dkdv_kernel[(triton.cdiv(s, block_n), b * hkv)](
        q, k, v, segment_ids, grad_out, lse, delta, dk, dv, *strides,
        hq, hkv, s, d, d**-0.5 * _LOG2E, d**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
    )
    block_m, block_n, warps, stages = cfg["dq"]
    _annotation_attention_bwd_dq_kernel[(triton.cdiv(s, block_m), b * hq)](
        q, k, v, segment_ids, grad_out, lse, delta, dq, *strides,
        hq, s, d, d**-0.5 * _LOG2E, d**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
    )
    return dq, dk, dv


class AnnotationAttentionFunction(torch.autograd.Function):
    """Triton forward and Triton backward (dq, dk, dv); saves the inputs, output and lse."""

    @staticmethod
    def forward(ctx, q, k, v, segment_ids):
        # The kernels take any strides except along D, which must be 1.
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        segment_ids = segment_ids.to(torch.int32).contiguous()
        out, lse = annotation_attention_triton_forward(q, k, v, segment_ids)
        ctx.save_for_backward(q, k, v, segment_ids, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, segment_ids, out, lse = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv = annotation_attention_triton_backward(q, k, v, segment_ids, out, lse, grad_out)
        return dq, dk, dv, None


def annotation_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, S, S]: entry [b, i, j] is True iff query i may attend to key j (the rule above)."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, S], got shape {tuple(segment_ids.shape)}")
    s = segment_ids.shape[1]
    seg_q = segment_ids[:, :, None]  # [B, S, 1]
    seg_k = segment_ids[:, None, :]  # [B, 1, S]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return causal & (seg_k != -1) & ((seg_k == 0) | (seg_k == seg_q))


def annotation_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor
) -> torch.Tensor:
    """PyTorch SDPA with `annotation_mask`; same contract as `annotation_attention`."""
    _check_inputs(q, k, v, segment_ids)
    group = q.shape[1] // k.shape[1]
    mask = annotation_mask(segment_ids)  # [B, S, S]
    seen = mask.any(dim=-1)  # [B, S]; False for rows that see no key
    # SDPA turns an all-masked row into NaN: open such rows to every key, then zero their output,
    # which also zeroes every gradient flowing through them.
    mask = mask | ~seen[:, :, None]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], enable_gqa=group > 1
    )  # [B, Hq, S, D]
    return out.masked_fill(~seen[:, None, :, None], 0.0)


def annotation_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
    *, backend: str | None = None,
) -> torch.Tensor:
    """Causal attention in which annotation k sees the shared prefix and itself only.

    q [B, Hq, S, D], k and v [B, Hkv, S, D] (Hq a multiple of Hkv), segment_ids [B, S] ints
    (0 prefix, k > 0 annotation k, -1 padding). Returns [B, Hq, S, D] in q's dtype, scale D**-0.5.
    backend: "auto" (Triton on CUDA, the reference elsewhere and for fp32 CUDA inputs),
    "triton", "torch" or "flex" (FlexAttention, kernels/annotation_flex.py); None reads
    MOLMO_KERNELS_BACKEND (default "auto"). Differentiable in q, k and v on every path
    (FlexAttention on CUDA only).

    Why fp32 goes to the reference: on an H100 (benchmarks/RESULTS.md) the Triton fp32 tiles
    (exact dots) ran at 0.88x the reference forward and 0.32x forward+backward, so "auto" keeps
    fp32 on SDPA until a GPU run of benchmarks/kernels_frontier.py shows otherwise;
    MOLMO_KERNELS_FP32_TRITON=1 (or backend="triton") still runs the Triton fp32 tiles.
    """
    _check_inputs(q, k, v, segment_ids)
    choice = resolve_backend(backend, q, fp32_auto="torch", has_flex=True)
    if choice == "torch":
        return annotation_attention_reference(q, k, v, segment_ids)
    if choice == "flex":
        return annotation_attention_flex(q, k, v, segment_ids)
    return AnnotationAttentionFunction.apply(q, k, v, segment_ids)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, S, D], got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must be [B, Hkv, S, D], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, s, d):
        raise ValueError(f"k must be [B, Hkv, S, D] with q's B, S, D {(b, s, d)}, got {tuple(k.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k's heads ({hkv})")
    if segment_ids.shape != (b, s):
        raise ValueError(f"segment_ids must be [B, S] = {(b, s)}, got {tuple(segment_ids.shape)}")
    if segment_ids.is_floating_point() or segment_ids.is_complex() or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == segment_ids.device):
        raise ValueError(
            f"q, k, v, segment_ids must be on one device, got {q.device}, {k.device}, {v.device}, "
            f"{segment_ids.device}"
        )
