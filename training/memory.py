"""How much accelerator memory a training step needs, estimated from the model's shapes.

    python -m training.memory --preset molmo-7b-d --lora 16 --base-dtype bfloat16 \
        --batch-size 1 --seq-len 1024,2304 --gpu-gb 24,48,80

Four parts, in bytes (`MemoryEstimate`):

- frozen weights: parameters that do not train x their dtype's size (4 float32, 2 bfloat16);
- trainable state: parameters that train x 16 (float32 weight, gradient, AdamW's two moments);
- activations: what autograd keeps for the backward pass of one micro-batch of
  `batch_size` sequences of `seq_len` tokens (`activation_bytes`, formula below);
- `OVERHEAD_BYTES`: the CUDA context, library workspaces and allocator slack, a round figure.

Parameter counts are exact: the model (and its adapters) is built on the meta device from
the config. Activations are an estimate: they count, for each decoder layer and token, the
tensors our model (molmo_model/model.py) leaves for backward when gradients flow through
the layer, under bf16 autocast (a = 2 bytes per activation; 4 without autocast), with h the
hidden size, q = heads x head_dim, kv = KV heads x head_dim, m the MLP's hidden size (half
of the fused ff_proj), H the heads:

    always     8h (both RMSNorms' float32 inputs) + a(q + 2kv) (the fused QKV output, kept
               alive by v) + a(q + kv) (q, k after RoPE) + aq + 4H (attention output and
               log-sum-exp) + 2am (ff_proj's output, up and gate) + am (silu(gate))
    per linear a x in_features for its input, saved only when the linear trains (its
               weight, or a LoRA's A, needs it); + in_features (the dropout mask) when a LoRA
               with dropout wraps it; att_proj and ff_proj read h, attn_out q, ff_out m

A frozen linear keeps nothing (autograd saves an input only for a weight gradient). The
output head adds (a + 12) V per token (logits, float32 log-softmax and its gradients at
the loss's backward). With gradient checkpointing of every decoder block, each layer keeps
only its input (4h, or 2h with a bfloat16 base) and one layer's activations are live again
during its recomputation. The vision side keeps nothing unless gradients reach it (LoRA
targets `connector`/`vit`, or full training): then each ViT layer adds, per crop position,
8h + a(q + 2kv) + aq + 4H + 2am (+ the inputs of its trained linears), and the connector per
pooled token its attention pooling's q, k, v and the projector's three m-wide outputs.
Measured on one GPU by benchmarks/gpu_lora_7b.py; the 7B arithmetic is in docs/lora.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from molmo_model.config import MolmoConfig
from molmo_model.lora import DECODER_TARGETS, TARGETS, LoRAConfig, add_lora

GIB = 1024**3
OVERHEAD_BYTES = 2 * GIB  # CUDA context, cuBLAS/Triton workspaces, allocator slack (a round figure)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass
class MemoryEstimate:
    """The bytes of one training step (see the module docstring for what each part counts)."""

    total_params: int
    trainable_params: int
    frozen_bytes: int  # frozen weights
    trainable_bytes: int  # trainable weights + gradients + AdamW moments (16 bytes each)
    activation_bytes: int  # an estimate (module docstring)
    tokens: int  # per micro-batch
    overhead_bytes: int = OVERHEAD_BYTES

    @property
    def total_bytes(self) -> int:
        return self.frozen_bytes + self.trainable_bytes + self.activation_bytes + self.overhead_bytes

    def describe(self) -> str:
        """A line for the training log."""
        runtime = f" + {_size(self.overhead_bytes)} runtime" if self.overhead_bytes else ""
        return (f"memory (an estimate, training/memory.py): frozen weights {_size(self.frozen_bytes)}, "
                f"trainable weights + grads + AdamW {_size(self.trainable_bytes)}, activations "
                f"~{_size(self.activation_bytes)} for {self.tokens} tokens a micro-batch{runtime}: "
                f"~{_size(self.total_bytes)}")  # fmt: skip


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def parameter_counts(config: MolmoConfig, lora: LoRAConfig | None) -> tuple[int, int]:
    """(all parameters, trainable ones) of the model, with `lora`'s adapters when given (else
    every parameter trains). Built on the meta device: no memory, exact counts."""
    from molmo_model.model import MolmoForCausalLM

    with torch.device("meta"):
        model = MolmoForCausalLM(config)
        if lora is not None:
            add_lora(model, lora)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _linear_input(in_features: int, trained: bool, a: int, dropout_mask: bool) -> int:
    """Bytes a linear layer keeps for backward, per token: its input when it trains."""
    return (a * in_features + (in_features if dropout_mask else 0)) if trained else 0


def decoder_layer_bytes(config: MolmoConfig, trains: set[str], a: int, dropout_mask: bool) -> int:
    """Bytes one decoder layer keeps for backward, per token (module docstring). `trains`:
    which of its linears (att_proj, attn_out, ff_proj, ff_out) train."""
    llm = config.llm
    h, heads, d = llm.hidden_size, llm.num_attention_heads, llm.head_dim
    q, kv, m = heads * d, llm.num_key_value_heads * d, llm.mlp_hidden_size
    always = 8 * h + a * (q + 2 * kv) + a * (q + kv) + a * q + 4 * heads + 2 * a * m + a * m
    ins = {"att_proj": h, "attn_out": q, "ff_proj": h, "ff_out": m}
    return always + sum(_linear_input(n, name in trains, a, dropout_mask) for name, n in ins.items())


def vision_bytes(config: MolmoConfig, vit: bool, connector: bool, a: int, dropout_mask: bool) -> int:
    """Bytes the vision side keeps for backward, per image (all its crops): the ViT layers'
    when `vit` trains, the connector's when it or the ViT trains (module docstring)."""
    if not (vit or connector):
        return 0
    v, geo = config.vision, config.preprocess
    crops = geo.max_crops + 1  # the high-res crops and the global view, at most
    h, heads, d = v.image_emb_dim, v.image_num_heads, v.image_head_dim
    q, kv, m = heads * d, v.image_num_key_value_heads * d, v.image_mlp_dim
    total = 0
    if vit:
        per_token = 8 * h + a * (q + 2 * kv) + a * q + 4 * heads + 2 * a * m
        per_token += sum(_linear_input(n, True, a, dropout_mask) for n in (h, h, h, q, h, m))
        layers = max(i % v.image_num_layers for i in v.vit_layers) + 1  # blocks after the last kept one do not run
        total += crops * geo.num_positions * layers * per_token
    pooled, k = v.pooled_dim, geo.pooling_size**2
    inner, mm = heads * d, config.llm.mlp_hidden_size
    per_pooled = a * inner * (1 + 2 * k) + 3 * a * mm  # pooling q, k, v; projector w1, silu, w3 outputs
    per_pooled += sum(_linear_input(n, True, a, dropout_mask)
                      for n in (pooled, k * pooled, k * pooled, inner, h, h, mm))  # fmt: skip
    return total + crops * geo.tokens_per_side**2 * per_pooled


def estimate_memory(
    config: MolmoConfig, lora: LoRAConfig | None, base_dtype: str, batch_size: int, seq_len: int,
    bf16_autocast: bool = True, grad_checkpointing: bool = False,
) -> MemoryEstimate:  # fmt: skip
    """One training step of `config` with `lora` (None: every parameter trains, in float32)
    on micro-batches of `batch_size` images, each a sequence of `seq_len` tokens."""
    if base_dtype not in DTYPE_BYTES:
        raise ValueError(f"base_dtype must be one of {sorted(DTYPE_BYTES)}, got {base_dtype!r}")
    total, trainable = parameter_counts(config, lora)
    a = 2 if bf16_autocast else 4
    targets = set(TARGETS) if lora is None else set(lora.targets)
    mask = lora is not None and lora.dropout > 0
    tokens = batch_size * seq_len
    llm = config.llm
    layer = decoder_layer_bytes(config, targets & set(DECODER_TARGETS), a, mask)
    if lora is None:
        layer += 8 * llm.hidden_size  # RMSNorm weights train: their normalized inputs, float32
    if grad_checkpointing:
        residual = 2 if base_dtype == "bfloat16" else 4
        decoder = llm.num_hidden_layers * residual * llm.hidden_size + layer
    else:
        decoder = llm.num_hidden_layers * layer
    logits = (a + 12) * llm.embedding_size
    vision = vision_bytes(config, "vit" in targets, "connector" in targets, a, mask) * batch_size
    weight_bytes = DTYPE_BYTES[base_dtype] if lora is not None else 4
    return MemoryEstimate(
        total_params=total, trainable_params=trainable, frozen_bytes=(total - trainable) * weight_bytes,
        trainable_bytes=16 * trainable, activation_bytes=tokens * (decoder + logits) + vision, tokens=tokens,
    )  # fmt: skip


# ---------------------------------------------------------------- the table


def table(config: MolmoConfig, lora: LoRAConfig | None, base_dtype: str, batch_sizes: list[int],
          seq_lens: list[int], gpus_gb: list[float], grad_checkpointing: bool) -> str:  # fmt: skip
    """A Markdown table: one row per (batch, sequence length), whether it fits each card."""
    first = estimate_memory(config, lora, base_dtype, 1, 1)
    what = (f"LoRA rank {lora.rank} on {','.join(lora.targets)}" if lora else "full fine-tuning (float32 master weights)")
    lines = [f"{what}, base {base_dtype if lora else 'float32'}, bf16 autocast"
             f"{', gradient checkpointing' if grad_checkpointing else ''}: {first.trainable_params:,} trainable "
             f"of {first.total_params:,} parameters ({100 * first.trainable_params / first.total_params:.2f}%)",
             "",
             "| batch x seq | frozen GiB | trainable+grad+Adam GiB | activations GiB | total GiB (+2 runtime) | "
             + " | ".join(f"{g:g} GB" for g in gpus_gb) + " |",
             "|---" * (5 + len(gpus_gb)) + "|"]  # fmt: skip
    for b in batch_sizes:
        for s in seq_lens:
            e = estimate_memory(config, lora, base_dtype, b, s, grad_checkpointing=grad_checkpointing)
            fits = ["fits" if e.total_bytes <= g * 1e9 else "no" for g in gpus_gb]
            lines.append(f"| {b} x {s} | {e.frozen_bytes / GIB:.1f} | {e.trainable_bytes / GIB:.2f} | "
                         f"{e.activation_bytes / GIB:.1f} | {e.total_bytes / GIB:.1f} | " + " | ".join(fits) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from molmo_model.config import PRESETS, get_preset

    p = argparse.ArgumentParser(prog="python -m training.memory", description="Estimated memory of a training step.")
    p.add_argument("--preset", default="molmo-7b-d", help=f"model shape: {', '.join(sorted(PRESETS))}")
    p.add_argument("--model", metavar="CKPT", help="a checkpoint folder's config.json instead of a preset")
    p.add_argument("--lora", type=int, default=16, metavar="RANK", help="adapter rank; 0 = full fine-tuning")
    p.add_argument("--lora-targets", default=",".join(DECODER_TARGETS))
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--base-dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--batch-size", default="1", help="images per micro-batch, comma-separated")
    p.add_argument("--seq-len", default="2304", help="tokens per sequence, comma-separated")
    p.add_argument("--gpu-gb", default="24,48,80", help="card sizes (GB) to check, comma-separated")
    p.add_argument("--grad-checkpointing", action="store_true", help="as if every decoder block were recomputed")
    a = p.parse_args(argv)
    try:
        if a.model:
            config = MolmoConfig.load(a.model)
        elif a.preset in PRESETS:
            config = get_preset(a.preset)
        else:
            raise ValueError(f"--preset {a.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        ints = {name: [int(x) for x in getattr(a, name).split(",")] for name in ("batch_size", "seq_len")}
        gpus = [float(x) for x in a.gpu_gb.split(",")]
        if a.lora < 0 or min(ints["batch_size"] + ints["seq_len"]) < 1:
            raise ValueError("--lora must be >= 0, --batch-size and --seq-len >= 1")
        lora = None
        if a.lora:
            targets = tuple(t.strip() for t in a.lora_targets.split(",") if t.strip())
            lora = LoRAConfig(rank=a.lora, alpha=2.0 * a.lora, dropout=a.lora_dropout, targets=targets)
    except (ValueError, OSError) as e:
        print(f"training.memory: {e}", file=sys.stderr)
        return 2
    print(table(config, lora, a.base_dtype, ints["batch_size"], ints["seq_len"], gpus, a.grad_checkpointing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
