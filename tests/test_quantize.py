"""int4 checkpoints (`molmo quantize`, molmo_model/quantize.py) made, loaded and served.

No engine:
- the checkpoint is GPTQ's layout (config fields, tensor names, dtypes and shapes), only the
  decoder blocks' linear layers are quantized, and it is smaller;
- the reference loads it dequantized, and every weight is within half a step of the float
  one (round-to-nearest: the nearest point of its group's grid);
- a quantized checkpoint with a tensor dropped is refused by the reference, naming it;
- `molmo quantize` refuses bad inputs with exit 2 and a message; `molmo serve --quantization`
  refuses a method vLLM lacks and fp8 on a CPU.

Two engines, one after the other, on the int4 copy of a checkpoint in Ai2's release layout
(Molmo-7B-D's config.json fields and Qwen-sized tokenizer, tiny widths, decisive greedy
margins; dtype "auto": the checkpoint's float16, since vLLM runs GPTQ in float16 / bfloat16
only): `molmo serve`, then vLLM's own OpenAI server through our plugin. Each one's greedy
answer to an image equals the reference's on the dequantized weights; ours also gives
first-token logprobs that agree with them, and that are close to, but not, the float model's.

    pytest tests/test_quantize.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch
from helpers import (
    OFFICIAL_FIELDS,
    ROOT,
    blocks_image,
    data_url,
    decisive_model,
    encode_image,
    running_server,
)

from molmo_cli import main as molmo
from molmo_model.checkpoint import CheckpointError, iter_weights, load_checkpoint, save_checkpoint
from molmo_model.config import MolmoConfig, tiny
from molmo_model.generate import generate
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_model.quantize import QUANTIZED_MODULES, dequantize_weight
from molmo_model.tokenizer import MolmoTokenizer, build_tokenizer
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


def release_decisive(out):
    """A decisive tiny model (helpers.decisive_model) saved in Ai2's release layout: the
    official config.json fields with tiny widths, a Qwen-sized tokenizer."""
    vision = {k: v for k, v in tiny().to_hf_dict().items() if k.startswith(("image_", "vit_"))}
    hf = {**OFFICIAL_FIELDS, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2,
          "num_key_value_heads": 1, "num_hidden_layers": 2, **vision}  # fmt: skip
    config = MolmoConfig.from_hf_dict(hf)
    tok = build_tokenizer(vocab_size=config.llm.embedding_size)
    model = decisive_model(config, tok)
    with torch.no_grad():  # 152k rows instead of 512: spread the logits further for the same margins
        model.model.transformer.ff_out.weight.mul_(3.0)
    path = save_checkpoint(model, out, tok)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return path, model, tok


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(int4 release-layout checkpoint, its float model, tokenizer), quantized by the CLI."""
    root = tmp_path_factory.mktemp("release")
    path, model, tok = release_decisive(root / "release")
    out = root / "release-int4"
    r = subprocess.run([sys.executable, "-m", "molmo_cli", "quantize", "--model", str(path), "--out", str(out),
                        "--group-size", str(GROUP), "--dtype", "float16"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out, model, tok


CHAT = {"max_tokens": NEW_TOKENS, "temperature": 0}
VLLM_FLAGS = ("--enforce-eager", "--max-model-len", "1024", "--limit-mm-per-prompt", '{"image": 1}',
              "--served-model-name", "release-int4", "--seed", "0")  # fmt: skip


@pytest.fixture(scope="module")
def answers(release, tmp_path_factory):
    """What each server answered about the image: ours (logprobs), then vLLM's (token ids)."""
    path = release[0]
    work = tmp_path_factory.mktemp("serve-int4")
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(encode_image(IMAGE()))}},
        {"type": "text", "text": QUESTION}]}]  # fmt: skip
    flags = ("--enforce-eager", "--max-model-len", "1024", "--max-images", "1")
    out = {}
    with running_server(path, work, *flags) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", timeout=300,
                       json={"messages": messages, **CHAT, "logprobs": True, "top_logprobs": 5})  # fmt: skip
        assert r.status_code == 200, r.text
        out["ours"] = r.json()["choices"][0]
    with running_server(path, work, *VLLM_FLAGS, module="vllm.entrypoints.openai.api_server") as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", timeout=300,
                       json={"model": "release-int4", "messages": messages, **CHAT, "return_token_ids": True})  # fmt: skip
        assert r.status_code == 200, r.text
        out["vllm"] = r.json()["choices"][0]
    return out


def IMAGE():
    return blocks_image(640, 480, seed=3)


QUESTION = "Describe this image."


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


def _reference(release):
    path, float_model, tok = release
    qmodel, _, _ = load_checkpoint(path)
    pre = MolmoPreprocessor(qmodel.config.preprocess, tok)
    ids, inputs = pre.build_prompt(parse_chat(QUESTION).turns, [IMAGE()])
    ref = generate(qmodel, ids, inputs, max_new_tokens=NEW_TOKENS, return_logprobs=True)
    flt = generate(float_model, ids, inputs, max_new_tokens=NEW_TOKENS, return_logprobs=True)
    return ref, flt, tok


def assert_greedy_matches(got: list[int], ref) -> None:
    """The served tokens are the reference's; a step may differ only where the reference's
    top-2 gap is within float16 noise (152k random head rows leave a few close pairs), and
    nothing after such a step is compared. The first step is never such a tie here."""
    assert len(got) == len(ref.tokens)
    for i, (a, b) in enumerate(zip(got, ref.tokens, strict=True)):
        gap = float(torch.topk(ref.logprobs[i], 2).values.diff().abs())
        if i == 0:
            assert gap > 10 * LOGPROB_ATOL, gap
        if a != b:
            assert gap < 10 * LOGPROB_ATOL, (i, a, b, gap)
            return


@pytest.mark.vllm
@pytest.mark.server
def test_served_int4_is_the_dequantized_model(answers, release):
    ref, flt, tok = _reference(release)
    content = answers["ours"]["logprobs"]["content"]
    by_text = {tok.decode([t]): t for t in ref.tokens}  # the served tokens come back as text
    assert_greedy_matches([by_text.get(c["token"], -1) for c in content], ref)
    first = _top(content[0], tok)
    assert len(first) >= 3
    to_ref = max(abs(v - float(ref.logprobs[0][i])) for i, v in first.items())
    to_float = max(abs(v - float(flt.logprobs[0][i])) for i, v in first.items())
    assert to_ref < LOGPROB_ATOL
    assert to_float > 10 * LOGPROB_ATOL  # int4 is not the float model
    assert to_float < 15.0  # but close to it: logits spread ~13 nats (helpers.HEAD_SCALE x 3)


@pytest.mark.vllm
@pytest.mark.server
def test_vllms_own_server_serves_the_int4_release_checkpoint(answers, release):
    ref, _, _ = _reference(release)
    assert_greedy_matches(answers["vllm"]["token_ids"], ref)
