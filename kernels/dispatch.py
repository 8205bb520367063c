"""Choosing between a Triton kernel and its PyTorch reference.

Every op in `kernels/` takes a `backend` argument: "auto" (the default) runs the Triton kernel on
CUDA tensors and the PyTorch reference elsewhere; "triton" or "torch" force one. The environment
variable `MOLMO_KERNELS_BACKEND` (same three values) sets the default for a whole process, e.g.
`MOLMO_KERNELS_BACKEND=torch` to rule the kernels out while debugging.

Forcing "triton" on CPU tensors works only under Triton's interpreter (`TRITON_INTERPRET=1` set
before the kernel modules are imported), which is how the tests run the kernels without a GPU.
"""

from __future__ import annotations

import os

import torch

BACKEND_ENV = "MOLMO_KERNELS_BACKEND"
BACKENDS = ("auto", "triton", "torch")


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op whose inputs live where `tensor` lives."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        source = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if choice == "triton" and not tensor.is_cuda and not triton_interpreting():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors (got {tensor.device}) or Triton's interpreter "
            "(TRITON_INTERPRET=1 set before importing kernels)"
        )
    return choice
