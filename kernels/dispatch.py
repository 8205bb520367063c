"""Choosing between a Triton kernel, its PyTorch reference and (where an op has one) FlexAttention.

Every op in `kernels/` takes a `backend` argument:
- "auto" (the default): the Triton kernel on CUDA tensors, the PyTorch reference elsewhere, and
  for an op whose Triton fp32 path measured slower than its reference, the reference for fp32
  CUDA tensors too (the op passes `fp32_auto="torch"`; `MOLMO_KERNELS_FP32_TRITON=1` opts back
  into the Triton fp32 tiles);
- "triton" or "torch": force one;
- "flex": torch's FlexAttention with the op's mask (ops built on a mask only).

The environment variable `MOLMO_KERNELS_BACKEND` (same values) sets the default for a whole
process, e.g. `MOLMO_KERNELS_BACKEND=torch` to rule the kernels out while debugging. Set there,
"flex" applies to the ops that have it and means "auto" for the others; passed as `backend=` to
an op without it, it is an error.

Forcing "triton" on CPU tensors works only under Triton's interpreter (`TRITON_INTERPRET=1` set
before the kernel modules are imported), which is how the tests run the kernels without a GPU.
"""

from __future__ import annotations

import os

import torch

BACKEND_ENV = "MOLMO_KERNELS_BACKEND"
FP32_TRITON_ENV = "MOLMO_KERNELS_FP32_TRITON"
BACKENDS = ("auto", "triton", "torch", "flex")
_TRUE = ("1", "true", "on", "yes")


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


def fp32_triton_opted_in() -> bool:
    """True when `MOLMO_KERNELS_FP32_TRITON` asks "auto" for the Triton fp32 tiles everywhere."""
    return os.environ.get(FP32_TRITON_ENV, "0").lower() in _TRUE


def auto_backend(is_cuda: bool, dtype: torch.dtype, fp32_auto: str = "triton") -> str:
    """What "auto" picks for inputs on CUDA (or not) of `dtype`: "triton" or "torch".

    `fp32_auto` is the op's choice for fp32 CUDA inputs, the faster of its two paths as measured
    (see the op's docstring); `MOLMO_KERNELS_FP32_TRITON=1` overrides it with "triton"."""
    if not is_cuda:
        return "torch"
    if dtype == torch.float32 and not fp32_triton_opted_in():
        return fp32_auto
    return "triton"


def resolve_backend(
    backend: str | None, tensor: torch.Tensor, *, fp32_auto: str = "triton", has_flex: bool = False
) -> str:
    """Return "triton", "torch" or "flex" for an op whose inputs are like `tensor`.

    fp32_auto: what "auto" runs for fp32 CUDA inputs ("triton" or "torch").
    has_flex: whether the op has a FlexAttention path ("flex")."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    source = "backend" if backend is not None else BACKEND_ENV
    if choice not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    if choice == "flex" and not has_flex:
        if backend is not None:
            raise ValueError("backend 'flex' is available only for ops built on an attention mask "
                             "(annotation_attention)")
        choice = "auto"  # the process-wide setting names the ops that have it
    if choice == "auto":
        return auto_backend(tensor.is_cuda, tensor.dtype, fp32_auto)
    if choice == "triton" and not tensor.is_cuda and not triton_interpreting():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors (got {tensor.device}) or Triton's interpreter "
            "(TRITON_INTERPRET=1 set before importing kernels)"
        )
    return choice
