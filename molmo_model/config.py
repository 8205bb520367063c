"""Molmo configuration: one dataclass per component, nested into `MolmoConfig`.

`MolmoConfig.to_hf_dict()` / `from_hf_dict()` read and write HF `config.json` in Ai2's
field names (model_type "molmo"). The official Molmo-7B-D config does not describe the
vision tower or the image geometry; we write those as extra fields and, when they are
missing, default to Molmo-7B-D's values, so an official config loads as it is. One of
them, `image_mask_rule`, says which image-mask rule the checkpoint was trained with
(molmo_model/image_masks.py); a config without it gets Ai2's, the releases' rule.

Presets: `molmo-7b-d` (the real shapes) and `tiny` (small widths and depths, the real
image geometry) for tests and the demo model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Values of `PreprocessConfig.image_mask_rule` (molmo_model/image_masks.py has both rules).
AI2_MASK_RULE = "ai2"  # Ai2's released checkpoints: masks shifted by one crop, -1 = partial
PER_CROP_MASK_RULE = "per_crop"  # each crop its own mask
IMAGE_MASK_RULES = (AI2_MASK_RULE, PER_CROP_MASK_RULE)


@dataclass
class VisionConfig:
    """The CLIP-style ViT tower."""

    image_emb_dim: int = 1024  # ViT width
    image_num_heads: int = 16
    image_num_key_value_heads: int = 16
    image_num_layers: int = 23  # blocks stored in the checkpoint (ViT-L has 24; Molmo keeps 23)
    image_mlp_dim: int = 4096
    image_mlp_activations: str = "quick_gelu"
    image_norm_eps: float = 1e-5
    vit_layers: tuple[int, ...] = (-2, -9)  # hidden states concatenated for the connector

    def __post_init__(self) -> None:
        self.vit_layers = tuple(int(i) for i in self.vit_layers)
        if self.image_emb_dim % self.image_num_heads:
            raise ValueError(
                f"image_emb_dim={self.image_emb_dim} must be divisible by "
                f"image_num_heads={self.image_num_heads}"
            )
        for layer in self.vit_layers:
            if not -self.image_num_layers <= layer < self.image_num_layers:
                raise ValueError(
                    f"vit_layers entry {layer} is out of range for image_num_layers="
                    f"{self.image_num_layers}"
                )
        if self.image_mlp_activations != "quick_gelu":
            raise ValueError("image_mlp_activations: only 'quick_gelu' is supported")

    @property
    def image_head_dim(self) -> int:
        return self.image_emb_dim // self.image_num_heads

    @property
    def pooled_dim(self) -> int:
        """Width of the features entering the connector (concatenated ViT layers)."""
        return self.image_emb_dim * len(self.vit_layers)

    @property
    def block_shape(self):
        """The shape of one ViT block (molmo_model.vision.ViTBlockShape), shared with Molmo 2."""
        from molmo_model.vision import ViTBlockShape

        return ViTBlockShape(
            width=self.image_emb_dim,
            num_heads=self.image_num_heads,
            num_kv_heads=self.image_num_key_value_heads,
            head_dim=self.image_head_dim,
            mlp_dim=self.image_mlp_dim,
            activation=self.image_mlp_activations,
            norm_eps=self.image_norm_eps,
        )


@dataclass
class PreprocessConfig:
    """Image geometry of the overlapping multi-crop preprocessor."""

    crop_size: int = 336  # pixels per crop side
    patch_size: int = 14  # pixels per ViT patch side
    pooling_size: int = 2  # 2x2 patches become one LLM token
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)  # patches kept from the left/top and right/bottom
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # Which padding mask each crop carries and how the backbone reads it (image_masks.py).
    # Absent from a config.json (every Ai2 release): Ai2's rule. New trainings use it too.
    image_mask_rule: str = AI2_MASK_RULE

    def __post_init__(self) -> None:
        self.overlap_margins = tuple(int(m) for m in self.overlap_margins)  # type: ignore[assignment]
        self.image_mean = tuple(float(m) for m in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(s) for s in self.image_std)  # type: ignore[assignment]
        if self.crop_size % self.patch_size:
            raise ValueError(
                f"crop_size={self.crop_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.patches_per_side % self.pooling_size:
            raise ValueError(
                f"patches per crop side ({self.patches_per_side}) must be a multiple of "
                f"pooling_size={self.pooling_size}"
            )
        if self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {self.max_crops}")
        if len(self.overlap_margins) != 2 or min(self.overlap_margins) < 0:
            raise ValueError(f"overlap_margins must be two non-negative ints, got {self.overlap_margins}")
        if sum(self.overlap_margins) >= self.patches_per_side:
            raise ValueError("overlap_margins leave no window inside a crop")
        if self.image_mask_rule not in IMAGE_MASK_RULES:
            raise ValueError(
                f"image_mask_rule must be one of {IMAGE_MASK_RULES}, got {self.image_mask_rule!r}"
            )

    @property
    def patches_per_side(self) -> int:
        return self.crop_size // self.patch_size  # 24

    @property
    def tokens_per_side(self) -> int:
        return self.patches_per_side // self.pooling_size  # 12

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2  # 576

    @property
    def patch_pixels(self) -> int:
        return self.patch_size * self.patch_size * 3  # 588

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # class token + patches

    @property
    def margin_px(self) -> int:
        return sum(self.overlap_margins) * self.patch_size  # 112: what neighbouring crops share

    @property
    def window_px(self) -> int:
        return self.crop_size - self.margin_px  # 224: the stride between crops

    def canvas_size(self, rows: int, cols: int) -> tuple[int, int]:
        """(height, width) of the padded canvas a rows x cols grid of crops is cut from."""
        return rows * self.window_px + self.margin_px, cols * self.window_px + self.margin_px


@dataclass
class LLMConfig:
    """The Qwen2-style decoder, in Ai2's HF field names."""

    hidden_size: int = 3584
    intermediate_size: int = 37888  # the fused ff_proj size (two halves: x, gate)
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    num_hidden_layers: int = 28
    vocab_size: int = 152064
    embedding_size: int = 152064  # rows of wte.embedding
    additional_vocab_size: int = 128  # rows of wte.new_embedding (image special tokens)
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    qkv_bias: bool = True
    layer_norm_type: str = "rms"
    layer_norm_eps: float = 1e-6
    norm_after: bool = False
    attention_layer_norm: bool = False
    weight_tying: bool = False
    use_position_ids: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.intermediate_size % 2:
            raise ValueError("intermediate_size is the fused (x, gate) size and must be even")
        if self.layer_norm_type != "rms":
            raise ValueError("layer_norm_type: only 'rms' is supported")
        if self.norm_after or self.attention_layer_norm:
            raise ValueError("norm_after / attention_layer_norm (OLMo variants) are not supported")
        if self.embedding_size < self.vocab_size:
            raise ValueError("embedding_size must be >= vocab_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_hidden_size(self) -> int:
        return self.intermediate_size // 2

    @property
    def total_vocab_size(self) -> int:
        """Rows of the logits: embedding rows + the extra special-token rows."""
        return self.embedding_size + self.additional_vocab_size


# Fields of the official Molmo-7B-D config.json besides the LLM's own.
_HF_BASE = {
    "architectures": ["MolmoForCausalLM"],
    "model_type": "molmo",
    "initializer_range": 0.02,
    "clip_qkv": None,
    "use_cache": True,
    "torch_dtype": "float32",
}


@dataclass
class MolmoConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    torch_dtype: str = "float32"  # dtype the weights are stored in

    def __post_init__(self) -> None:
        n = self.preprocess.num_positions
        if self.vision.image_num_layers < 1 or n < 2:
            raise ValueError("vision tower must have at least one layer and one patch")

    # ---- HF config.json ----
    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(_HF_BASE)
        d.update(dataclasses.asdict(self.llm))
        d["torch_dtype"] = self.torch_dtype
        # Our extras: the vision tower and image geometry, which the official config leaves out.
        for k, v in dataclasses.asdict(self.vision).items():
            d[k] = list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(self.preprocess).items():
            d[k] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> MolmoConfig:
        if d.get("model_type", "molmo") != "molmo":
            raise ValueError(f"model_type is {d.get('model_type')!r}, expected 'molmo'")

        def pick(klass: type) -> dict[str, Any]:
            names = {f.name for f in dataclasses.fields(klass)}
            return {k: v for k, v in d.items() if k in names and v is not None}

        return cls(
            llm=LLMConfig(**pick(LLMConfig)),
            vision=VisionConfig(**pick(VisionConfig)),
            preprocess=PreprocessConfig(**pick(PreprocessConfig)),
            torch_dtype=str(d.get("torch_dtype") or "float32"),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MolmoConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        return cls.from_hf_dict(json.loads(p.read_text()))


def molmo_7b_d() -> MolmoConfig:
    return MolmoConfig()


def tiny(vocab_size: int = 512) -> MolmoConfig:
    """Small widths and depths, Molmo's real image geometry (336 px crops, 14 px patches,
    2x2 pooling, 12 crops, margins 4). LLM head dim 64: a size vLLM's CPU attention supports."""
    return MolmoConfig(
        llm=LLMConfig(
            hidden_size=128,
            intermediate_size=2 * 256,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_hidden_layers=2,
            vocab_size=vocab_size,
            embedding_size=vocab_size,
            max_position_embeddings=4096,
            rope_theta=10_000.0,
        ),
        vision=VisionConfig(
            image_emb_dim=64,
            image_num_heads=2,
            image_num_key_value_heads=2,
            image_num_layers=3,
            image_mlp_dim=128,
            vit_layers=(-1, -3),
        ),
        preprocess=PreprocessConfig(),
    )


def demo(vocab_size: int = 512) -> MolmoConfig:
    """The shape of the CPU-trained demo model (`molmo train --preset demo`): a small ViT and
    LLM on Molmo's image layout at two thirds of its resolution (224 px crops of 14 px
    patches, 2x2 pooling, margins 4; max_crops 1: a global view + one crop, 148 image tokens,
    against 316 at 336 px), LLM head dim 64 (a size vLLM's CPU attention has). The smaller
    crop halves the cost of an image, which buys a CPU run twice the images. The LLM is deep
    rather than wide (4 layers, MLP 512): at about the same cost as 3 layers with MLP 1024 it
    counts better (models/molmo-demo/README.md). It keeps the per-crop image-mask rule the
    committed demo model was trained with, so that its recipe reproduces it."""
    return MolmoConfig(
        llm=LLMConfig(
            hidden_size=192,
            intermediate_size=512,
            num_attention_heads=3,
            num_key_value_heads=3,
            num_hidden_layers=4,
            vocab_size=vocab_size,
            embedding_size=vocab_size,
            max_position_embeddings=4096,
            rope_theta=10_000.0,
        ),
        vision=VisionConfig(
            image_emb_dim=128,
            image_num_heads=2,
            image_num_key_value_heads=2,
            image_num_layers=2,
            image_mlp_dim=256,
            vit_layers=(-1, -2),
        ),
        preprocess=PreprocessConfig(crop_size=224, max_crops=1, image_mask_rule=PER_CROP_MASK_RULE),
    )


PRESETS = {"molmo-7b-d": molmo_7b_d, "tiny": tiny, "demo": demo}


def get_preset(name: str, **kwargs: Any) -> MolmoConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**kwargs) if kwargs else PRESETS[name]()
