"""Molmo in PyTorch: the vision backbone (molmo_model/vision.py) feeding a Qwen2-style decoder.

Module names follow Ai2's checkpoints, so `MolmoForCausalLM().state_dict()` keys are exactly
the weight names of a Molmo release (`model.transformer.blocks.0.att_proj.weight`, ...).

Image features are ADDED to the embeddings of the `<im_patch>` tokens, as in Ai2's code.
`forward` serves training (logits + loss, optional multi-annotation segment ids) and the
reference generator (KV cache); see molmo_model/generate.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import annotation_attention
from molmo_model.config import LLMConfig, MolmoConfig
from molmo_model.vision import MolmoVisionBackbone, add_image_features


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.to(dtype)) * self.weight.to(dtype)


class MolmoEmbedding(nn.Module):
    """The text vocabulary (`embedding`) plus the extra rows for image tokens (`new_embedding`)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(cfg.embedding_size, cfg.hidden_size) * 0.02)
        self.new_embedding = nn.Parameter(
            torch.randn(cfg.additional_vocab_size, cfg.hidden_size) * 0.02
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Two lookups and a select, rather than concatenating the tables on every call.
        n = self.embedding.shape[0]
        base = F.embedding(ids.clamp(max=n - 1), self.embedding)  # [B, S, d]
        extra = F.embedding((ids - n).clamp(min=0), self.new_embedding)  # [B, S, d]
        return torch.where((ids >= n)[..., None], extra, base)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> cos, sin [B, 1, S, head_dim] (NeoX / Qwen2 half-rotation layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Per-layer keys and values, each [B, Hkv, T, D]."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    length: int = 0  # tokens cached before the current forward; advanced after it

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([None] * n_layers, [None] * n_layers)


class CausalSelfAttention:
    """The decoder's attention, shared by Molmo's block (projections on the block itself) and
    Molmo 2's `self_attn` module: a fused QKV projection `att_proj`, RoPE, GQA, a causal mask
    (or annotation segments, or a KV cache), `attn_out`. A host module sets `att_proj`,
    `attn_out`, `n_heads`, `n_kv`, `head_dim`; `normalize_qk` is where Qwen3 / OLMo norm
    queries and keys (Molmo has none)."""

    att_proj: nn.Linear
    attn_out: nn.Linear
    n_heads: int
    n_kv: int
    head_dim: int

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, S, H*D], k [B, S, Hkv*D] before RoPE."""
        return q, k

    def attention(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segment_ids: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attn_mask: an explicit bool mask [B, 1, S, T] (True = may attend) replacing the
        causal one, T counting the cached tokens; Molmo 2's bidirectional image prefill."""
        b, s, _ = x.shape  # [B, S, d]
        h, kv, hd = self.n_heads, self.n_kv, self.head_dim
        qkv = self.att_proj(x)
        q, k, v = qkv.split([h * hd, kv * hd, kv * hd], dim=-1)
        q, k = self.normalize_qk(q, k)
        q = q.view(b, s, h, hd).transpose(1, 2)  # [B, H, S, D]
        k = k.view(b, s, kv, hd).transpose(1, 2)  # [B, Hkv, S, D]
        v = v.view(b, s, kv, hd).transpose(1, 2)
        # cos/sin follow the residual stream's dtype (fp32 under autocast): keep q, k in v's.
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if segment_ids is not None:
            out = annotation_attention(q, k, v, segment_ids)
        elif cache is not None:
            past = cache.length
            if past:
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
            # New queries see everything cached plus the new keys up to themselves.
            t = k.shape[2]
            mask = attn_mask
            if mask is None:
                mask = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h != kv)
        elif attn_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=h != kv)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != kv)
        return self.attn_out(out.transpose(1, 2).reshape(b, s, h * hd))


def gated_mlp(ff_proj: nn.Linear, ff_out: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Molmo's fused SwiGLU (both families): ff_proj's output halves are (x, gate) and the
    activation is x * silu(gate)."""
    up, gate = ff_proj(x).chunk(2, dim=-1)
    return ff_out(up * F.silu(gate))


class MolmoBlock(CausalSelfAttention, nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        d = cfg.hidden_size
        self.att_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=cfg.qkv_bias)
        self.attn_out = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.attn_norm = RMSNorm(d, cfg.layer_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.layer_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin, segment_ids=None, cache=None, layer=0, dropout=None):
        drop = dropout if dropout is not None else (lambda t: t)
        x = x + drop(self.attention(self.attn_norm(x), cos, sin, segment_ids, cache, layer))
        return x + drop(gated_mlp(self.ff_proj, self.ff_out, self.ff_norm(x)))


class MolmoTransformer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.wte = MolmoEmbedding(cfg)
        self.blocks = nn.ModuleList(MolmoBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.ff_out = nn.Linear(cfg.hidden_size, cfg.embedding_size, bias=False)


class MolmoModel(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.transformer = MolmoTransformer(config.llm)
        self.vision_backbone = MolmoVisionBackbone(config)


@dataclass
class MolmoOutput:
    logits: torch.Tensor  # [B, S, embedding_size]
    loss: torch.Tensor | None = None  # summed token loss / loss_normalizer
    num_loss_tokens: int = 0


class MolmoForCausalLM(nn.Module):
    def __init__(self, config: MolmoConfig, im_patch_id: int | None = None):
        super().__init__()
        self.config = config
        self.model = MolmoModel(config)
        # The <im_patch> id is a property of the tokenizer; by Molmo's layout it is the 3rd extra row.
        self.im_patch_id = (
            im_patch_id if im_patch_id is not None else config.llm.embedding_size + 2
        )
        # Training only: recompute each decoder block's activations during backward instead of
        # keeping them (the same gradients; less memory, one more forward of the decoder).
        self.grad_checkpointing = False

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> MolmoForCausalLM:
        """Random weights for fresh models: normal(std) matrices, zero biases, unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("pad_embed"):
                    p.zero_()
                elif p.ndim == 1 and ("norm" in name or "ln" in name):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def embed(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        patch_order: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features added at the `<im_patch>` positions.

        images [C, N, P] / image_masks [C, N]: all crops of the batch, concatenated;
        patch_order [M]: for each `<im_patch>` token of input_ids (row-major over the batch),
        the index of its feature in the crops' pooled features flattened as [C * T].
        """
        x = self.model.transformer.wte(input_ids)  # [B, S, d]
        if images is None:
            return x
        feats = self.model.vision_backbone(images, image_masks)  # [C, T, d]
        feats = feats.flatten(0, 1)[patch_order]  # [M, d]
        return add_image_features(x, input_ids == self.im_patch_id, feats)

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        patch_order: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_normalizer: float | None = None,
        cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        response_dropout: float = 0.0,
        response_mask: torch.Tensor | None = None,
    ) -> MolmoOutput:
        """input_ids [B, S]; labels [B, S] with -100 where no loss (already shifted: labels[t]
        is the target predicted at position t). Returns logits and the summed loss divided by
        `loss_normalizer` (the mean number of loss tokens per device) or by the local count."""
        cfg = self.config.llm
        x = inputs_embeds if inputs_embeds is not None else self.embed(
            input_ids, images, image_masks, patch_order
        )
        b, s, _ = x.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + s, device=x.device).expand(b, s)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        dropout = None
        if response_dropout > 0 and self.training and response_mask is not None:
            # Residual dropout on response (text) tokens only, as in the paper's pre-training.
            def dropout(t: torch.Tensor) -> torch.Tensor:
                dropped = F.dropout(t, response_dropout, training=True)
                return torch.where(response_mask[..., None], dropped, t)

        tr = self.model.transformer
        recompute = self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(tr.blocks):
            if recompute:  # RNG state is replayed, so dropout masks are the same in the recompute
                x = checkpoint(block, x, cos, sin, segment_ids, None, i, dropout, use_reentrant=False)
            else:
                x = block(x, cos, sin, segment_ids, cache, i, dropout)
        if cache is not None:
            cache.length += s
        logits = tr.ff_out(tr.ln_f(x))
        if labels is None:
            return MolmoOutput(logits)
        n_tokens = int((labels != -100).sum())
        total = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        norm = loss_normalizer if loss_normalizer is not None else max(n_tokens, 1)
        return MolmoOutput(logits, total / norm, n_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.embedding.device
