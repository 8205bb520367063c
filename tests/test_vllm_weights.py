"""Weight loading of the vLLM model (molmo_vllm/model.py) from Ai2-named checkpoints.

The vLLM model is built in this process (no engine: vLLM's config, a one-rank gloo group),
then fed the tensors of a tiny checkpoint: every parameter is loaded, the fused tensors land
where they must (embedding tables concatenated, ff_proj in Ai2's (x, gate) half order for MulAndSilu,
as a LoRA's lora_B rows have it), and
a renamed, dropped or mis-shaped tensor is an error naming it.

Run: pytest tests/test_vllm_weights.py -q
"""

from __future__ import annotations

import pytest
import torch

from molmo_model.checkpoint import iter_weights

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
    pooling = weights["model.vision_backbone.image_pooling_2d.wq.weight"]
    assert torch.equal(model.vision_backbone.image_pooling_2d.wq.weight, pooling)


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
