"""Molmo 2 configuration, read from and written to Ai2's released `config.json`.

Ai2's Molmo 2 config (model_type "molmo2", architectures ["Molmo2ForConditionalGeneration"])
nests three parts, and so do we: `vit_config` (the SigLIP 2 tower), `adapter_config` (which
ViT layers feed the connector, the attention pooling, the SwiGLU projector) and `text_config`
(the Qwen3 / OLMo 3 decoder), plus the image token ids at the top. Field names are Ai2's.

Reading is strict: a field that shapes the architecture must be present (a missing one is
named, e.g. `text_config.head_dim`), and values we do not implement (another activation,
RoPE scaling other than YaRN, tied embeddings) are refused by name. Fields that only matter to training
(dropouts, initializer_range) are kept when present and written back.

Presets: `molmo2-4b`, `molmo2-8b`, `molmo2-o-7b` (the released shapes; O-7B has the OLMo 3
decoder), `molmo2-tiny` and `molmo2-o-tiny` (tiny widths and depths, Qwen3 / OLMo 3 decoder,
Molmo 2's real image geometry: 378 px crops of 14 px patches, 27x27 positions).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "molmo2"
ARCHITECTURE = "Molmo2ForConditionalGeneration"
SUPPORTED_VIT_ACTIVATIONS = ("gelu_pytorch_tanh",)
SUPPORTED_QK_NORM = ("qwen3", "olmo")  # per head (Qwen3) / over all heads' concatenation (OLMo)


class ConfigError(ValueError):
    pass


@dataclass
class Molmo2VitConfig:
    """The SigLIP 2 so400m/14 tower (no class token, no pre-LN, patch bias)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # of the full tower; only the blocks up to the deepest used are built
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    layer_norm_eps: float
    image_default_input_size: tuple[int, int]  # (height, width) of one crop, pixels
    image_patch_size: int
    image_num_pos: int  # learned positions: a square grid, resized when the crop grid differs
    float32_attention: bool = True
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.image_default_input_size = tuple(int(v) for v in self.image_default_input_size)  # type: ignore[assignment]
        if self.hidden_act not in SUPPORTED_VIT_ACTIVATIONS:
            raise ConfigError(
                f"vit_config.hidden_act={self.hidden_act!r} is not supported "
                f"(supported: {SUPPORTED_VIT_ACTIVATIONS})"
            )
        side = round(self.image_num_pos**0.5)
        if side * side != self.image_num_pos:
            raise ConfigError(f"vit_config.image_num_pos={self.image_num_pos} is not a square grid")
        h, w = self.image_default_input_size
        if h % self.image_patch_size or w % self.image_patch_size:
            raise ConfigError(
                "vit_config.image_default_input_size must be a multiple of image_patch_size"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("vit_config.num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches per crop side (rows, cols): 27 x 27 for 378 px crops of 14 px."""
        h, w = self.image_default_input_size
        return h // self.image_patch_size, w // self.image_patch_size

    @property
    def num_patches(self) -> int:
        r, c = self.patch_grid
        return r * c

    @property
    def patch_pixels(self) -> int:
        return self.image_patch_size * self.image_patch_size * 3  # 588


@dataclass
class Molmo2AdapterConfig:
    """ViT features -> attention pooling over each token's patches -> SwiGLU projector."""

    vit_layers: tuple[int, ...]  # ViT hidden states concatenated for the connector
    pooling_attention_mask: bool  # pool only the patches present (edges of odd grids)
    hidden_size: int  # pooling attention output width
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    intermediate_size: int  # projector hidden width
    text_hidden_size: int  # projector output = the decoder's width
    float32_attention: bool = True
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    image_feature_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.vit_layers = tuple(int(i) for i in self.vit_layers)
        if not self.vit_layers:
            raise ConfigError("adapter_config.vit_layers is empty")
        if self.hidden_act != "silu":
            raise ConfigError(f"adapter_config.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError("adapter_config.num_key_value_heads != num_attention_heads is not supported")


# YaRN keys we implement (transformers' names; Ai2's converter writes those it has).
YARN_KEYS = ("rope_type", "factor", "original_max_position_embeddings", "attention_factor",
             "beta_fast", "beta_slow", "truncate")  # fmt: skip


def _check_rope_scaling(d: dict[str, Any]) -> dict[str, Any]:
    """text_config.rope_scaling: null, "default", or YaRN (Molmo2-O-7B: factor 8 over 8192
    positions, attention_factor 0.1 ln 8 + 1, beta_fast 32, beta_slow 1)."""
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return {"rope_type": "default"}
    if kind != "yarn":
        raise ConfigError(
            f"text_config.rope_scaling.rope_type={kind!r} is not supported (only 'yarn', as "
            "Molmo2-O-7B uses, or the default RoPE)"
        )
    d = {"rope_type": "yarn", **{k: v for k, v in d.items() if k not in ("type", "rope_type")}}
    unknown = sorted(set(d) - set(YARN_KEYS))
    if unknown:  # mscale / mscale_all_dim (DeepSeek's attention factor) are not implemented
        raise ConfigError(f"text_config.rope_scaling: unsupported yarn fields {unknown}")
    for key in ("factor", "original_max_position_embeddings"):
        if d.get(key) is None:
            raise ConfigError(f"text_config.rope_scaling.{key} is missing (yarn needs it)")
    return d


@dataclass
class Molmo2TextConfig:
    """The decoder: Qwen3 (q/k RMSNorm per head, no QKV bias) or OLMo 3 (post-norm, q/k
    RMSNorm over all heads). Ai2's names; `intermediate_size` is ONE half of the fused
    `ff_proj` (which has 2 * intermediate_size rows)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # rows of wte.embedding and of lm_head
    additional_vocab_size: int  # rows of wte.new_embedding (image / video special tokens)
    qkv_bias: bool
    num_hidden_layers: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    rope_theta: float
    use_qk_norm: bool
    qk_norm_type: str
    layer_norm_eps: float
    norm_after: bool = False  # OLMo 3: norms after attention / MLP instead of before
    rope_scaling: dict[str, Any] | None = None
    rope_scaling_layers: tuple[int, ...] | None = None
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise ConfigError(f"text_config.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.use_qk_norm and self.qk_norm_type not in SUPPORTED_QK_NORM:
            raise ConfigError(
                f"text_config.qk_norm_type={self.qk_norm_type!r} is not supported "
                f"(supported: {SUPPORTED_QK_NORM})"
            )
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            # transformers 5.x writes rope_theta into the dict when it saves a config
            theta = scaling.pop("rope_theta", self.rope_theta)
            if float(theta) != float(self.rope_theta):
                raise ConfigError(
                    f"text_config.rope_scaling.rope_theta={theta} != rope_theta={self.rope_theta}"
                )
            self.rope_scaling = _check_rope_scaling(scaling)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("text_config.num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_scaling_layers is not None:
            self.rope_scaling_layers = tuple(int(i) for i in self.rope_scaling_layers)
            bad = [i for i in self.rope_scaling_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ConfigError(
                    f"text_config.rope_scaling_layers {bad} are out of range for "
                    f"num_hidden_layers={self.num_hidden_layers}"
                )

    @property
    def scaled_rope_layers(self) -> frozenset[int]:
        """Layers whose RoPE is `rope_scaling`'s (Ai2: all of them when rope_scaling_layers
        is null, else those listed); the others use the plain RoPE of rope_theta."""
        if self.rope_scaling is None or self.rope_scaling["rope_type"] == "default":
            return frozenset()
        if self.rope_scaling_layers is None:
            return frozenset(range(self.num_hidden_layers))
        return frozenset(self.rope_scaling_layers)

    @property
    def embedding_size(self) -> int:
        """Rows of wte.embedding (the name molmo_model.model.MolmoEmbedding reads)."""
        return self.vocab_size

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.additional_vocab_size


# Image / video token ids, top-level fields of Ai2's config.json (None where a release has none).
TOKEN_ID_FIELDS = (
    "image_start_token_id",
    "low_res_image_start_token_id",
    "image_end_token_id",
    "image_low_res_id",
    "image_patch_id",
    "image_col_id",
    "frame_start_token_id",
    "frame_end_token_id",
)


@dataclass
class Molmo2Config:
    vit: Molmo2VitConfig
    adapter: Molmo2AdapterConfig
    text: Molmo2TextConfig
    token_ids: dict[str, int | None] = field(default_factory=dict)  # TOKEN_ID_FIELDS
    use_frame_special_tokens: bool = True
    torch_dtype: str = "float32"  # dtype the weights are stored in
    # Top-level fields we do not interpret (auto_map, transformers_version, ...): kept so that
    # a loaded release is written back with them.
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.adapter.text_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"adapter_config.text_hidden_size={self.adapter.text_hidden_size} != "
                f"text_config.hidden_size={self.text.hidden_size}"
            )
        n = self.vit.num_hidden_layers
        for layer in self.adapter.vit_layers:
            if not -n <= layer < n:
                raise ConfigError(
                    f"adapter_config.vit_layers entry {layer} is out of range for "
                    f"vit_config.num_hidden_layers={n}"
                )
        if self.token_ids.get("image_patch_id") is None:
            raise ConfigError("image_patch_id is missing: the model cannot place image features")
        unknown = set(self.token_ids) - set(TOKEN_ID_FIELDS)
        if unknown:
            raise ConfigError(f"unknown token id fields {sorted(unknown)}")

    @property
    def image_patch_id(self) -> int:
        return int(self.token_ids["image_patch_id"])  # type: ignore[arg-type]

    @property
    def vit_layers_used(self) -> list[int]:
        """The adapter's ViT layers as non-negative indices."""
        n = self.vit.num_hidden_layers
        return [i % n for i in self.adapter.vit_layers]

    @property
    def vit_blocks_built(self) -> int:
        """Blocks up to the deepest layer the adapter uses: the only ones a release stores
        (25 of SigLIP 2's 27 for vit_layers (-3, -9))."""
        return max(self.vit_layers_used) + 1

    # ---- HF config.json ----
    def to_hf_dict(self) -> dict[str, Any]:
        def plain(obj: Any) -> dict[str, Any]:
            return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}

        d: dict[str, Any] = dict(self.extras)
        d.update(
            architectures=[ARCHITECTURE],
            model_type=MODEL_TYPE,
            vit_config={"model_type": MODEL_TYPE, **plain(self.vit)},
            adapter_config={"model_type": MODEL_TYPE, **plain(self.adapter)},
            text_config={"model_type": "molmo2_text", **plain(self.text)},
            use_frame_special_tokens=self.use_frame_special_tokens,
            tie_word_embeddings=False,
            torch_dtype=self.torch_dtype,
        )
        d.update(self.token_ids)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Molmo2Config:
        if d.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        if d.get("tie_word_embeddings"):
            raise ConfigError("tie_word_embeddings=true is not supported (Molmo 2 has its own lm_head)")
        token_ids = {k: d.get(k) for k in TOKEN_ID_FIELDS}
        known = {"architectures", "model_type", "vit_config", "adapter_config", "text_config",
                 "use_frame_special_tokens", "tie_word_embeddings", "torch_dtype", "dtype",
                 *TOKEN_ID_FIELDS}  # fmt: skip
        return cls(
            vit=_read_part(Molmo2VitConfig, d, "vit_config"),
            adapter=_read_part(Molmo2AdapterConfig, d, "adapter_config"),
            text=_read_part(Molmo2TextConfig, d, "text_config"),
            token_ids=token_ids,
            use_frame_special_tokens=bool(d.get("use_frame_special_tokens", True)),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            extras={k: v for k, v in d.items() if k not in known},
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Molmo2Config:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        return cls.from_hf_dict(json.loads(p.read_text()))


def _read_part(klass: type, d: dict[str, Any], name: str) -> Any:
    """One nested config: every field without a default must be there (named if not);
    HF bookkeeping fields in the part are ignored."""
    part = d.get(name)
    if not isinstance(part, dict):
        raise ConfigError(f"config.json has no {name!r} object")
    fields = dataclasses.fields(klass)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    missing = [f"{name}.{k}" for k in required if part.get(k) is None]
    if missing:
        raise ConfigError("config.json is missing fields: " + ", ".join(missing))
    names = {f.name for f in fields}
    return klass(**{k: v for k, v in part.items() if k in names and v is not None})


# ---- presets ----


def _siglip2_so400m(num_layers: int = 27) -> Molmo2VitConfig:
    return Molmo2VitConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=72,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        image_default_input_size=(378, 378),
        image_patch_size=14,
        image_num_pos=729,
    )


def _token_ids(vocab_size: int) -> dict[str, int | None]:
    """Ai2's layout of the extra rows: the ids follow the text vocabulary (151936 in the
    Qwen3 releases), image_low_res_id skipping one row."""
    offsets = {
        "image_start_token_id": 0,
        "image_end_token_id": 1,
        "image_patch_id": 2,
        "image_col_id": 3,
        "low_res_image_start_token_id": 4,
        "image_low_res_id": 6,
        "frame_start_token_id": 7,
        "frame_end_token_id": 8,
    }
    return {k: vocab_size + v for k, v in offsets.items()}


def _qwen3_release(hidden: int, intermediate: int) -> Molmo2Config:
    # Text shapes are the base Qwen3 model's. rope_theta / max_position_embeddings follow a
    # public copy of a Molmo 2 4B-derived config (5e6, 16384): a real config.json overrides.
    text = Molmo2TextConfig(
        hidden_size=hidden,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        additional_vocab_size=128,
        qkv_bias=False,
        num_hidden_layers=36,
        intermediate_size=intermediate,
        hidden_act="silu",
        max_position_embeddings=16384,
        rope_theta=5_000_000.0,
        use_qk_norm=True,
        qk_norm_type="qwen3",
        layer_norm_eps=1e-6,
    )
    adapter = Molmo2AdapterConfig(
        vit_layers=(-3, -9),
        pooling_attention_mask=True,
        hidden_size=1152,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=72,
        hidden_act="silu",
        intermediate_size=intermediate,
        text_hidden_size=hidden,
    )
    return Molmo2Config(vit=_siglip2_so400m(), adapter=adapter, text=text, token_ids=_token_ids(151936))


def molmo2_4b() -> Molmo2Config:
    return _qwen3_release(hidden=2560, intermediate=9728)


def molmo2_8b() -> Molmo2Config:
    return _qwen3_release(hidden=4096, intermediate=12288)


def molmo2_tiny(vocab_size: int = 512) -> Molmo2Config:
    """Tiny widths and depths on Molmo 2's real image geometry (378 px crops, 14 px patches,
    27 x 27 learned positions, 2x2 pooling with ragged edges done by the processor). Four
    ViT blocks with vit_layers (-2, -4): the last block is unused and not built, as in the
    releases. LLM head dim 64 (a size vLLM's CPU attention has), Qwen3 q/k norm."""
    vit = dataclasses.replace(
        _siglip2_so400m(num_layers=4),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
    )
    text = Molmo2TextConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=vocab_size,
        additional_vocab_size=128,
        qkv_bias=False,
        num_hidden_layers=2,
        intermediate_size=256,
        hidden_act="silu",
        max_position_embeddings=4096,
        rope_theta=10_000.0,
        use_qk_norm=True,
        qk_norm_type="qwen3",
        layer_norm_eps=1e-6,
    )
    adapter = Molmo2AdapterConfig(
        vit_layers=(-2, -4),
        pooling_attention_mask=True,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        intermediate_size=256,
        text_hidden_size=128,
    )
    return Molmo2Config(vit=vit, adapter=adapter, text=text, token_ids=_token_ids(vocab_size))


# Molmo2-O-7B's RoPE (Ai2's OLMO3_7B_INSTRUCT): YaRN on the full-attention layers of OLMo 3
# (every 4th: 3, 7, ..., 31), the plain RoPE of theta 5e5 on the others. The factor 8 is
# over 8192 positions; attention_factor = 0.1 ln 8 + 1 scales cos and sin.
OLMO3_YARN = {
    "rope_type": "yarn",
    "factor": 8.0,
    "attention_factor": 1.2079441541679836,
    "original_max_position_embeddings": 8192,
    "beta_fast": 32,
    "beta_slow": 1,
}


def _olmo3_text(**shape: Any) -> Molmo2TextConfig:
    """OLMo 3's decoder as Ai2's converter writes it: post-norm (norm_after), q/k RMSNorm
    over all heads ("olmo"), no biases, MHA, yarn on every 4th layer."""
    layers = shape.pop("num_hidden_layers", 32)
    fields: dict[str, Any] = dict(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        vocab_size=100278,
        additional_vocab_size=128,
        qkv_bias=False,
        num_hidden_layers=layers,
        intermediate_size=11008,
        hidden_act="silu",
        # Ai2's SFT ran 4096 * 4 tokens (as for the Qwen3 releases); a real config.json overrides.
        max_position_embeddings=16384,
        rope_theta=500_000.0,
        use_qk_norm=True,
        qk_norm_type="olmo",
        layer_norm_eps=1e-6,
        norm_after=True,
        rope_scaling=dict(OLMO3_YARN),
        rope_scaling_layers=tuple(range(3, layers, 4)),
    )
    fields.update(shape)
    return Molmo2TextConfig(**fields)


def molmo2_o_7b() -> Molmo2Config:
    text = _olmo3_text()
    adapter = dataclasses.replace(
        molmo2_4b().adapter, intermediate_size=text.intermediate_size, text_hidden_size=text.hidden_size
    )
    return Molmo2Config(
        vit=_siglip2_so400m(), adapter=adapter, text=text, token_ids=_token_ids(text.vocab_size)
    )


def molmo2_o_tiny(vocab_size: int = 512) -> Molmo2Config:
    """molmo2-tiny with the OLMo 3 decoder (4 layers, 4 heads of 64, yarn on layers 1 and 3)."""
    base = molmo2_tiny(vocab_size)
    text = _olmo3_text(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=vocab_size,
        num_hidden_layers=4,
        intermediate_size=256,
        max_position_embeddings=4096,
        rope_scaling_layers=(1, 3),
    )
    return dataclasses.replace(base, text=text)


PRESETS = {
    "molmo2-4b": molmo2_4b,
    "molmo2-8b": molmo2_8b,
    "molmo2-o-7b": molmo2_o_7b,
    "molmo2-tiny": molmo2_tiny,
    "molmo2-o-tiny": molmo2_o_tiny,
}


def get_preset(name: str) -> Molmo2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown Molmo 2 preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
