"""Weight loading of the vLLM model (molmo_vllm/model.py) from Ai2-named checkpoints.

The vLLM model is built in this process (no engine: vLLM's config, a one-rank gloo group),
then fed the tensors of a tiny checkpoint: every parameter is loaded, the fused tensors land
where they must (embedding tables concatenated, ff_proj in Ai2's (x, gate) half order for MulAndSilu,
as a LoRA's lora_B rows have it), and
a renamed, dropped or mis-shaped tensor is an error naming it. The same for an int4 copy
(`molmo quantize`, GPTQ's layout), built as vLLM's loader builds it (its GPTQ method gives the
decoder's linear layers qweight/qzeros/scales): ff_proj's (x, gate) halves are its columns
there, and a renamed, dropped, mis-shaped or wrongly typed int4 tensor, or a g_idx vLLM's
kernels would ignore, is an error naming it.

Run: pytest tests/test_vllm_weights.py -q
"""

from __future__ import annotations

import re

import pytest
import torch

from molmo_model.checkpoint import iter_weights
from molmo_model.quantize import QuantSpec, quantize_checkpoint

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def built(tiny_checkpoint):
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.network_utils import get_open_port

    path = tiny_checkpoint
    config = EngineArgs(
        model=str(path), enforce_eager=True, dtype="float32", max_model_len=1024
    ).create_engine_config()
    with set_current_vllm_config(config):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{get_open_port()}", 0, backend="gloo")
        initialize_model_parallel(1, 1)
        try:
            from molmo_vllm.model import MolmoForCausalLM

            yield MolmoForCausalLM(vllm_config=config), dict(iter_weights(path))
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def test_every_parameter_is_loaded(built):
    model, weights = built
    loaded = model.load_weights(iter(weights.items()))
    assert loaded == {name for name, _ in model.named_parameters()}


def test_fused_tensors_land_where_they_must(built):
    model, weights = built
    model.load_weights(iter(weights.items()))
    wte = model.transformer.wte.weight
    emb, new = (
        weights["model.transformer.wte.embedding"],
        weights["model.transformer.wte.new_embedding"],
    )
    assert torch.equal(wte[: emb.shape[0] + new.shape[0]], torch.cat([emb, new]))
    ff = weights["model.transformer.blocks.1.ff_proj.weight"]  # [2h, d]: Ai2 halves (x, gate)
    x_half, gate_half = ff.chunk(2)
    ours = model.transformer.blocks[1].ff_proj.weight  # [2h, d]: (x, gate) for MulAndSilu
    assert torch.equal(ours[: x_half.shape[0]], x_half)
    assert torch.equal(ours[x_half.shape[0] :], gate_half)
    att = weights["model.transformer.blocks.0.att_proj.bias"]
    assert torch.equal(model.transformer.blocks[0].att_proj.bias, att)
    # The vision side's linear layers then run on vLLM's CPU GEMM (weights packed, originals
    # dropped: molmo_vllm/engine_gemm.py), so the tensor is checked through the layer.
    pooling = weights["model.vision_backbone.image_pooling_2d.wq.weight"]
    wq = model.vision_backbone.image_pooling_2d.wq
    x = torch.randn(3, pooling.shape[1], generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.linear(x, pooling, weights["model.vision_backbone.image_pooling_2d.wq.bias"])
    assert torch.allclose(wq(x), want, atol=1e-5)


def test_renamed_tensor_is_named(built):
    model, weights = built
    bad = {k.replace("ln_f", "ln_final"): v for k, v in weights.items()}
    with pytest.raises(ValueError) as err:
        model.load_weights(iter(bad.items()))
    assert "model.transformer.ln_f.weight" in str(err.value)  # missing
    assert "model.transformer.ln_final.weight" in str(err.value)  # unexpected


def test_dropped_tensor_is_named(built):
    model, weights = built
    name = "model.vision_backbone.image_vit.transformer.resblocks.2.ffn_norm.bias"
    bad = {k: v for k, v in weights.items() if k != name}
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        model.load_weights(iter(bad.items()))


def test_misshaped_tensor_is_named(built):
    model, weights = built
    name = "model.transformer.blocks.0.attn_out.weight"
    bad = dict(weights)
    bad[name] = bad[name][:, :-1]
    with pytest.raises(ValueError, match="mis-shaped.*blocks.0.attn_out"):
        model.load_weights(iter(bad.items()))


# ---------------------------------------------------------------- int4 (GPTQ layout)


@pytest.fixture(scope="module")
def built_int4(built, tiny_checkpoint, tmp_path_factory):
    """The vLLM model of an int4 copy of the tiny checkpoint (group size 64: two groups per
    layer), in the process group of `built`, made the way vLLM's loader makes it."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    path = quantize_checkpoint(
        tiny_checkpoint, tmp_path_factory.mktemp("int4") / "tiny-int4", QuantSpec(4, 64)
    )
    config = EngineArgs(
        model=str(path), enforce_eager=True, max_model_len=1024
    ).create_engine_config()  # dtype: the checkpoint's (bfloat16)
    assert config.model_config.quantization == "auto_gptq"
    with set_current_vllm_config(config), set_default_torch_dtype(config.model_config.dtype):
        model = initialize_model(vllm_config=config)
    return model, dict(iter_weights(path))


def test_int4_every_parameter_is_loaded(built_int4):
    model, weights = built_int4
    loaded = model.load_weights(iter(weights.items()))
    assert loaded == {name for name, _ in model.named_parameters()}
    block = model.transformer.blocks[0]
    assert {"qweight", "qzeros", "scales"} <= {n for n, _ in block.att_proj.named_parameters()}
    assert "weight" in dict(model.transformer.ff_out.named_parameters())  # the head stays float


def test_int4_ff_proj_halves_are_columns(built_int4):
    model, weights = built_int4
    model.load_weights(iter(weights.items()))
    ours = model.transformer.blocks[1].ff_proj
    for part in ("qweight", "scales", "qzeros"):
        w = weights[f"model.transformer.blocks.1.ff_proj.{part}"]  # [rows, 2h or 2h/8]
        x_half, gate_half = w.chunk(2, dim=1)
        got = getattr(ours, part).data
        assert torch.equal(got[:, : x_half.shape[1]], x_half.to(got.dtype)), part
        assert torch.equal(got[:, x_half.shape[1] :], gate_half.to(got.dtype)), part
    att = weights["model.transformer.blocks.0.att_proj.qweight"]  # fused q, k, v columns, whole
    assert torch.equal(model.transformer.blocks[0].att_proj.qweight.data, att)


@pytest.mark.parametrize(
    "change, names",
    [
        ("rename", ["missing tensors: .*blocks.0.attn_out.scales", "blocks.0.attn_out.scale_x"]),
        ("drop", ["missing tensors: .*blocks.1.ff_proj.qzeros"]),
        ("misshape", ["mis-shaped.*blocks.0.ff_out.qweight"]),
        ("float_qweight", ["wrong dtypes: .*blocks.1.att_proj.qweight: int32 expected, got float32"]),
        ("g_idx", ["wrong dtypes: .*blocks.0.ff_out.g_idx: must be i // group_size"]),
        ("float_weight", ["unexpected tensors: .*blocks.0.attn_out.weight"]),
    ],
)
def test_int4_bad_tensor_is_named(built_int4, change, names):
    model, weights = built_int4
    bad = dict(weights)
    if change == "rename":
        bad["model.transformer.blocks.0.attn_out.scale_x"] = bad.pop(
            "model.transformer.blocks.0.attn_out.scales"
        )
    elif change == "drop":
        del bad["model.transformer.blocks.1.ff_proj.qzeros"]
    elif change == "misshape":
        name = "model.transformer.blocks.0.ff_out.qweight"
        bad[name] = bad[name][:-1]
    elif change == "float_qweight":
        name = "model.transformer.blocks.1.att_proj.qweight"
        bad[name] = bad[name].float()
    elif change == "g_idx":
        name = "model.transformer.blocks.0.ff_out.g_idx"
        bad[name] = bad[name].flip(0)  # an activation order: the kernels would ignore it
    else:  # a float checkpoint's tensor in an int4 one
        bad["model.transformer.blocks.0.attn_out.weight"] = torch.zeros(128, 128)
    with pytest.raises(ValueError) as err:
        model.load_weights(iter(bad.items()))
    for pattern in names:
        assert re.search(pattern, str(err.value)), str(err.value)
