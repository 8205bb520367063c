"""Molmo 2's vision side: the SigLIP 2 tower, attention pooling over the patches each image
token lists, and the SwiGLU projector, with Ai2's module names (`state_dict()` keys are the
release's `model.vision_backbone.*` names).

The blocks, the pooling attention and the projector are Molmo's own modules
(molmo_model/vision.py) built with Molmo 2's shapes; only the tower's embedding differs
(no class token, no pre-LN, a patch bias, learned positions resized to the crop grid).

Inputs are what Ai2's Molmo 2 processor emits, concatenated over the batch:
  pixel_values [C, N, P]: C crops (or video frames) of N = 27*27 patches of P = 14*14*3 values;
  token_pooling [M, K]: for each image token, the K = 2*2 patches it pools, as indices into
      the crops' patches flattened [C * N], -1 where a window has no patch (grid edges).
`flat_token_pooling` turns the processor's per-image indices into those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molmo_model.molmo2.config import Molmo2Config, Molmo2VitConfig
from molmo_model.vision import AttentionPooling, BlockCollection, ImageProjector, ViTBlockShape


def vit_block_shape(cfg: Molmo2VitConfig) -> ViTBlockShape:
    return ViTBlockShape(
        width=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        mlp_dim=cfg.intermediate_size,
        activation=cfg.hidden_act,
        norm_eps=cfg.layer_norm_eps,
        float32_attention=cfg.float32_attention,
    )


class Molmo2VisionTransformer(nn.Module):
    def __init__(self, cfg: Molmo2VitConfig, num_blocks: int):
        super().__init__()
        self.grid = cfg.patch_grid
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.image_num_pos, cfg.hidden_size))
        self.patch_embedding = nn.Linear(cfg.patch_pixels, cfg.hidden_size)
        self.transformer = BlockCollection(vit_block_shape(cfg), num_blocks)

    def positions(self) -> torch.Tensor:
        """[rows * cols, C]: the learned square grid, resized (bicubic, antialiased) when the
        crop's patch grid is another size."""
        pos = self.positional_embedding
        side = round(pos.shape[0] ** 0.5)
        if (side, side) == tuple(self.grid):
            return pos
        grid = pos.reshape(side, side, -1).permute(2, 0, 1)[None]  # [1, C, side, side]
        grid = F.interpolate(grid, size=self.grid, mode="bicubic", align_corners=False, antialias=True)
        return grid[0].permute(1, 2, 0).reshape(-1, pos.shape[-1])  # [rows * cols, C]

    def forward(self, patches: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """patches [B, N, P] -> hidden states of `layers`, each [B, N, C]."""
        x = self.patch_embedding(patches)  # [B, N, C]
        x = x + self.positions()[None].to(x.dtype)
        return self.transformer.run(x, layers)


class Molmo2VisionBackbone(nn.Module):
    def __init__(self, config: Molmo2Config):
        super().__init__()
        self.config = config
        self.vit_layers = config.vit_layers_used
        self.image_vit = Molmo2VisionTransformer(config.vit, config.vit_blocks_built)
        a = config.adapter
        self.image_pooling_2d = AttentionPooling(
            config.vit.hidden_size * len(a.vit_layers), a.num_attention_heads, a.head_dim, a.hidden_size
        )
        self.image_projector = ImageProjector(a.hidden_size, a.intermediate_size, a.text_hidden_size)

    def forward(self, pixel_values: torch.Tensor, token_pooling: torch.Tensor) -> torch.Tensor:
        """pixel_values [C, N, P], token_pooling [M, K] (flat indices, -1 = none) ->
        [M', d_model], one row per image token, the rows listing no patch left out (as Ai2's
        model does; the processor never emits one)."""
        dtype = self.image_vit.patch_embedding.weight.dtype
        states = self.image_vit(pixel_values.to(dtype), self.vit_layers)
        feats = torch.cat(states, dim=-1).flatten(0, 1)  # [C * N, C2]
        valid = token_pooling >= 0  # [M, K]
        windows = feats[token_pooling.clamp(min=0)] * valid[..., None].to(dtype)  # [M, K, C2]
        masked = valid if self.config.adapter.pooling_attention_mask else None
        pooled = self.image_pooling_2d(windows, masked)  # [M, hidden]
        return self.image_projector(pooled)[valid.any(dim=-1)]  # [M', d_model]


def flat_token_pooling(
    token_pooling: torch.Tensor, rows_per_item: torch.Tensor, patches_per_item: torch.Tensor
) -> torch.Tensor:
    """The processor's token_pooling [M, K] indexes each image's (or video's) own crops;
    returns it indexing all crops concatenated. rows_per_item [I]: token rows of each item
    (sum = M); patches_per_item [I]: crops (frames) x patches per crop of each item."""
    if int(rows_per_item.sum()) != token_pooling.shape[0]:
        raise ValueError(
            f"token_pooling has {token_pooling.shape[0]} rows but the grids give {int(rows_per_item.sum())}"
        )
    offsets = torch.cumsum(patches_per_item, 0) - patches_per_item  # [I]
    per_row = torch.repeat_interleave(offsets.to(token_pooling.device), rows_per_item.to(token_pooling.device))
    return torch.where(token_pooling >= 0, token_pooling + per_row[:, None], token_pooling)


def image_rows_and_patches(
    image_grids: torch.Tensor, image_num_crops: torch.Tensor, patches_per_crop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ai2's image_grids [I, 4] = (low-res rows, cols, high-res rows, cols) after pooling;
    image_num_crops [I] (the global view included) -> (rows_per_item, patches_per_item)."""
    rows = image_grids[:, :2].prod(dim=1) + image_grids[:, 2:].prod(dim=1)
    return rows, image_num_crops * patches_per_crop


def video_rows_and_patches(
    video_grids: torch.Tensor, patches_per_frame: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ai2's video_grids [V, 3] = (frames, rows, cols) after pooling."""
    return video_grids.prod(dim=1), video_grids[:, 0] * patches_per_frame
