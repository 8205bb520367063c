"""Tests of `kernels/`: the references and the mask rule here, the Triton kernels in a child.

The PyTorch references, the annotation mask rule, input checks and the dispatch are tested in
this process. The Triton kernels are compared with the references by
`tests/kernel_cases/kernel_vs_reference.py`, which `test_triton_kernels_match_references` runs
in a child pytest process: with `TRITON_INTERPRET=1` on every machine (the kernels then run on the
CPU in Triton's interpreter, ~30-60 s on 2 cores), and natively where CUDA exists. A child is
needed because the interpreter is picked when a kernel module is imported, and other test files
of this session may import `kernels` first.

Run: PYTHONPATH=. python -m pytest tests/test_kernels.py
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kernels.annotation_attention import (
    annotation_attention,
    annotation_attention_reference,
    annotation_mask,
)
from kernels.annotation_flex import annotation_attention_flex, annotation_block_mask
from kernels.attention_pool import attention_pool, attention_pool_reference
from kernels.dispatch import (
    BACKEND_ENV,
    FP32_TRITON_ENV,
    auto_backend,
    resolve_backend,
    triton_interpreting,
)
from training.config import run_preset

REPO = Path(__file__).resolve().parents[1]
KERNEL_CASES = REPO / "tests" / "kernel_cases" / "kernel_vs_reference.py"
FRONTIER = REPO / "benchmarks" / "kernels_frontier.py"


def _randn(*shape: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


# ------------------------------------------------------------------------ the mask rule


def test_annotation_mask_hand_written_case():
    # BOS+image (0 0), annotation 1 (1 1), annotation 2 (2 2), padding (-1).
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    want = torch.tensor(
        [
            # keys: 0  0  1  1  2  2 -1
            [1, 0, 0, 0, 0, 0, 0],  # prefix: causal over the prefix
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],  # annotation 1: prefix + itself, causally
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],  # annotation 2: prefix + itself, never annotation 1
            [1, 1, 0, 0, 1, 1, 0],
            [1, 1, 0, 0, 0, 0, 0],  # padding query: the prefix only; no query sees padding keys
        ],
        dtype=torch.bool,
    )
    assert torch.equal(annotation_mask(seg)[0], want)


def test_annotation_mask_padding_and_empty_rows():
    seg = torch.tensor([[-1, -1, 0, 1, 1, -1], [1, 1, 2, 2, 2, 2]])
    mask = annotation_mask(seg)
    assert mask.shape == (2, 6, 6)
    assert not mask[0, :, [0, 1, 5]].any()  # padding keys are never seen
    assert not mask[0, 0].any() and not mask[0, 1].any()  # leading padding sees nothing
    assert torch.equal(mask[1, 5], torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool))
    assert torch.equal(mask[1, 1], torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool))


# ------------------------------------------------------------- annotation_attention_reference


@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)])
@pytest.mark.parametrize("seg_row", [[0] * 12, [0] * 5 + [1] * 7])
def test_reference_single_annotation_is_causal(hq, hkv, seg_row):
    """One annotation after the prefix (or none) is plain causal attention."""
    b, s, d = 2, 12, 16
    q, k, v = (
        _randn(b, hq, s, d, seed=1),
        _randn(b, hkv, s, d, seed=2),
        _randn(b, hkv, s, d, seed=3),
    )
    seg = torch.tensor([seg_row] * b)
    got = annotation_attention_reference(q, k, v, seg)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want)


def test_reference_annotations_do_not_see_each_other():
    """Changing annotation 1's keys/values leaves the prefix and annotation 2 unchanged."""
    b, h, s, d = 1, 2, 10, 8
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2, 2]])
    q, k, v = _randn(b, h, s, d, seed=1), _randn(b, h, s, d, seed=2), _randn(b, h, s, d, seed=3)
    out = annotation_attention_reference(q, k, v, seg)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 3:6] += 5.0
    v2[:, :, 3:6] -= 5.0
    out2 = annotation_attention_reference(q, k2, v2, seg)
    torch.testing.assert_close(out2[:, :, :3], out[:, :, :3])
    torch.testing.assert_close(out2[:, :, 6:], out[:, :, 6:])
    assert not torch.allclose(out2[:, :, 3:6], out[:, :, 3:6])


def test_reference_matches_explicit_masked_softmax():
    b, hq, hkv, s, d = 2, 4, 2, 9, 8
    seg = torch.tensor([[0, 0, 1, 1, 2, 1, 3, -1, -1], [0, 1, 2, 2, 2, 3, 3, 3, 3]])
    q, k, v = (
        _randn(b, hq, s, d, seed=4),
        _randn(b, hkv, s, d, seed=5),
        _randn(b, hkv, s, d, seed=6),
    )
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # head h reads kv h // 2
    scores = q @ kk.transpose(-1, -2) / d**0.5  # [B, Hq, S, S]
    scores = scores.masked_fill(~annotation_mask(seg)[:, None], float("-inf"))
    want = scores.softmax(-1) @ vv
    torch.testing.assert_close(annotation_attention_reference(q, k, v, seg), want)


def test_reference_rows_that_see_nothing_are_zero_with_zero_grads():
    b, h, s, d = 1, 2, 6, 8
    seg = torch.tensor([[-1, -1, 0, 0, 1, -1]])  # rows 0, 1 see no key; row 5 sees the prefix
    q, k, v = (_randn(b, h, s, d, seed=i, requires_grad=True) for i in range(3))
    out = annotation_attention_reference(q, k, v, seg)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all()
    assert out[:, :, :2].abs().max() == 0
    assert q.grad[:, :, :2].abs().max() == 0
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    # Keys of padding are seen by no one, so they get no gradient.
    assert k.grad[:, :, [0, 1, 5]].abs().max() == 0 and v.grad[:, :, [0, 1, 5]].abs().max() == 0


# ---------------------------------------------------------------- attention_pool_reference


@pytest.mark.parametrize("k_win", [1, 2, 4])
def test_attention_pool_reference_matches_sdpa(k_win):
    n, h, d = 5, 3, 16
    q, k, v = (
        _randn(n, h, d, seed=1),
        _randn(n, k_win, h, d, seed=2),
        _randn(n, k_win, h, d, seed=3),
    )
    want = F.scaled_dot_product_attention(
        q[:, :, None],
        k.transpose(1, 2),
        v.transpose(1, 2),  # [N, H, 1, D] over [N, H, K, D]
    )[:, :, 0]
    torch.testing.assert_close(attention_pool_reference(q, k, v), want)


def test_attention_pool_reference_keeps_dtype_and_has_grads():
    q, k, v = (
        _randn(*s, seed=i).half().requires_grad_()
        for i, s in enumerate([(3, 2, 16), (3, 4, 2, 16), (3, 4, 2, 16)])
    )
    out = attention_pool_reference(q, k, v)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (k, v))


# ----------------------------------------------------------------- input checks and dispatch


@pytest.mark.parametrize(
    "shapes, field",
    [
        (((3, 2, 16), (3, 4, 2, 16), (3, 4, 2, 8)), "v"),
        (((3, 2, 8), (3, 4, 2, 16), (3, 4, 2, 16)), "q"),
        (((3, 16), (3, 4, 2, 16), (3, 4, 2, 16)), "q"),
        (((3, 2, 16), (3, 2, 16), (3, 2, 16)), "k"),
    ],
)
def test_attention_pool_rejects_bad_shapes(shapes, field):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=f"^{field} "):
        attention_pool(q, k, v)


@pytest.mark.parametrize(
    "q_shape, kv_shape, seg_shape, field",
    [
        ((1, 4, 8, 16), (1, 3, 8, 16), (1, 8), "q's heads"),
        ((1, 4, 8, 16), (1, 2, 9, 16), (1, 8), "k "),
        ((1, 4, 8, 16), (1, 2, 8, 16), (1, 9), "segment_ids"),
        ((4, 8, 16), (1, 2, 8, 16), (1, 8), "q "),
    ],
)
def test_annotation_attention_rejects_bad_shapes(q_shape, kv_shape, seg_shape, field):
    q, k, v = torch.zeros(q_shape), torch.zeros(kv_shape), torch.zeros(kv_shape)
    with pytest.raises(ValueError, match=f"^{field}"):
        annotation_attention(q, k, v, torch.zeros(seg_shape, dtype=torch.long))


def test_annotation_attention_rejects_float_segment_ids():
    q = torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        annotation_attention(q, q, q, torch.zeros(1, 4))


def test_cpu_tensors_dispatch_to_the_reference(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    q, k, v = _randn(3, 2, 16, seed=1), _randn(3, 4, 2, 16, seed=2), _randn(3, 4, 2, 16, seed=3)
    assert torch.equal(attention_pool(q, k, v), attention_pool_reference(q, k, v))
    seg = torch.tensor([[0, 0, 1, 1, 2]])
    q4, k4 = _randn(1, 2, 5, 16, seed=4), _randn(1, 1, 5, 16, seed=5)
    assert torch.equal(
        annotation_attention(q4, k4, k4, seg), annotation_attention_reference(q4, k4, k4, seg)
    )


def test_backend_is_validated(monkeypatch):
    q, k = torch.zeros(3, 2, 16), torch.zeros(3, 4, 2, 16)
    with pytest.raises(ValueError, match="^backend must be one of"):
        attention_pool(q, k, k, backend="cuda")
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=f"^{BACKEND_ENV} must be one of"):
        attention_pool(q, k, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_dispatch_by_device_and_dtype(monkeypatch, dtype):
    monkeypatch.delenv(FP32_TRITON_ENV, raising=False)
    fp32 = dtype == torch.float32
    assert auto_backend(False, dtype, "torch") == "torch"  # off CUDA: always the reference
    assert auto_backend(True, dtype) == "triton"  # an op whose Triton fp32 path is the faster
    assert auto_backend(True, dtype, fp32_auto="torch") == ("torch" if fp32 else "triton")
    monkeypatch.setenv(FP32_TRITON_ENV, "1")  # opts fp32 back into the Triton tiles
    assert auto_backend(True, dtype, fp32_auto="torch") == "triton"


def test_fp32_annotation_attention_on_cuda_goes_to_the_reference(monkeypatch):
    """The op's own dispatch arguments, applied to CUDA-like inputs (no GPU here): fp32 runs the
    reference, half precision the kernel, and the demo-gpu preset trains in fp32."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv(FP32_TRITON_ENV, raising=False)
    seen = {}

    def spy(backend, tensor, **kwargs):
        seen.update(kwargs)
        return resolve_backend(backend, tensor, **kwargs)

    # The module, not the function the package re-exports under the same name.
    module = importlib.import_module("kernels.annotation_attention")
    monkeypatch.setattr(module, "resolve_backend", spy)
    q = _randn(1, 2, 5, 16, seed=1)
    annotation_attention(q, q[:, :1], q[:, :1], torch.tensor([[0, 0, 1, 1, 2]]))
    cuda = lambda dtype: SimpleNamespace(is_cuda=True, dtype=dtype, device="cuda:0")  # noqa: E731
    assert resolve_backend(None, cuda(torch.float32), **seen) == "torch"
    assert resolve_backend(None, cuda(torch.bfloat16), **seen) == "triton"
    assert resolve_backend("triton", cuda(torch.float32), **seen) == "triton"
    assert run_preset("demo-gpu").run.precision == "fp32"


def test_flex_backend_is_only_for_annotation_attention(monkeypatch):
    q, k = _randn(3, 2, 16, seed=1), _randn(3, 4, 2, 16, seed=2)
    with pytest.raises(ValueError, match="'flex' is available only"):
        attention_pool(q, k, k, backend="flex")
    monkeypatch.setenv(BACKEND_ENV, "flex")  # process-wide: "auto" for ops without it
    assert torch.equal(attention_pool(q, k, k), attention_pool_reference(q, k, k))


def test_flex_backend_matches_reference_forward():
    """FlexAttention with the BlockMask of the rule (eager, forward: all the CPU has)."""
    b, hq, hkv, s, d = 2, 4, 2, 37, 16
    seg = torch.tensor([[-1] * 3 + [0] * 10 + [1] * 9 + [2] * 11 + [-1] * 4,
                        [0] * 20 + [1] * 3 + [2] * 6 + [3] * 8])
    q, k, v = _randn(b, hq, s, d, seed=1), _randn(b, hkv, s, d, seed=2), _randn(b, hkv, s, d, seed=3)
    want = annotation_attention_reference(q, k, v, seg)
    got = annotation_attention(q, k, v, seg, backend="flex")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[0, :, :3].abs().max() == 0  # leading padding sees no key: zeros, not NaN
    mask = annotation_block_mask(seg.to(torch.int32), block_size=16)  # built once, shared
    torch.testing.assert_close(annotation_attention_flex(q, k, v, seg, block_mask=mask), want,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    torch.cuda.is_available() or triton_interpreting(),
    reason="tests the refusal on a CPU-only process without Triton's interpreter",
)
def test_forcing_triton_on_cpu_without_interpreter_is_refused():
    q, k = torch.zeros(3, 2, 16), torch.zeros(3, 4, 2, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention_pool(q, k, k, backend="triton")


# ------------------------------------------------------------------- the Triton kernels


@pytest.mark.parametrize(
    "mode",
    [
        "interpreter",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
def test_triton_kernels_match_references(mode):
    """Runs tests/kernel_cases/kernel_vs_reference.py in a child pytest (see module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    if mode == "interpreter":
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_CASES)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"kernel cases failed ({mode}):\n{report}"
    assert " passed" in proc.stdout, report


def test_frontier_benchmark_dry_run(tmp_path):
    """benchmarks/kernels_frontier.py end to end on the CPU (tiny shapes, interpreter, ~15 s), so
    the GPU script is known to run before a GPU sees it: checks pass, every provider has a row
    (timed or skipped with a reason), the fp32 dispatch table and the plot are written."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    proc = subprocess.run(
        [sys.executable, str(FRONTIER), "--device", "cpu", "--check", "--quick", "--out-dir",
         str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "kernels_frontier_cpu-dry-run.json").read_text())
    checks = result["checks"]
    assert checks and not [c for c in checks if c["passed"] is False]
    assert {c["case"].split()[1] for c in checks if c["passed"]} >= {"triton", "flex", "auto"}
    rows = result["rows"]
    providers = {(r["op"], r["provider"]): r for r in rows if "table" not in r}
    assert set(providers) == {
        ("annotation_attention", p) for p in ("triton", "flex", "sdpa_mask", "flash_varlen")
    } | {("attention_pool", p) for p in ("triton", "torch", "compiled")}
    assert providers[("annotation_attention", "flash_varlen")]["skipped"]
    assert providers[("attention_pool", "compiled")]["skipped"]
    assert all(r["ms"] > 0 for r in rows if not r.get("skipped"))
    dispatch = {(r["op"], r["provider"]) for r in rows if r.get("table") == "fp32_dispatch"}
    assert ("annotation_attention", "auto") in dispatch and ("attention_pool", "auto") in dispatch
    assert (tmp_path / "kernels_frontier_cpu-dry-run.png").stat().st_size > 0
