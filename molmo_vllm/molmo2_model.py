"""Molmo 2 as a vLLM model: molmo_model.molmo2's vision backbone + a Qwen3-style decoder
built from vLLM's parallel layers, registered for Ai2's architecture name
"Molmo2ForConditionalGeneration" (replacing vLLM's built-in, which needs Ai2's remote
processor). Molmo's v1 room is molmo_vllm/model.py; this file is its Molmo 2 neighbour.

    Ai2 module (checkpoint)                     vLLM layer here
    model.transformer.wte (+ new_embedding)     VocabParallelEmbedding [vocab + 128, d]
    blocks.i.self_attn.att_proj (no bias)       QKVParallelLinear
    blocks.i.self_attn.q_norm / k_norm          RMSNorm over each head's D (Qwen3), then get_rope (NeoX)
    blocks.i.self_attn.attn_out                 RowParallelLinear (after vLLM's paged Attention)
    blocks.i.attn_norm / ff_norm                RMSNorm (fused residual add)
    blocks.i.mlp.ff_proj -> (value, gate)       MergedColumnParallelLinear, Ai2's half order + MulAndSilu
    blocks.i.mlp.ff_out                         RowParallelLinear
    model.transformer.ln_f                      RMSNorm
    lm_head (untied, base vocabulary only)      ParallelLMHead + LogitsProcessor
    model.vision_backbone.*                     molmo_model.molmo2.vision.Molmo2VisionBackbone, as it is

Module paths are the release's weight names, so loading is: concatenate the two embedding
tables, hand ff_proj's halves to their shards, everything else by name. Loading is strict:
each tensor is checked against the shapes of the PyTorch reference model
(molmo_model.molmo2.model) built from the same config; a missing, unexpected or mis-shaped
tensor raises an error naming it.

Attention is causal everywhere. Ai2's model also lets image tokens attend to each other both
ways during prefill (`token_type_ids`); vLLM 0.32's CPU attention cannot (its mm prefix-LM
mask exists only for FlexAttention / FlashAttention 4 on GPUs, and covers one image's span at
a time, not all images as Ai2 does), so `Molmo2HFConfig` sets `is_mm_prefix_lm` False and the
model equals the reference run in causal mode (tests/test_molmo2_vllm.py measures both).

Supported decoders: Qwen3 (Molmo2-4B / -8B: pre-norm, per-head q/k norm). OLMo 3 (Molmo2-O-7B:
norm_after, q/k norm over all heads, which tensor parallelism would have to gather) is refused
by name. Images only (no video yet).

Interfaces: `SupportsPP` (blocks split by `make_layers`, the vision tower on the first rank),
`SupportsLoRA` (att_proj and ff_proj are packed modules in Ai2's fused layout, as v1's; adapter
names are the release's, so no mapper), quantization through vLLM's linear layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import MulAndSilu
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsLoRA,
    SupportsMultiModal,
    SupportsPP,
)
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from molmo_model.molmo2.config import Molmo2Config, Molmo2TextConfig
from molmo_model.molmo2.vision import Molmo2VisionBackbone, flat_token_pooling
from molmo_model.vision import add_image_features
from molmo_vllm.config import molmo2_config_of
from molmo_vllm.molmo2_processor import (
    Molmo2DummyInputsBuilder,
    Molmo2MultiModalProcessor,
    Molmo2ProcessingInfo,
)


class Molmo2ImageKwargs(TypedDict):
    """What the processor hands the model for a batch of images (crops concatenated).

    pixel_values:        [C, 729, 588]  every crop's patches, SigLIP-normalised float
    image_token_pooling: [M, 4]         per image, the patches each <im_patch> token pools,
                                        indexing that image's own c_i * 729 patches (-1 = none)
    image_num_crops:     [n_images]     c_i (global view included)
    image_num_tokens:    [n_images]     m_i, the image's <im_patch> tokens
    """

    pixel_values: torch.Tensor
    image_token_pooling: torch.Tensor
    image_num_crops: torch.Tensor
    image_num_tokens: torch.Tensor


def _image_inputs(kwargs: dict[str, object]) -> Molmo2ImageKwargs | None:
    if kwargs.get("pixel_values") is None:
        return None
    inputs = {name: torch.as_tensor(kwargs[name]) for name in Molmo2ImageKwargs.__annotations__}
    return Molmo2ImageKwargs(**inputs)


def check_supported(cfg: Molmo2TextConfig) -> None:
    """Refuse (ValueError, naming the field) what this vLLM decoder does not implement."""
    if cfg.norm_after:
        raise ValueError("text_config.norm_after=true (OLMo 3, Molmo2-O-7B) is not supported by "
                         "molmo_vllm yet; serve Molmo2-4B / -8B")  # fmt: skip
    if cfg.use_qk_norm and cfg.qk_norm_type != "qwen3":
        raise ValueError(f"text_config.qk_norm_type={cfg.qk_norm_type!r} is not supported by "
                         "molmo_vllm (only 'qwen3')")  # fmt: skip
    if cfg.rope_scaling_layers is not None:
        raise ValueError("text_config.rope_scaling_layers is not supported by molmo_vllm")


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


class Molmo2SelfAttention(nn.Module):
    """att_proj -> per-head q/k RMSNorm -> RoPE -> paged attention -> attn_out."""

    def __init__(
        self,
        cfg: Molmo2TextConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if cfg.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by "
                             f"the tensor-parallel size {tp}")  # fmt: skip
        self.head_dim = hd = cfg.head_dim
        num_heads = cfg.num_attention_heads // tp
        num_kv_heads = max(1, cfg.num_key_value_heads // tp)  # replicated when kv < tp
        self.q_size, self.kv_size = num_heads * hd, num_kv_heads * hd
        self.att_proj = QKVParallelLinear(
            cfg.hidden_size, hd, cfg.num_attention_heads, cfg.num_key_value_heads,
            bias=cfg.qkv_bias, quant_config=quant_config, prefix=f"{prefix}.att_proj",
        )  # fmt: skip
        self.q_norm = RMSNorm(hd, eps=cfg.layer_norm_eps) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(hd, eps=cfg.layer_norm_eps) if cfg.use_qk_norm else None
        self.rotary_emb = get_rope(
            hd,
            max_position=cfg.max_position_embeddings,
            is_neox_style=True,  # rotate halves
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        )
        self.attn = Attention(
            num_heads, hd, hd**-0.5, num_kv_heads=num_kv_heads, cache_config=cache_config,
            quant_config=quant_config, prefix=f"{prefix}.attn",
        )  # fmt: skip
        self.attn_out = RowParallelLinear(
            cfg.num_attention_heads * hd, cfg.hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.attn_out",
        )  # fmt: skip

    def _norm_heads(self, norm: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        if norm is None:
            return x
        heads = x.view(*x.shape[:-1], x.shape[-1] // self.head_dim, self.head_dim)  # [T, H, D]
        return norm(heads).view(x.shape)  # [T, H * D]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.att_proj(x)  # [T, (Hq + 2 Hkv) * D / tp]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self._norm_heads(self.q_norm, q), self._norm_heads(self.k_norm, k)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.attn_out(self.attn(q, k, v))
        return out


class Molmo2MLP(nn.Module):
    def __init__(self, cfg: Molmo2TextConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        # Shard 0 holds Ai2's value half and shard 1 its gate half (the checkpoint's and a
        # LoRA's lora_B row order); MulAndSilu's first * silu(second) is Ai2's value * silu(gate).
        self.ff_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.ff_proj",
        )  # fmt: skip
        self.act = MulAndSilu()
        self.ff_out = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.ff_out",
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _ = self.ff_proj(x)  # [T, 2 * I / tp]
        out, _ = self.ff_out(self.act(up))
        return out


class Molmo2Block(nn.Module):
    """Pre-norm: x += self_attn(attn_norm(x)); x += mlp(ff_norm(x))."""

    def __init__(
        self,
        cfg: Molmo2TextConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        self.self_attn = Molmo2SelfAttention(cfg, cache_config, quant_config, f"{prefix}.self_attn")
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Molmo2MLP(cfg, quant_config, f"{prefix}.mlp")
        self.ff_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # vLLM's RMSNorm(x, residual) returns (norm(x + residual), x + residual).
        if residual is None:
            residual, x = x, self.attn_norm(x)
        else:
            x, residual = self.attn_norm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.ff_norm(x, residual)
        return self.mlp(x), residual


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": {0: "tokens"},
        "positions": {-1: "tokens"},
        "intermediate_tensors": {0: "tokens"},
        "inputs_embeds": {0: "tokens"},
    }
)
class Molmo2Transformer(nn.Module):
    """`model.transformer`: wte (base + extra rows), blocks, ln_f."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = molmo2_config_of(vllm_config.model_config.hf_config).text
        check_supported(cfg)
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.wte = VocabParallelEmbedding(
            cfg.total_vocab_size, cfg.hidden_size, quant_config=quant_config, prefix=f"{prefix}.wte"
        )
        self.start_layer, self.end_layer, self.blocks = make_layers(
            cfg.num_hidden_layers,
            lambda prefix: Molmo2Block(cfg, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.blocks",
        )
        self.ln_f = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], cfg.hidden_size
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            x = inputs_embeds if inputs_embeds is not None else self.wte(input_ids)  # [T, d]
            residual = None
        else:
            assert intermediate_tensors is not None
            x, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for block in self.blocks[self.start_layer : self.end_layer]:
            x, residual = block(positions, x, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": x, "residual": residual})
        x, _ = self.ln_f(x, residual)
        return x


class Molmo2Model(nn.Module):
    """`model`: the decoder and (first pipeline rank) the vision backbone."""

    def __init__(self, config: Molmo2Config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        first = get_pp_group().is_first_rank  # vLLM runs the encoder on the first stage only
        self.vision_backbone = Molmo2VisionBackbone(config) if first else PPMissingLayer()
        self.transformer = Molmo2Transformer(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer")
        )


# ---------------------------------------------------------------------------------------------
# Weight table: the release's names are this module's, but for these.
# ---------------------------------------------------------------------------------------------

_EMBEDDING = "model.transformer.wte.embedding"
_NEW_EMBEDDING = "model.transformer.wte.new_embedding"
_WTE = "model.transformer.wte.weight"  # the two tables, concatenated


def expected_checkpoint_shapes(config: Molmo2Config) -> dict[str, torch.Size]:
    """Release name -> shape, from the PyTorch reference model built on the meta device."""
    from molmo_model.molmo2.model import Molmo2ForConditionalGeneration as Reference

    with torch.device("meta"):
        ref = Reference(config)
    return {k: v.shape for k, v in ref.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The vLLM model
# ---------------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(
    Molmo2MultiModalProcessor, info=Molmo2ProcessingInfo, dummy_inputs=Molmo2DummyInputsBuilder
)
class Molmo2ForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsLoRA, SupportsPP):
    # LoRA: the fused projections are one adapter module each (PEFT adapts them fused).
    packed_modules_mapping = {"att_proj": ["att_proj"], "ff_proj": ["ff_proj"]}
    embedding_modules: dict[str, str] = {}

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="model.transformer",
            connector="model.vision_backbone.image_projector",
            tower_model="model.vision_backbone",
        )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<|image|>"
        raise ValueError(f"molmo_vllm's Molmo 2 accepts images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.model_config.hf_config  # vLLM's LoRA manager reads it
        self.molmo2_config = molmo2_config_of(self.config)
        text = self.molmo2_config.text
        # The tower is skipped when images are off (limit 0), the decoder in encoder-only mode.
        with self._mark_composite_model(
            vllm_config,
            language_targets=Molmo2Transformer,
            tower_targets={"image": Molmo2VisionBackbone},
        ):
            self.model = Molmo2Model(self.molmo2_config, vllm_config, maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            text.vocab_size, text.hidden_size, quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )  # fmt: skip
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.make_empty_intermediate_tensors = self.model.transformer.make_empty_intermediate_tensors

    # ---- images ----
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One tensor per image: [m_i, d], the features of its `<im_patch>` tokens in order."""
        inputs = _image_inputs(kwargs)
        if inputs is None:
            return []
        num_tokens = inputs["image_num_tokens"].reshape(-1).cpu()
        patches = inputs["image_num_crops"].reshape(-1).cpu() * self.molmo2_config.vit.num_patches
        pixels = inputs["pixel_values"]  # [C, 729, 588]
        pooling = flat_token_pooling(inputs["image_token_pooling"].to(pixels.device), num_tokens, patches)
        feats = self.model.vision_backbone(pixels, pooling)  # [M, d]
        return list(feats.split(num_tokens.tolist()))

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.model.transformer.wte(input_ids)  # [T, d]
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return x
        assert is_multimodal is not None
        feats = torch.cat(list(multimodal_embeddings))  # [M, d]
        return add_image_features(x, is_multimodal.to(x.device), feats)

    # ---- decoder ----
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---- weights ----
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads release-named tensors; raises naming every missing, unexpected or mis-shaped
        tensor."""
        from molmo_model.checkpoint import check_state_dict

        expected = expected_checkpoint_shapes(self.molmo2_config)
        params = dict(self.named_parameters())
        found: dict[str, torch.Size] = {}
        tables: dict[str, torch.Tensor] = {}
        loaded: set[str] = set()
        for name, w in weights:
            found[name] = w.shape
            if name not in expected or tuple(expected[name]) != tuple(w.shape):
                continue  # reported by check_state_dict
            if name in (_EMBEDDING, _NEW_EMBEDDING):
                tables[name] = w
                continue
            if name not in params:
                # No vision tower when images are off (limit 0) or on a later pipeline rank.
                if name.startswith("model.vision_backbone.") or is_pp_missing_parameter(name, self):
                    continue
                raise ValueError(f"checkpoint tensor {name} has no parameter here")
            p = params[name]
            if ".mlp.ff_proj." in name:
                value, gate = w.chunk(2, dim=0)  # [2I, d]: value rows, then gate rows
                p.weight_loader(p, value, 0)
                p.weight_loader(p, gate, 1)
            else:
                getattr(p, "weight_loader", default_weight_loader)(p, w)
            loaded.add(name)
        check_state_dict(expected, found, "given to vLLM")
        wte = params[_WTE]
        wte.weight_loader(wte, torch.cat([tables[_EMBEDDING], tables[_NEW_EMBEDDING]], dim=0))
        loaded.add(_WTE)
        not_loaded = sorted(set(params) - loaded)
        if not_loaded:
            raise ValueError("parameters not initialized from the checkpoint: " + ", ".join(not_loaded))
        return loaded
