"""int4 checkpoints (`molmo quantize`, molmo_model/quantize.py) made, loaded and served.

No engine:
- the checkpoint is GPTQ's layout (config fields, tensor names, dtypes and shapes), only the
  decoder blocks' linear layers are quantized, and it is smaller;
- the reference loads it dequantized, and every weight is within half a step of the float
  one (round-to-nearest: the nearest point of its group's grid);
- a quantized checkpoint with a tensor dropped is refused by the reference, naming it;
- `molmo quantize` refuses bad inputs with exit 2 and a message; `molmo serve --quantization`
  refuses a method vLLM lacks and fp8 on a CPU.

One engine: `molmo serve` on the int4 copy of the decisive tiny checkpoint (dtype "auto": the
checkpoint's float16, since vLLM runs GPTQ in float16 / bfloat16 only). Its greedy answer to
an image equals the reference's on the dequantized weights and its first-token logprobs agree
with them; against the float model they are close but not identical. (vLLM's own server is
not started as well: it would cost a second engine; tests/test_vllm_weights.py builds the
int4 model as vLLM's loader does.)

    pytest tests/test_quantize.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch
from helpers import ROOT, blocks_image, data_url, encode_image, running_server

from molmo_cli import main as molmo
from molmo_model.checkpoint import CheckpointError, iter_weights, load_checkpoint
from molmo_model.generate import generate
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_model.quantize import QUANTIZED_MODULES, dequantize_weight
from molmo_model.tokenizer import MolmoTokenizer
from molmo_vllm.prompt import parse_chat
from server.cli import DEMO_MODEL

GROUP = 64  # the tiny model's inputs are 128 and 256: two or four groups per layer
NEW_TOKENS = 8
LOGPROB_ATOL = 0.05  # float16 activations in vLLM against the float32 reference


@pytest.fixture(scope="module")
def int4(decisive_checkpoint, tmp_path_factory):
    """The decisive tiny checkpoint quantized by the real CLI, in float16."""
    path, _, _ = decisive_checkpoint
    out = tmp_path_factory.mktemp("int4") / "tiny-int4"
    r = subprocess.run(
        [sys.executable, "-m", "molmo_cli", "quantize", "--model", str(path), "--out", str(out),
         "--bits", "4", "--group-size", str(GROUP), "--dtype", "float16"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def test_checkpoint_is_gptq_layout_of_the_decoder_linears(int4, decisive_checkpoint):
    path, model, _ = decisive_checkpoint
    hf = json.loads((int4 / "config.json").read_text())
    qc = hf["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym")} == {
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True,
    }  # fmt: skip
    assert qc["quantizer"] == "molmo-rtn" and hf["torch_dtype"] == "float16"
    weights = dict(iter_weights(int4))
    d, h = 128, 256  # tiny: hidden, MLP half
    block = "model.transformer.blocks.0"
    assert weights[f"{block}.ff_proj.qweight"].shape == (d // 8, 2 * h)
    assert weights[f"{block}.ff_proj.scales"].shape == (d // GROUP, 2 * h)
    assert weights[f"{block}.ff_proj.qzeros"].shape == (d // GROUP, 2 * h // 8)
    assert weights[f"{block}.ff_out.g_idx"].tolist() == [i // GROUP for i in range(h)]
    assert weights[f"{block}.ff_out.qweight"].dtype == torch.int32
    assert weights[f"{block}.ff_out.scales"].dtype == torch.float16
    quantized = {n.rsplit(".", 1)[0] for n in weights if n.endswith(".qweight")}
    layers = model.config.llm.num_hidden_layers
    assert quantized == {f"model.transformer.blocks.{i}.{m}" for i in range(layers) for m in QUANTIZED_MODULES}
    # The head, the embeddings, the att_proj bias and the vision tower stay float.
    for name in ("model.transformer.ff_out.weight", "model.transformer.wte.embedding",
                 f"{block}.att_proj.bias", "model.vision_backbone.image_projector.w1.weight"):  # fmt: skip
        assert weights[name].dtype == torch.float16, name
    size = sum(f.stat().st_size for f in int4.glob("*.safetensors"))
    assert size < sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2


def test_reference_loads_it_dequantized_to_the_nearest_grid_point(int4, decisive_checkpoint):
    _, model, _ = decisive_checkpoint
    qmodel, _, _ = load_checkpoint(int4)
    weights = dict(iter_weights(int4))
    ours, float_state = qmodel.state_dict(), model.state_dict()
    for i in range(model.config.llm.num_hidden_layers):
        for m in QUANTIZED_MODULES:
            prefix = f"model.transformer.blocks.{i}.{m}"
            parts = {p: weights[f"{prefix}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
            w = ours[f"{prefix}.weight"]  # [out, in]
            assert torch.equal(w, dequantize_weight(parts))
            step = parts["scales"].float()[parts["g_idx"].long()].T  # [out, in]
            err = (w - float_state[f"{prefix}.weight"]).abs()
            # Round to nearest (the 1%: a group's largest positive weight is clipped to 7
            # steps, half a step away when the scale is exact, a hair more as stored).
            assert (err <= 0.51 * step).all(), prefix
            assert err.max() > 0, prefix  # int4 is not the float model


def test_reference_names_a_dropped_int4_tensor(int4, tmp_path):
    from safetensors.torch import save_file

    weights = dict(iter_weights(int4))
    del weights["model.transformer.blocks.1.attn_out.scales"]
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(weights, str(bad / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bad / f).write_bytes((int4 / f).read_bytes())
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.transformer\.blocks\.1\.attn_out\.scales"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--group-size", "48"], "group_size must be one of 32, 64, 128, -1"),
        (["--bits", "8"], "bits must be 4"),
        (["--dtype", "float32"], "invalid choice"),  # vLLM runs GPTQ in float16 / bfloat16 only
        (["--model", str(DEMO_MODEL), "--group-size", "128"], "does not divide the input size 192"),
        (["--model", "/nonexistent"], "has no config.json"),
        (["--model", "INT4"], "already quantized"),
    ],
)
def test_quantize_refuses_bad_input(args, message, int4, decisive_checkpoint, tmp_path, capsys):
    argv = ["quantize", "--model", str(decisive_checkpoint[0]), "--out", str(tmp_path / "out")]
    argv += [str(int4) if a == "INT4" else a for a in args]
    try:
        code = molmo(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method, message", [("fp8", "needs a GPU"), ("int3", "one of vLLM's methods")]
)
def test_serve_refuses_a_quantization_it_cannot_run(method, message, capsys):
    from server.cli import serve

    assert serve(["--model", str(DEMO_MODEL), "--quantization", method]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- one engine: molmo serve


@pytest.fixture(scope="module")
def server(int4, tmp_path_factory):
    flags = ("--enforce-eager", "--max-model-len", "1024", "--max-images", "1")
    with running_server(int4, tmp_path_factory.mktemp("serve-int4"), *flags) as s:
        yield s


def _top(content: dict, tok: MolmoTokenizer) -> dict[int, float]:
    """OpenAI top_logprobs of one position as token id -> logprob (ids found by decoding)."""
    by_text: dict[str, list[int]] = {}
    for i in range(tok.embedding_size):
        by_text.setdefault(tok.decode([i]), []).append(i)
    out = {}
    for t in content["top_logprobs"]:
        ids = by_text.get(t["token"], [])
        if len(ids) == 1:  # a string several ids decode to says nothing
            out[ids[0]] = t["logprob"]
    return out


@pytest.mark.vllm
@pytest.mark.server
def test_served_int4_is_the_dequantized_model(server, int4, decisive_checkpoint):
    _, float_model, tok = decisive_checkpoint
    qmodel, _, _ = load_checkpoint(int4)
    image = blocks_image(640, 480, seed=3)
    question = "Describe this image."
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "model": server.model_dir.rsplit("/", 1)[-1],
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(encode_image(image))}},
                {"type": "text", "text": question}]}],
            "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": True, "top_logprobs": 5,
        },
        timeout=300,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]

    pre = MolmoPreprocessor(qmodel.config.preprocess, tok)
    ids, inputs = pre.build_prompt(parse_chat(question).turns, [image])
    ref = generate(qmodel, ids, inputs, max_new_tokens=NEW_TOKENS, return_logprobs=True)
    flt = generate(float_model, ids, inputs, max_new_tokens=NEW_TOKENS, return_logprobs=True)
    # Greedy tokens, as the server decodes them (the decisive model's margins are far above
    # float16 noise: checked, not assumed).
    assert [c["token"] for c in content] == [tok.decode([t]) for t in ref.tokens]
    for lp in ref.logprobs:
        assert float(torch.topk(lp, 2).values.diff().abs()) > 10 * LOGPROB_ATOL
    first = _top(content[0], tok)
    assert len(first) >= 3
    to_ref = max(abs(v - float(ref.logprobs[0][i])) for i, v in first.items())
    to_float = max(abs(v - float(flt.logprobs[0][i])) for i, v in first.items())
    assert to_ref < LOGPROB_ATOL
    assert to_float > 10 * LOGPROB_ATOL  # int4 is not the float model
    assert to_float < 5.0  # but close to it: logits spread ~4.5 nats (helpers.HEAD_SCALE)
