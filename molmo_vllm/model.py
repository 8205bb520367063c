"""Molmo as a vLLM model: our vision backbone + a decoder built from vLLM's paged layers.

The vision tower and connector are `molmo_model.vision.MolmoVisionBackbone`, reused as it
is (its attention pooling calls `kernels.attention_pool`). The decoder is written with vLLM's
tensor-parallel layers so that it runs on vLLM's paged KV cache:

    Ai2 module (checkpoint)            vLLM layer here
    transformer.wte (+new_embedding)   VocabParallelEmbedding [embedding_size + 128, d]
    blocks.i.att_proj (bias)           QKVParallelLinear, then get_rope (NeoX) + Attention
    blocks.i.attn_out                  RowParallelLinear
    blocks.i.attn_norm / ff_norm       RMSNorm (fused residual add)
    blocks.i.ff_proj -> (x, gate)      MergedColumnParallelLinear in Ai2's (x, gate) order + MulAndSilu
    blocks.i.ff_out                    RowParallelLinear
    transformer.ln_f                   RMSNorm
    transformer.ff_out (untied head)   ParallelLMHead + LogitsProcessor over embedding_size

Module names mirror Ai2's (`transformer.blocks.0.att_proj`, `vision_backbone.image_vit...`),
so the weight table (`_SPECIAL_WEIGHTS`) is short: strip the leading `model.` and concatenate
the two embedding tables. Loading is strict: every checkpoint tensor
is checked against the shapes of the PyTorch reference model built from the same config,
and any missing, unexpected or mis-shaped tensor raises an error naming it.

As in Ai2's code (and our reference model), image features are ADDED to the embeddings of
the `<im_patch>` tokens; they do not replace them. Processor side: molmo_vllm/processor.py.
Registered with vLLM by `molmo_vllm.register()`.

Pipeline parallelism (vLLM's `SupportsPP`): the blocks are split over the ranks
(`make_layers`; the others are PPMissingLayer), hidden states and the residual travel between
them as IntermediateTensors, and the vision tower is built on the first rank only, which is
where vLLM runs the encoder. The embedding table, ln_f and the head are built on every rank
(as vLLM's built-in Molmo does) and used on the first and last.

LoRA (vLLM's `SupportsLoRA`): the decoder's att_proj, attn_out, ff_proj and ff_out take
adapters in PEFT's format as molmo_model/lora.py writes them (and as PEFT names an adapter of
Ai2's HF model): `hf_to_vllm_mapper` strips the leading `model.` of the adapter's module
paths, and the fused QKV and (x, gate) projections are declared as single packed modules,
so an adapter's fused lora_B rows land as Ai2's layout has them. That is why ff_proj keeps
Ai2's half order here (MulAndSilu = x * silu(gate)) instead of swapping the halves at load
time for SiluAndMul: a swapped layer would need every adapter's lora_B swapped too. The
vision tower and connector are plain PyTorch (molmo_model.vision) and take no adapters in
vLLM: adapters of them are merged into a checkpoint instead (`molmo export --merge-lora`).

int4 checkpoints (`molmo quantize`, molmo_model/quantize.py: GPTQ's layout, named in
config.json's `quantization_config`): vLLM's GPTQ method gives the decoder blocks' linear
layers qweight/qzeros/scales parameters (its CPU WNA16 kernel here, Marlin on CUDA); the
expected table then lists those four tensors per layer instead of `.weight` (g_idx is checked
to be the trivial grouping and not loaded: the kernels have no activation order), and
ff_proj's halves are its columns there. The head, embeddings and vision tower stay float.

The model supports vLLM's `mm_device_do_normalize` (so vLLM turns it on by default): the
processor then sends raw uint8 crops and `embed_multimodal` normalises them on the device
with the checkpoint's mean/std; float32 crops (the exact path) are taken as they are.
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
    WeightsMapper,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from molmo_model.config import LLMConfig, MolmoConfig
from molmo_model.fast_preprocessing import normalize_uint8
from molmo_model.quantize import QuantSpec, dtype_problems, g_idx_problems, quantized_shapes
from molmo_model.vision import MolmoVisionBackbone, add_image_features
from molmo_vllm.config import molmo_config_of
from molmo_vllm.engine_gemm import use_engine_gemm, use_plain_gemm
from molmo_vllm.processor import (
    MolmoDummyInputsBuilder,
    MolmoMultiModalProcessor,
    MolmoProcessingInfo,
)


class MolmoImageKwargs(TypedDict):
    """What the processor hands the model for a batch of images (crops concatenated).

    images:          [C, 576, 588]  patches of every crop of every image: CLIP-normalized
                                    float (exact path) or raw uint8 RGB (fast path)
    image_masks:     [C, 576]       image fraction per patch, rows as the mask rule lays them out
    patch_order:     [M]            per image, in token order, index of each <im_patch>
                                    token's feature in that image's pooled features [c_i * 144]
    num_crops:       [n_images]     c_i
    num_patches:     [n_images]     number of <im_patch> tokens of image i
    """

    images: torch.Tensor
    image_masks: torch.Tensor
    patch_order: torch.Tensor
    num_crops: torch.Tensor
    num_patches: torch.Tensor


def _image_inputs(kwargs: dict[str, object]) -> MolmoImageKwargs | None:
    """The processor's fields out of vLLM's keyword arguments (None for a text-only batch)."""
    if kwargs.get("images") is None:
        return None
    inputs = {name: kwargs[name] for name in MolmoImageKwargs.__annotations__}
    inputs["num_crops"] = torch.as_tensor(inputs["num_crops"])
    inputs["num_patches"] = torch.as_tensor(inputs["num_patches"])
    for name, value in inputs.items():
        assert isinstance(value, torch.Tensor), f"{name} is {type(value).__name__}"
    return MolmoImageKwargs(**inputs)


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


class MolmoBlock(nn.Module):
    """Pre-norm block: x += attn_out(attn(rope(att_proj(attn_norm(x)))));
    x += ff_out(act(ff_proj(ff_norm(x))))."""

    def __init__(
        self,
        cfg: LLMConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if cfg.num_attention_heads % tp:
            raise ValueError(
                f"num_attention_heads={cfg.num_attention_heads} is not divisible by the "
                f"tensor-parallel size {tp}"
            )
        self.head_dim = cfg.head_dim
        num_heads = cfg.num_attention_heads // tp
        num_kv_heads = max(1, cfg.num_key_value_heads // tp)  # replicated when kv < tp
        self.q_size = num_heads * self.head_dim
        self.kv_size = num_kv_heads * self.head_dim

        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.att_proj = QKVParallelLinear(
            cfg.hidden_size,
            self.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=cfg.qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.att_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=cfg.max_position_embeddings,
            is_neox_style=True,  # Qwen2 / Molmo rotate halves, not interleaved pairs
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        )
        self.attn = Attention(
            num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )
        self.attn_out = RowParallelLinear(
            cfg.num_attention_heads * self.head_dim,
            cfg.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.attn_out",
        )

        self.ff_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # Shard 0 holds Ai2's x half and shard 1 its gate half, as the checkpoint (and a LoRA's
        # lora_B) lays them out; MulAndSilu's first * silu(second) is Ai2's x * silu(gate).
        self.ff_proj = MergedColumnParallelLinear(
            cfg.hidden_size,
            [cfg.mlp_hidden_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.ff_proj",
        )
        self.act = MulAndSilu()
        self.ff_out = RowParallelLinear(
            cfg.mlp_hidden_size,
            cfg.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.ff_out",
        )

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # vLLM's RMSNorm(x, residual) returns (norm(x + residual), x + residual).
        if residual is None:
            residual, x = x, self.attn_norm(x)
        else:
            x, residual = self.attn_norm(x, residual)
        qkv, _ = self.att_proj(x)  # [T, (Hq + 2 Hkv) * D / tp]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        x, _ = self.attn_out(self.attn(q, k, v))
        x, residual = self.ff_norm(x, residual)
        up, _ = self.ff_proj(x)  # [T, 2 * mlp_hidden / tp]
        x, _ = self.ff_out(self.act(up))
        return x, residual


# Token-count dimensions vary between steps (annotations are strings here, so name them).
@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": {0: "tokens"},
        "positions": {-1: "tokens"},
        "intermediate_tensors": {0: "tokens"},
        "inputs_embeds": {0: "tokens"},
    }
)
class MolmoTransformer(nn.Module):
    """The decoder: `wte`, `blocks`, `ln_f`; also owns the untied head `ff_out` (used by
    `MolmoForCausalLM.compute_logits`, not by `forward`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = molmo_config_of(vllm_config.model_config.hf_config).llm
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        self.cfg = cfg
        self.wte = VocabParallelEmbedding(
            cfg.total_vocab_size, cfg.hidden_size, quant_config=quant_config, prefix=f"{prefix}.wte"
        )
        # This rank's blocks [start, end); the others are PPMissingLayer (pipeline parallelism).
        self.start_layer, self.end_layer, self.blocks = make_layers(
            cfg.num_hidden_layers,
            lambda prefix: MolmoBlock(cfg, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.blocks",
        )
        self.ln_f = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ff_out = ParallelLMHead(
            cfg.embedding_size,
            cfg.hidden_size,
            quant_config=quant_config,
            prefix=f"{prefix}.ff_out",
        )
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], cfg.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

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
        else:  # the previous stage's output
            assert intermediate_tensors is not None
            x, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for block in self.blocks[self.start_layer : self.end_layer]:
            x, residual = block(positions, x, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": x, "residual": residual})
        x, _ = self.ln_f(x, residual)
        return x


# ---------------------------------------------------------------------------------------------
# Weight table: Ai2 checkpoint names -> this module's parameters.
# ---------------------------------------------------------------------------------------------

_EMBEDDING = "model.transformer.wte.embedding"
_NEW_EMBEDDING = "model.transformer.wte.new_embedding"
# Tensors that do not map one-to-one: the two embedding tables become one parameter.
_SPECIAL_WEIGHTS = {
    _EMBEDDING: "transformer.wte.weight",
    _NEW_EMBEDDING: "transformer.wte.weight",
}


def vllm_param_name(ai2_name: str) -> str:
    """Ai2 weight name -> parameter name in `MolmoForCausalLM` below."""
    if ai2_name in _SPECIAL_WEIGHTS:
        return _SPECIAL_WEIGHTS[ai2_name]
    if not ai2_name.startswith("model."):
        return ai2_name  # unknown: reported as unexpected by the caller
    return ai2_name[len("model.") :]


def _is_ff_proj(ai2_name: str) -> bool:
    return ai2_name.startswith("model.transformer.blocks.") and ".ff_proj." in ai2_name


def expected_checkpoint_shapes(
    config: MolmoConfig, quant: QuantSpec | None = None
) -> dict[str, torch.Size]:
    """Ai2 name -> shape, from the PyTorch reference model built on the meta device; for an
    int4 checkpoint (`quant`), the quantized layers' qweight/qzeros/scales/g_idx instead of
    their `.weight` (molmo_model/quantize.py)."""
    from molmo_model.model import MolmoForCausalLM as ReferenceModel

    with torch.device("meta"):
        ref = ReferenceModel(config)
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    return shapes if quant is None else quantized_shapes(shapes, quant)[0]


def checkpoint_quant_spec(hf_config: object) -> QuantSpec | None:
    """The int4 layout named by config.json's `quantization_config` (None: a float checkpoint;
    an online method such as `--quantization fp8` leaves the checkpoint's tensors float)."""
    qc = getattr(hf_config, "quantization_config", None)
    return None if qc is None else QuantSpec.from_hf(dict(qc))


# ---------------------------------------------------------------------------------------------
# The vLLM model
# ---------------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(
    MolmoMultiModalProcessor, info=MolmoProcessingInfo, dummy_inputs=MolmoDummyInputsBuilder
)
class MolmoForCausalLM(nn.Module, SupportsMultiModal, SupportsLoRA, SupportsPP):
    supports_mm_device_do_normalize = True  # uint8 crops, normalised in embed_multimodal
    # LoRA: the fused projections are one adapter module each (PEFT adapts them fused).
    packed_modules_mapping = {"att_proj": ["att_proj"], "ff_proj": ["ff_proj"]}
    embedding_modules: dict[str, str] = {}
    # Adapter module paths are Ai2's (`model.transformer.blocks.0.att_proj`); ours lack `model.`.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.": ""})

    def get_mm_mapping(self) -> MultiModelKeys:
        """The language model takes adapters; the tower and connector are named for vLLM's
        LoRA manager, which gives them none (they are not vLLM layers)."""
        return MultiModelKeys.from_string_field(
            language_model="transformer",
            connector="vision_backbone.image_projector",
            tower_model="vision_backbone",
        )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<|image|>"
        raise ValueError(f"Molmo accepts images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.model_config.hf_config  # vLLM's LoRA manager reads it
        self.molmo_config = molmo_config_of(self.config)
        cfg = self.molmo_config.llm
        with self._mark_tower_model(vllm_config, "image"):
            # vLLM runs the encoder on the first pipeline stage only.
            first = get_pp_group().is_first_rank
            self.vision_backbone = MolmoVisionBackbone(self.molmo_config) if first else PPMissingLayer()
        with self._mark_language_model(vllm_config):
            self.transformer = MolmoTransformer(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer")
            )
        self.logits_processor = LogitsProcessor(cfg.embedding_size)
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors
        self.tokens_per_crop = self.molmo_config.preprocess.tokens_per_side**2

    # ---- images ----
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One tensor per image: [num_patches_i, d], the features of its `<im_patch>` tokens
        in token order."""
        inputs = _image_inputs(kwargs)
        if inputs is None:
            return []
        num_crops = [int(n) for n in inputs["num_crops"].reshape(-1)]
        num_patches = [int(n) for n in inputs["num_patches"].reshape(-1)]
        images = inputs["images"]  # [C, 576, 588]
        if images.dtype == torch.uint8:  # the fast path: normalise here, on the device
            pre = self.molmo_config.preprocess
            dtype = self.vision_backbone.pad_embed.dtype
            images = normalize_uint8(images, pre.image_mean, pre.image_std, dtype)
        feats = self.vision_backbone(images, inputs["image_masks"])  # [C, 144, d]
        out = []
        orders = inputs["patch_order"].split(num_patches)
        for f, o in zip(feats.split(num_crops), orders, strict=True):
            out.append(f.flatten(0, 1)[o.to(f.device)])  # [c_i * 144, d] -> [num_patches_i, d]
        return out

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.transformer.embed_input_ids(input_ids)  # [T, d]
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
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.transformer.ff_out, hidden_states)

    # ---- weights ----
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads Ai2-named tensors; raises ValueError naming every missing, unexpected or
        mis-shaped tensor."""
        from molmo_model.checkpoint import check_state_dict

        if isinstance(getattr(self, "vision_backbone", None), nn.Module):
            use_plain_gemm(self.vision_backbone)  # loaded before: weights to load into again
        quant = checkpoint_quant_spec(self.config)
        expected = expected_checkpoint_shapes(self.molmo_config)
        kinds: dict[str, str] = {}  # int4 tensors: "int32" or "float"
        if quant is not None:
            expected, kinds = quantized_shapes(expected, quant)
        params = dict(self.named_parameters())
        found: dict[str, torch.Size] = {}
        wrong_dtypes: list[str] = []
        tables: dict[str, torch.Tensor] = {}
        loaded: set[str] = set()
        for name, w in weights:
            found[name] = w.shape
            if name not in expected or tuple(expected[name]) != tuple(w.shape):
                continue  # reported below
            if name in kinds:
                problems = dtype_problems(kinds, {name: w.dtype})
                if name.endswith(".g_idx") and not problems:
                    # vLLM's GPTQ kernels have no g_idx (no activation order): check, not load.
                    problems = g_idx_problems({name: w}, quant)
                wrong_dtypes += problems
                if problems or name.endswith(".g_idx"):
                    continue
            if name in (_EMBEDDING, _NEW_EMBEDDING):
                tables[name] = w
                continue
            target = vllm_param_name(name)
            if target not in params:
                # The vision tower is not built when images are disabled (limit 0) nor on a
                # later pipeline stage; another stage's blocks are not built here.
                if target.startswith("vision_backbone.") or is_pp_missing_parameter(target, self):
                    continue
                raise ValueError(f"checkpoint tensor {name} has no parameter {target}")
            p = params[target]
            if _is_ff_proj(name):
                # Float weight [2h, d]: the halves are rows. int4 qweight [d/8, 2h], scales
                # [groups, 2h], qzeros [groups, 2h/8]: the halves are columns.
                x_half, gate_half = w.chunk(2, dim=0 if name.endswith(".weight") else 1)
                p.weight_loader(p, x_half, 0)
                p.weight_loader(p, gate_half, 1)
            else:
                getattr(p, "weight_loader", default_weight_loader)(p, w)
            loaded.add(target)
        check_state_dict(expected, found, "given to vLLM", wrong_dtypes)
        wte = params["transformer.wte.weight"]
        wte.weight_loader(wte, torch.cat([tables[_EMBEDDING], tables[_NEW_EMBEDDING]], dim=0))
        loaded.add("transformer.wte.weight")
        not_loaded = sorted(set(params) - loaded)
        if not_loaded:
            raise ValueError(
                "parameters not initialized from the checkpoint: " + ", ".join(not_loaded)
            )
        if isinstance(getattr(self, "vision_backbone", None), MolmoVisionBackbone):
            use_engine_gemm(self.vision_backbone)  # vLLM's CPU GEMM for the tower
        return loaded
