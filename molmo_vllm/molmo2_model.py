"""Molmo 2 as a vLLM model: molmo_model.molmo2's vision backbone + a Qwen3 or OLMo 3 decoder
built from vLLM's parallel layers, registered for Ai2's architecture name
"Molmo2ForConditionalGeneration" (replacing vLLM's built-in, which needs Ai2's remote
processor). Molmo's v1 room is molmo_vllm/model.py; this file is its Molmo 2 neighbour.

    Ai2 module (checkpoint)                     vLLM layer here
    model.transformer.wte (+ new_embedding)     VocabParallelEmbedding [vocab + 128, d]
    blocks.i.self_attn.att_proj (no bias)       QKVParallelLinear
    blocks.i.self_attn.q_norm / k_norm          RMSNorm over each head's D (Qwen3) or over all heads
                                                (OLMo 3), then get_rope (NeoX; yarn on rope_scaling_layers)
    blocks.i.self_attn.attn_out                 RowParallelLinear (after vLLM's paged Attention)
    blocks.i.attn_norm / ff_norm                RMSNorm: before each sublayer (Qwen3, fused residual
                                                add) or on its output (OLMo 3, norm_after)
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

Attention follows Ai2's mask: during prefill image tokens (the ids the reference marks in
`token_type_ids`: <im_patch>, <im_col>, <im_start>, <low_res_im_start>, <frame_start>,
<im_end>, <frame_end>, <im_low>) attend to every image token of the prompt, across all its
images; text stays causal. vLLM 0.32's CPU attention is causal only (its mm prefix-LM mask
exists for FlexAttention / FlashAttention 4 on GPUs, one image's span at a time), so
`Molmo2HFConfig` keeps `is_mm_prefix_lm` False and each layer does this instead:
vLLM's `Attention` runs as always (it writes the KV cache, returns the causal output); for a
sequence of the step that prefills its WHOLE prompt (no computed tokens before the step) and
holds image tokens, the image rows of that output are recomputed with torch SDPA under Ai2's
mask (causal OR key is an image token) from the q/k/v in hand, before attn_out. Text rows are
already right (a text query's mask is causal). The next layer's input is then Ai2's, so the
cached keys/values are too. The plan (rows, masks) is built once per step in `forward()` from
the forward context's query_start_loc / seq_lens and the raw token ids
(`requires_raw_input_tokens`); decode-only steps build none and skip the fix-up; it runs as a
custom op (`torch.ops.molmo.molmo2_image_prefill`), opaque to torch.compile. A prompt must be
prefilled in one step: `config.Molmo2SchedulingHook` turns chunked prefill and prefix
caching off for Molmo 2; a prefill with image tokens that still continues a sequence stays
causal and is counted in `CAUSAL_FALLBACKS` (logged once).

Supported decoders: Qwen3 (Molmo2-4B / -8B: pre-norm, per-head q/k norm, plain RoPE) and
OLMo 3 (Molmo2-O-7B: norm_after, q/k RMSNorm over the concatenation of all heads, vLLM's yarn
RoPE on `rope_scaling_layers` and the plain RoPE elsewhere, as Ai2's HF code picks them per
layer). The OLMo q/k norm needs every head's q and k, so it is refused under tensor
parallelism (its mean square would need an all-reduce across ranks).

Video (one per prompt, never with images): the frames go through the same vision backbone
as the reference's `video_features` (molmo_model.molmo2.model: each frame's 729 patches,
pooled 3x3 by video_token_pooling into 81 features) and are added at the video's
`<im_patch>` positions; the frame tokens (<frame_start>, <im_patch>, <frame_end>) are image
tokens of the mask above, exactly as the reference's token_type_ids mark them (the
timestamp texts between frames are text).

Interfaces: `SupportsPP` (blocks split by `make_layers`, the vision tower on the first rank),
`SupportsLoRA` (att_proj and ff_proj are packed modules in Ai2's fused layout, as v1's; adapter
names are the release's, so no mapper), quantization through vLLM's linear layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, TypedDict

import torch
from torch import nn
from torch.library import Library
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
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
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import direct_register_custom_op

from molmo_model.molmo2.config import Molmo2Config, Molmo2TextConfig
from molmo_model.molmo2.vision import (
    Molmo2VisionBackbone,
    flat_token_pooling,
    video_rows_and_patches,
)
from molmo_model.vision import add_image_features
from molmo_vllm.config import molmo2_config_of
from molmo_vllm.engine_gemm import use_engine_gemm, use_plain_gemm
from molmo_vllm.molmo2_processor import (
    Molmo2DummyInputsBuilder,
    Molmo2MultiModalProcessor,
    Molmo2ProcessingInfo,
)

logger = init_logger(__name__)


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


def check_supported(cfg: Molmo2TextConfig, tp: int) -> None:
    """Refuse (ValueError, naming the field) what this vLLM decoder does not implement."""
    if cfg.use_qk_norm and cfg.qk_norm_type == "olmo" and tp > 1:
        raise ValueError(
            "text_config.qk_norm_type='olmo' (OLMo 3, Molmo2-O-7B) normalizes q and k over all "
            f"heads; molmo_vllm runs it with tensor_parallel_size=1 only (got {tp})"
        )


def rope_parameters(cfg: Molmo2TextConfig, layer: int) -> dict[str, object]:
    """get_rope's parameters for one decoder layer: yarn (rope_scaling's fields) on
    cfg.scaled_rope_layers, the plain RoPE of rope_theta elsewhere. vLLM's yarn is
    transformers' (same inv_freq; cos and sin times attention_factor), hence Ai2's."""
    if layer not in cfg.scaled_rope_layers:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "yarn"
    return {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}


# ---------------------------------------------------------------------------------------------
# Ai2's bidirectional image prefill
# ---------------------------------------------------------------------------------------------


def image_token_ids(config: Molmo2Config) -> torch.Tensor:
    """The ids the reference marks in token_type_ids (Molmo2TokenIds.image_token_ids):
    <im_patch>, <im_col>, <im_start>, <low_res_im_start>, <frame_start>, <im_end>,
    <frame_end>, <im_low>; config.json names them (TOKEN_ID_FIELDS)."""
    ids = [v for v in config.token_ids.values() if v is not None]
    return torch.tensor(sorted(set(int(i) for i in ids)), dtype=torch.long)


class _SeqPlan(NamedTuple):
    """One sequence of the step: rows [start, end) of the flattened batch, its image query
    rows (absolute), and the mask [n_image_rows, end - start] (causal OR key is an image)."""

    start: int
    end: int
    rows: torch.Tensor
    mask: torch.Tensor


_STEP_PLAN: list[_SeqPlan] | None = None  # set by the model's forward for one step
CAUSAL_FALLBACKS = 0  # prefills with image tokens that were not whole prompts (left causal)


def image_prefill_plan(
    input_ids: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, image_ids: torch.Tensor
) -> list[_SeqPlan] | None:
    """Which sequences of a step prefill their whole prompt (no computed tokens before the
    step) holding image tokens: those get Ai2's mask. A prefill that continues a sequence
    (a cached prefix or a chunk; config.Molmo2SchedulingHook turns both off) and holds image
    tokens keeps vLLM's causal output and is counted in CAUSAL_FALLBACKS."""
    global CAUSAL_FALLBACKS
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    ids = input_ids.to("cpu")
    plan = []
    for i, seq_len in enumerate(lens[: len(qsl) - 1]):
        s, e = qsl[i], qsl[i + 1]
        if e - s <= 1:
            continue  # decode
        img = torch.isin(ids[s:e], image_ids)  # [L]
        if not bool(img.any()):
            continue
        if seq_len != e - s:
            CAUSAL_FALLBACKS += 1
            if CAUSAL_FALLBACKS == 1:
                logger.warning("Molmo 2: a prefill with image tokens continues a sequence "
                               "(chunked prefill or prefix caching): left causal")  # fmt: skip
            continue
        pos = img.nonzero().reshape(-1)  # image query rows within the sequence
        n = e - s
        causal = torch.arange(n)[None, :] <= pos[:, None]  # [n_img, L]
        mask = causal | img[None, :]
        plan.append(_SeqPlan(s, e, (pos + s).to(input_ids.device), mask.to(input_ids.device)))
    return plan or None


def _molmo2_image_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, head_dim: int
) -> None:
    """Replaces the image rows of `out` ([T, Hq * D], vLLM's causal attention output) by
    attention under Ai2's mask, from the step's q [T, Hq * D], k, v [T, Hkv * D] (normed,
    rotated): per planned sequence, its image queries against all its keys."""
    plan = _STEP_PLAN
    if plan is None:
        return
    hd = head_dim
    for p in plan:
        qs = q[p.rows].view(len(p.rows), -1, hd).transpose(0, 1)  # [Hq, n_img, D]
        ks = k[p.start : p.end].view(p.end - p.start, -1, hd).transpose(0, 1)  # [Hkv, L, D]
        vs = v[p.start : p.end].view(p.end - p.start, -1, hd).transpose(0, 1)
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=p.mask, scale=hd**-0.5, enable_gqa=ks.shape[0] != qs.shape[0]
        )  # [Hq, n_img, D]
        out[p.rows] = o.transpose(0, 1).reshape(len(p.rows), -1).to(out.dtype)


def _molmo2_image_prefill_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, head_dim: int
) -> None:
    return None


# A custom op mutating `out`: opaque to torch.compile (the step's plan is read when it runs).
_LIB = Library("molmo", "FRAGMENT")
direct_register_custom_op(
    "molmo2_image_prefill", _molmo2_image_prefill, mutates_args=["out"],
    fake_impl=_molmo2_image_prefill_fake, target_lib=_LIB,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


class Molmo2SelfAttention(nn.Module):
    """att_proj -> q/k RMSNorm (per head, or over all heads) -> RoPE -> paged attention ->
    attn_out."""

    def __init__(
        self,
        cfg: Molmo2TextConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
        layer: int,
    ):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        check_supported(cfg, tp)
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
        # Qwen3 normalizes each head's D values; OLMo the whole q (and k) row, before the
        # split into heads (TP is 1 then, so this rank holds every head).
        self.per_head_norm = cfg.qk_norm_type == "qwen3"
        q_width, k_width = (hd, hd) if self.per_head_norm else (self.q_size, self.kv_size)
        self.q_norm = RMSNorm(q_width, eps=cfg.layer_norm_eps) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(k_width, eps=cfg.layer_norm_eps) if cfg.use_qk_norm else None
        self.rotary_emb = get_rope(
            hd,
            max_position=cfg.max_position_embeddings,
            is_neox_style=True,  # rotate halves
            rope_parameters=rope_parameters(cfg, layer),
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
        if not self.per_head_norm:
            return norm(x.contiguous())  # [T, H * D], over all heads
        heads = x.view(*x.shape[:-1], x.shape[-1] // self.head_dim, self.head_dim)  # [T, H, D]
        return norm(heads).view(x.shape)  # [T, H * D]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.att_proj(x)  # [T, (Hq + 2 Hkv) * D / tp]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self._norm_heads(self.q_norm, q), self._norm_heads(self.k_norm, k)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v)  # [T, Hq * D]: causal (vLLM's backend), KV cache written
        # Ai2's bidirectional image prefill: a no-op unless this step prefills a whole prompt
        # with images (decode steps skip it in eager mode; compiled, the op returns at once).
        if torch.compiler.is_compiling() or _STEP_PLAN is not None:
            torch.ops.molmo.molmo2_image_prefill(q, k, v, o, self.head_dim)
        out, _ = self.attn_out(o)
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
    """Pre-norm (Qwen3): x += self_attn(attn_norm(x)); x += mlp(ff_norm(x)).
    Post-norm (OLMo 3, norm_after): x += attn_norm(self_attn(x)); x += ff_norm(mlp(x))."""

    def __init__(
        self,
        cfg: Molmo2TextConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        self.norm_after = cfg.norm_after
        self.self_attn = Molmo2SelfAttention(
            cfg, cache_config, quant_config, f"{prefix}.self_attn", extract_layer_index(prefix)
        )
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Molmo2MLP(cfg, quant_config, f"{prefix}.mlp")
        self.ff_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm_after:
            # The stream is x + residual (the previous block's last add is left to here, so
            # that pipeline stages pass the same pair as pre-norm blocks do).
            stream = x if residual is None else x + residual
            stream = stream + self.attn_norm(self.self_attn(positions, stream))
            return self.ff_norm(self.mlp(stream)), stream
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
        if residual is None:  # no block on this rank added anything
            return self.ln_f(x)
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
    # forward() gets the token ids too (beside the embeddings): they say which are image tokens.
    requires_raw_input_tokens = True

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
        if modality.startswith("video"):
            return "<|video|>"
        raise ValueError(f"molmo_vllm's Molmo 2 accepts images and video, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.model_config.hf_config  # vLLM's LoRA manager reads it
        self.molmo2_config = molmo2_config_of(self.config)
        text = self.molmo2_config.text
        self.image_token_ids = image_token_ids(self.molmo2_config)
        # The tower is skipped when images and video are off (limit 0), the decoder in
        # encoder-only mode.
        with (
            self._mark_language_model(vllm_config, targets=Molmo2Transformer),
            self._mark_tower_model(vllm_config, {"image", "video"}, targets=Molmo2VisionBackbone),
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
        """One tensor per image (video): [m_i, d], the features of its `<im_patch>` tokens in
        order. vLLM calls this once per modality."""
        if kwargs.get("pixel_values_videos") is not None:
            return self._video_features(kwargs)
        inputs = _image_inputs(kwargs)
        if inputs is None:
            return []
        num_tokens = inputs["image_num_tokens"].reshape(-1).cpu()
        patches = inputs["image_num_crops"].reshape(-1).cpu() * self.molmo2_config.vit.num_patches
        pixels = inputs["pixel_values"]  # [C, 729, 588]
        pooling = flat_token_pooling(inputs["image_token_pooling"].to(pixels.device), num_tokens, patches)
        feats = self.model.vision_backbone(pixels, pooling)  # [M, d]
        return list(feats.split(num_tokens.tolist()))

    def _video_features(self, kwargs: dict[str, object]) -> list[torch.Tensor]:
        """The reference's `video_features`, per video: pixel_values_videos [F, 729, 588],
        video_token_pooling [F * 81, 9] (each video's own frames), video_grids [n, 3]."""
        pixels = torch.as_tensor(kwargs["pixel_values_videos"])
        grids = torch.as_tensor(kwargs["video_grids"]).reshape(-1, 3).cpu()
        rows, patches = video_rows_and_patches(grids, pixels.shape[1])
        pooling = torch.as_tensor(kwargs["video_token_pooling"]).to(pixels.device)
        feats = self.model.vision_backbone(pixels, flat_token_pooling(pooling, rows, patches))
        return list(feats.split(rows.tolist()))

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
        global _STEP_PLAN
        _STEP_PLAN = self._image_prefill_plan(input_ids)
        try:
            return self.model.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)
        finally:
            _STEP_PLAN = None

    def _image_prefill_plan(self, input_ids: torch.Tensor | None) -> list[_SeqPlan] | None:
        """The sequences of this step that get Ai2's bidirectional image prefill, or None."""
        if input_ids is None or not is_forward_context_available():
            return None
        meta = get_forward_context().attn_metadata
        if not isinstance(meta, dict) or not meta:
            return None  # profiling / dummy runs (None), micro-batching (list): causal
        layer = self.model.transformer.blocks[self.model.transformer.start_layer]
        md = meta.get(layer.self_attn.attn.layer_name)
        if md is None or getattr(md, "max_query_len", 1) <= 1:
            return None  # decode only
        return image_prefill_plan(input_ids, md.query_start_loc, md.seq_lens, self.image_token_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---- weights ----
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads release-named tensors; raises naming every missing, unexpected or mis-shaped
        tensor."""
        from molmo_model.checkpoint import check_state_dict

        if isinstance(getattr(self.model, "vision_backbone", None), nn.Module):
            use_plain_gemm(self.model.vision_backbone)  # loaded before: weights to load into again
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
        if isinstance(self.model.vision_backbone, Molmo2VisionBackbone):
            use_engine_gemm(self.model.vision_backbone)  # vLLM's CPU GEMM for the tower
        return loaded
