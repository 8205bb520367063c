"""Molmo's vision side: the CLIP-style ViT, padding embeddings, 2x2 attention pooling and the
SwiGLU projector, with Ai2's module names (so `state_dict()` keys are the checkpoint's).

`MolmoVisionBackbone` turns the preprocessor's crops into one LLM-width vector per pooled
2x2 window. It is plain PyTorch and is reused as it is by training, the reference generator
and the vLLM adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import attention_pool
from molmo_model.config import MolmoConfig, PreprocessConfig, VisionConfig
from molmo_model.image_masks import padding_flags


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# ViT MLP activations by their config names: CLIP's (Molmo) and SigLIP's (Molmo 2).
VIT_ACTIVATIONS = {
    "quick_gelu": QuickGELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


@dataclass(frozen=True)
class ViTBlockShape:
    """What one pre-LN ViT block needs to know; both Molmo families' configs produce one."""

    width: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    activation: str  # a key of VIT_ACTIVATIONS
    norm_eps: float
    # Attention in float32 whatever the weights' dtype (Molmo 2's `float32_attention`).
    float32_attention: bool = False

    def __post_init__(self) -> None:
        if self.activation not in VIT_ACTIVATIONS:
            raise ValueError(
                f"ViT activation {self.activation!r} is not supported; choose one of {sorted(VIT_ACTIVATIONS)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError("ViT num_heads must be a multiple of num_kv_heads")


class ViTMLP(nn.Module):
    def __init__(self, shape: ViTBlockShape):
        super().__init__()
        self.w1 = nn.Linear(shape.width, shape.mlp_dim)
        self.act = VIT_ACTIVATIONS[shape.activation]()
        self.w2 = nn.Linear(shape.mlp_dim, shape.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class ViTAttention(nn.Module):
    """Full (unmasked) multi-head self-attention of one ViT block."""

    def __init__(self, shape: ViTBlockShape):
        super().__init__()
        self.num_heads = shape.num_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.float32_attention = shape.float32_attention
        d = shape.width
        self.wq = nn.Linear(d, self.num_heads * self.head_dim)
        self.wk = nn.Linear(d, self.num_kv_heads * self.head_dim)
        self.wv = nn.Linear(d, self.num_kv_heads * self.head_dim)
        self.wo = nn.Linear(self.num_heads * self.head_dim, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape  # [B, N, C]
        q = self.wq(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, D]
        k = self.wk(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        dtype = q.dtype
        if self.float32_attention:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(
            q, k, v, enable_gqa=self.num_kv_heads != self.num_heads
        )  # [B, H, N, D]
        return self.wo(out.to(dtype).transpose(1, 2).reshape(b, n, -1))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, shape: ViTBlockShape):
        super().__init__()
        self.attention = ViTAttention(shape)
        self.feed_forward = ViTMLP(shape)
        self.attention_norm = nn.LayerNorm(shape.width, eps=shape.norm_eps)
        self.ffn_norm = nn.LayerNorm(shape.width, eps=shape.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class BlockCollection(nn.Module):
    def __init__(self, shape: ViTBlockShape, num_layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(shape) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, keep: set[int]) -> dict[int, torch.Tensor]:
        """Runs the blocks, returning the hidden states of the (non-negative) layers in `keep`;
        blocks past the last kept layer are skipped."""
        out: dict[int, torch.Tensor] = {}
        last = max(keep)
        for i, block in enumerate(self.resblocks):
            x = block(x)
            if i in keep:
                out[i] = x
            if i == last:
                break
        return out

    def run(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Hidden states of `layers` (negative counts from the end of the blocks built here)."""
        n = len(self.resblocks)
        idx = [i % n for i in layers]
        states = self(x, set(idx))
        return [states[i] for i in idx]


class VisionTransformer(nn.Module):
    """Molmo's CLIP tower: class token, learned positions for one fixed grid, pre-LN."""

    def __init__(self, cfg: VisionConfig, geo: PreprocessConfig):
        super().__init__()
        d = cfg.image_emb_dim
        scale = d**-0.5
        self.class_embedding = nn.Parameter(torch.randn(d) * scale)
        self.positional_embedding = nn.Parameter(torch.randn(geo.num_positions, d) * scale)
        self.patch_embedding = nn.Linear(geo.patch_pixels, d, bias=False)
        self.pre_ln = nn.LayerNorm(d, eps=cfg.image_norm_eps)
        self.transformer = BlockCollection(cfg.block_shape, cfg.image_num_layers)

    def forward(self, patches: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """patches [B, N, P] -> hidden states of the requested layers, each [B, 1 + N, C]."""
        x = self.patch_embedding(patches)  # [B, N, C]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+N, C]
        x = self.pre_ln(x)
        return self.transformer.run(x, layers)


class AttentionPooling(nn.Module):
    """Multi-head attention whose single query is the mean of a window's vectors.

    Molmo pools full 2x2 windows. Molmo 2 pools windows with absent members (the edge of an
    odd patch grid): `valid` marks the members present, absent ones must already be zero;
    with `masked` the query is the mean of the present members only and absent keys get no
    weight, otherwise (Molmo 2 with pooling_attention_mask false) the zeros take part."""

    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.wq = nn.Linear(in_dim, inner)
        self.wk = nn.Linear(in_dim, inner)
        self.wv = nn.Linear(in_dim, inner)
        self.wo = nn.Linear(inner, out_dim)

    def forward(self, windows: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """windows [W, K, C] (K members per window), valid [W, K] bool -> [W, out_dim]."""
        w, k, _ = windows.shape
        h, d = self.num_heads, self.head_dim
        if valid is None:
            q = self.wq(windows.mean(dim=1)).view(w, h, d)  # [W, H, D]
            kk = self.wk(windows).view(w, k, h, d)  # [W, K, H, D]
            vv = self.wv(windows).view(w, k, h, d)
            return self.wo(attention_pool(q, kk, vv).reshape(w, h * d))
        count = valid.sum(dim=1, keepdim=True).clamp(min=1).to(windows.dtype)  # [W, 1]
        q = self.wq(windows.sum(dim=1) / count).view(w, h, d)
        kk = self.wk(windows).view(w, k, h, d)
        vv = self.wv(windows).view(w, k, h, d)
        scores = torch.einsum("whd,wkhd->whk", q.float(), kk.float()) * d**-0.5  # [W, H, K]
        # A window with no member present (dropped by the caller) keeps finite scores.
        keep = valid | ~valid.any(dim=1, keepdim=True)
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        out = torch.einsum("whk,wkhd->whd", scores.softmax(dim=-1), vv.float())  # [W, H, D]
        return self.wo(out.to(windows.dtype).reshape(w, h * d))

class ImageProjector(nn.Module):
    """SwiGLU without bias: w2(silu(w1 x) * w3 x)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)
        self.w3 = nn.Linear(in_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoVisionBackbone(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.vcfg = config.vision
        self.geo = config.preprocess
        self.image_vit = VisionTransformer(config.vision, config.preprocess)
        v = config.vision
        self.image_pooling_2d = AttentionPooling(
            v.pooled_dim, v.image_num_heads, v.image_head_dim, v.image_emb_dim
        )
        self.image_projector = ImageProjector(
            config.vision.image_emb_dim, config.llm.mlp_hidden_size, config.llm.hidden_size
        )
        self.pad_embed = nn.Parameter(torch.zeros(2, config.vision.pooled_dim))

    @property
    def tokens_per_crop(self) -> int:
        return self.geo.tokens_per_side**2

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """images [n_crops, N, P], image_masks [n_crops, N] -> [n_crops, tokens_per_crop, d_model]."""
        dtype = self.image_vit.patch_embedding.weight.dtype
        images = images.to(dtype)
        n = images.shape[0]
        states = self.image_vit(images, list(self.vcfg.vit_layers))
        feats = torch.cat(states, dim=-1)[:, 1:]  # drop the class token -> [n, N, C2]

        # Padding embeddings: pad_embed[0] where a patch is all padding, pad_embed[1] where
        # partly, as the checkpoint's image-mask rule reads the masks.
        all_pad, partial = padding_flags(image_masks, self.geo.image_mask_rule)  # [n, N] each
        all_pad = all_pad.to(feats.dtype)[..., None]  # [n, N, 1]
        partial = partial.to(feats.dtype)[..., None]
        feats = feats + all_pad * self.pad_embed[0].to(feats.dtype)
        feats = feats + partial * self.pad_embed[1].to(feats.dtype)

        # Cut each crop's [S, S] grid into [S/p, S/p] windows of p*p members (row-major).
        s, p = self.geo.patches_per_side, self.geo.pooling_size
        t = s // p
        feats = feats.reshape(n, t, p, t, p, -1).permute(0, 1, 3, 2, 4, 5)  # [n, t, t, p, p, C2]
        windows = feats.reshape(n * t * t, p * p, -1)  # [n*t*t, p*p, C2]
        pooled = self.image_pooling_2d(windows)  # [n*t*t, C]
        return self.image_projector(pooled).view(n, t * t, -1)  # [n, t*t, d_model]


def add_image_features(embeds: torch.Tensor, where: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Adds image features to the token embeddings at the `<im_patch>` positions, in place, as
    Ai2's Molmo does (it adds, it does not replace). embeds [..., d] (a fresh embedding
    output); where: bool, embeds' shape without d; feats [M, d] in token order. Shared by the
    reference model and the vLLM adapter."""
    n = int(where.sum())
    if n != feats.shape[0]:
        raise ValueError(f"{n} <im_patch> tokens but {feats.shape[0]} image features")
    embeds[where] = embeds[where] + feats.to(embeds.dtype)
    return embeds

