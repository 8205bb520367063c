"""Molmo 2 in PyTorch: the SigLIP 2 backbone (molmo2/vision.py) feeding a Qwen3 / OLMo 3
decoder, with Ai2's module names: `Molmo2ForConditionalGeneration().state_dict()` keys are
exactly a release's weight names (`model.transformer.blocks.0.self_attn.att_proj.weight`,
`model.vision_backbone.image_vit.transformer.resblocks.0.attention.wq.weight`,
`lm_head.weight`, ...).

Shared with Molmo (molmo_model/model.py): RMSNorm, the embedding with extra rows, RoPE, the
attention (CausalSelfAttention, here with q/k RMSNorm), the fused SwiGLU, the KV cache and
the output type. As in Ai2's code, image features are ADDED to the `<im_patch>` (Molmo 2's
`image_patch_id`) embeddings, and input id -1 (padding) embeds as id 0.

    model = Molmo2ForConditionalGeneration(get_preset("molmo2-tiny"))
    out = model(input_ids, pixel_values=..., image_token_pooling=..., image_grids=...,
                image_num_crops=...)          # the processor's tensors, see forward()
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from molmo_model.generate import GenerationResult, generate_from_embeds
from molmo_model.model import (
    CausalSelfAttention,
    KVCache,
    MolmoEmbedding,
    MolmoOutput,
    RMSNorm,
    gated_mlp,
    rope_cos_sin,
)
from molmo_model.molmo2.config import Molmo2Config, Molmo2TextConfig
from molmo_model.molmo2.vision import (
    Molmo2VisionBackbone,
    flat_token_pooling,
    image_rows_and_patches,
    video_rows_and_patches,
)
from molmo_model.vision import add_image_features


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN's rotary frequencies and cos/sin scale (what transformers' "yarn" rope init gives
    Ai2's code), float32. Per frequency pair i (of head_dim / 2): base inv_freq
    theta^(-2i/D) below the correction range (high-frequency pairs are kept), inv_freq / factor
    above it (low-frequency pairs are interpolated), a linear ramp in between. The range is
    where a pair turns beta_fast .. beta_slow times over original_max_position_embeddings:
    dim(r) = D ln(L / (2 pi r)) / (2 ln theta), floored / ceiled unless truncate is false,
    clamped to [0, D - 1]. -> inv_freq [D/2], attention_factor (0.1 ln factor + 1 if absent)."""
    factor = float(scaling["factor"])
    length = float(scaling["original_max_position_embeddings"])
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def pair_at(rotations: float) -> float:
        return head_dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_at(beta_fast), pair_at(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    base = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # [D/2]
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the unscaled frequency
    inv = (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep
    return inv, float(attention_factor)


def layer_rope(
    cfg: Molmo2TextConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """cos, sin [B, 1, S, D] for each decoder layer: the plain RoPE of rope_theta, or YaRN's
    (frequencies and scaled cos/sin) on cfg.scaled_rope_layers, as Ai2's decoder picks them."""
    plain = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, dtype)
    scaled_layers = cfg.scaled_rope_layers
    if not scaled_layers:
        return [plain] * cfg.num_hidden_layers
    inv, scale = yarn_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # type: ignore[arg-type]
    freqs = position_ids.float()[..., None] * inv.to(position_ids.device)  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, D]
    scaled = ((emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype))
    return [scaled if i in scaled_layers else plain for i in range(cfg.num_hidden_layers)]


class Molmo2Attention(CausalSelfAttention, nn.Module):
    def __init__(self, cfg: Molmo2TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        d, hd = cfg.hidden_size, cfg.head_dim
        self.att_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv) * hd, bias=cfg.qkv_bias)
        self.attn_out = nn.Linear(self.n_heads * hd, d, bias=False)
        self.per_head_norm = cfg.qk_norm_type == "qwen3"
        if cfg.use_qk_norm:
            # Qwen3 normalizes each head's vector; OLMo the concatenation of all heads.
            self.q_norm = RMSNorm(hd if self.per_head_norm else self.n_heads * hd, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(hd if self.per_head_norm else self.n_kv * hd, cfg.layer_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:
            return q, k
        if not self.per_head_norm:
            return self.q_norm(q), self.k_norm(k)
        hd = self.head_dim
        q = self.q_norm(q.unflatten(-1, (-1, hd))).flatten(-2)  # [B, S, H, D] normed -> [B, S, H*D]
        k = self.k_norm(k.unflatten(-1, (-1, hd))).flatten(-2)
        return q, k


class Molmo2MLP(nn.Module):
    def __init__(self, cfg: Molmo2TextConfig):
        super().__init__()
        self.ff_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.ff_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(self.ff_proj, self.ff_out, x)


class Molmo2DecoderBlock(nn.Module):
    def __init__(self, cfg: Molmo2TextConfig):
        super().__init__()
        self.self_attn = Molmo2Attention(cfg)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = Molmo2MLP(cfg)
        self.ff_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.norm_after = cfg.norm_after

    def forward(self, x, cos, sin, cache=None, layer=0, attn_mask=None):
        if self.norm_after:  # OLMo 3: normalize each sublayer's output before the residual add
            x = x + self.attn_norm(self.self_attn.attention(x, cos, sin, None, cache, layer, attn_mask))
            return x + self.ff_norm(self.mlp(x))
        x = x + self.self_attn.attention(self.attn_norm(x), cos, sin, None, cache, layer, attn_mask)
        return x + self.mlp(self.ff_norm(x))


class Molmo2TextModel(nn.Module):
    def __init__(self, cfg: Molmo2TextConfig):
        super().__init__()
        self.wte = MolmoEmbedding(cfg)
        self.blocks = nn.ModuleList(Molmo2DecoderBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)


class Molmo2Model(nn.Module):
    def __init__(self, config: Molmo2Config):
        super().__init__()
        self.transformer = Molmo2TextModel(config.text)
        self.vision_backbone = Molmo2VisionBackbone(config)


class Molmo2ForConditionalGeneration(nn.Module):
    def __init__(self, config: Molmo2Config):
        super().__init__()
        self.config = config
        self.model = Molmo2Model(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> Molmo2ForConditionalGeneration:
        """Random weights for fresh models: normal(std) matrices and positions, zero biases,
        unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 1 and ("norm" in name or "ln_f" in name) and name.endswith("weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ---- inputs ----
    def image_features(
        self,
        pixel_values: torch.Tensor,
        image_token_pooling: torch.Tensor,
        image_grids: torch.Tensor,
        image_num_crops: torch.Tensor,
    ) -> torch.Tensor:
        """The processor's image tensors for the whole batch (images in prompt order) ->
        [M, d_model], one row per `<im_patch>` token in that order."""
        rows, patches = image_rows_and_patches(image_grids, image_num_crops, pixel_values.shape[1])
        if int(image_num_crops.sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"image_num_crops sums to {int(image_num_crops.sum())} but pixel_values has "
                f"{pixel_values.shape[0]} crops"
            )
        pooling = flat_token_pooling(image_token_pooling, rows, patches)
        return self.model.vision_backbone(pixel_values, pooling)

    def video_features(
        self, pixel_values_videos: torch.Tensor, video_token_pooling: torch.Tensor, video_grids: torch.Tensor
    ) -> torch.Tensor:
        rows, patches = video_rows_and_patches(video_grids, pixel_values_videos.shape[1])
        pooling = flat_token_pooling(video_token_pooling, rows, patches)
        return self.model.vision_backbone(pixel_values_videos, pooling)

    def embed(self, input_ids: torch.Tensor, **mm: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, S, d] with image (or video) features added at the
        image_patch_id positions. `mm`: forward()'s image or video tensors."""
        x = self.model.transformer.wte(input_ids.clamp(min=0))  # -1 (padding) embeds as 0
        if mm.get("pixel_values") is not None and mm.get("pixel_values_videos") is not None:
            raise ValueError("pass images or a video, not both")
        if mm.get("pixel_values") is not None:
            feats = self.image_features(
                mm["pixel_values"], mm["image_token_pooling"], mm["image_grids"], mm["image_num_crops"]
            )
        elif mm.get("pixel_values_videos") is not None:
            feats = self.video_features(
                mm["pixel_values_videos"], mm["video_token_pooling"], mm["video_grids"]
            )
        else:
            return x
        return add_image_features(x, input_ids == self.config.image_patch_id, feats)

    def prefill_mask(self, token_type_ids: torch.Tensor, past: int) -> torch.Tensor:
        """Ai2's optional bidirectional image attention: during prefill, image tokens
        (token_type_ids 1) also see every image token; the rest stays causal.
        -> bool [B, 1, S, past + S]."""
        b, s = token_type_ids.shape
        causal = torch.ones(s, past + s, dtype=torch.bool, device=token_type_ids.device).tril(diagonal=past)
        img = token_type_ids.bool()
        img_k = torch.cat([img.new_zeros(b, past), img], dim=1)  # cached tokens are text here
        both = img[:, :, None] & img_k[:, None, :]  # [B, S, past + S]
        return (causal[None] | both)[:, None]

    # ---- forward ----
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_token_pooling: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_num_crops: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_token_pooling: torch.Tensor | None = None,
        video_grids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> MolmoOutput:
        """input_ids [B, S] (-1 = padding), as Ai2's processor emits them, with:

        images: pixel_values [C, 729, 588] (every image's crops, global view first, images in
            prompt order over the batch), image_token_pooling [M, 4] (per image: indices into
            its own crops' patches, -1 = none), image_grids [I, 4], image_num_crops [I];
        or a video: pixel_values_videos [F, 729, 588], video_token_pooling [M, 4],
            video_grids [V, 3].
        token_type_ids [B, S] (optional): 1 on image tokens, which then attend to each other
            both ways during prefill (Ai2's `return_mm_token_type_ids`).
        labels [B, S] (already shifted, -100 = no loss): the mean token loss is returned.
        Returns logits [B, S, vocab_size].
        """
        cfg = self.config.text
        x = inputs_embeds
        if x is None:
            x = self.embed(
                input_ids,
                pixel_values=pixel_values,
                image_token_pooling=image_token_pooling,
                image_grids=image_grids,
                image_num_crops=image_num_crops,
                pixel_values_videos=pixel_values_videos,
                video_token_pooling=video_token_pooling,
                video_grids=video_grids,
            )
        b, s, _ = x.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device).expand(b, s)
        rope = layer_rope(cfg, position_ids, x.dtype)
        mask = self.prefill_mask(token_type_ids, past) if token_type_ids is not None else None
        tr = self.model.transformer
        for i, block in enumerate(tr.blocks):
            x = block(x, *rope[i], cache, i, mask)
        if cache is not None:
            cache.length += s
        logits = self.lm_head(tr.ln_f(x))
        if labels is None:
            return MolmoOutput(logits)
        n = int((labels != -100).sum())
        loss = nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return MolmoOutput(logits, loss / max(n, 1), n)


@torch.no_grad()
def generate(
    model: Molmo2ForConditionalGeneration,
    input_ids: list[int] | torch.Tensor,
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    return_logprobs: bool = False,
    token_type_ids: torch.Tensor | None = None,
    **mm: Any,
) -> GenerationResult:
    """One prompt through Molmo 2 with a KV cache, by molmo_model/generate.py's decode loop
    (greedy at temperature 0). `mm`: the processor's image or video tensors (see forward)."""
    model.eval()
    device = model.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    mm = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mm.items()}
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    cache = KVCache.empty(model.config.text.num_hidden_layers)
    embeds = model.embed(ids, **mm)
    extra = {"token_type_ids": token_type_ids.to(device)} if token_type_ids is not None else {}
    return generate_from_embeds(
        model, ids, embeds, cache, max_new_tokens, eos_id, temperature, top_k, top_p, gen,
        return_logprobs, **extra,
    )  # fmt: skip
