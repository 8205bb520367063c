"""A checkpoint in the layout of Ai2's Molmo-7B-D release, served through our vLLM plugin.

config.json holds exactly the fields of the official release (no vision fields, an
`auto_map` naming remote code files that are not there) with a tiny LLM (hidden 128,
2 layers, head dim 64) and Molmo-7B-D's vocabulary (152064 + 128 rows, image tokens at
152064..). The vision tower is therefore Molmo-7B-D's own: full-size ViT-L (23 blocks,
1024 wide), 2048 -> 1024 pooling, 1024 -> 256 -> 128 projector. Random bf16 weights are
generated into tmp_path at test time. The engine must build the tower from the defaults,
load every Ai2-named tensor, and answer with the reference generator's greedy tokens.

Run: pytest tests/test_vllm_official.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import HEAD_SCALE, OFFICIAL_FIELDS, assert_same_greedy, blocks_image, vllm_engine

from molmo_model.checkpoint import load_checkpoint, save_checkpoint
from molmo_model.config import MolmoConfig
from molmo_model.generate import generate
from molmo_model.model import MolmoForCausalLM
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_model.tokenizer import build_tokenizer
from molmo_vllm.prompt import build_prompt

pytestmark = pytest.mark.vllm

TINY_LLM = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "torch_dtype": "bfloat16",
}
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = {**OFFICIAL_FIELDS, **TINY_LLM}
    config = MolmoConfig.from_hf_dict(hf)
    assert config.vision.image_num_layers == 23 and config.vision.image_emb_dim == 1024
    tok = build_tokenizer(vocab_size=config.llm.embedding_size)
    assert tok.im_start_id == 152064  # Molmo-7B-D's ids
    torch.manual_seed(0)
    model = MolmoForCausalLM(config, im_patch_id=tok.im_patch_id).init_weights(std=0.02, seed=0)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(HEAD_SCALE * 2.5)  # std 0.4 like the tiny tests
    path = save_checkpoint(
        model, tmp_path_factory.mktemp("official") / "molmo-7b-d-layout", tok, dtype="bfloat16"
    )
    del model
    (path / "config.json").write_text(
        json.dumps(hf, indent=2) + "\n"
    )  # exactly the official fields
    # The reference reads the same bf16 values, upcast to float32 as vLLM does below.
    reference, loaded_config, _ = load_checkpoint(path)
    assert loaded_config == config
    pre = MolmoPreprocessor(config.preprocess, tok)
    with vllm_engine(  # the exact path (float32 crops)
        path, limit_mm_per_prompt={"image": 1}, max_num_seqs=4, mm_device_do_normalize=False
    ) as llm:
        yield llm, reference.eval(), tok, pre


def test_config_json_is_the_official_one(setup):
    llm, _, _, _ = setup
    hf_config = llm.llm_engine.model_config.hf_config
    assert type(hf_config).__name__ == "MolmoHFConfig"  # ours, not remote code
    assert not hasattr(hf_config, "image_emb_dim")  # no vision fields: defaults are used


def test_answers_with_an_image_like_the_reference(setup):
    from vllm import SamplingParams

    llm, reference, tok, pre = setup
    image = blocks_image(336, 336, seed=5)
    ids, inputs = pre.build_prompt("Describe this image.", [image])
    ref = generate(reference, ids, inputs, max_new_tokens=NEW_TOKENS, return_logprobs=True)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=3, ignore_eos=True)
    out = llm.generate(
        {"prompt": " User: Describe this image. Assistant:", "multi_modal_data": {"image": image}},
        params,
        use_tqdm=False,
    )[0]
    assert list(out.prompt_token_ids) == ids
    got = out.outputs[0]
    assert isinstance(got.text, str) and len(got.token_ids) == NEW_TOKENS
    assert_same_greedy(list(got.token_ids), ref.tokens, ref.logprobs)
    for token_id, lp in got.logprobs[0].items():
        assert abs(lp.logprob - float(ref.logprobs[0][token_id])) < 5e-3


def test_answers_text_only(setup):
    from vllm import SamplingParams

    llm, reference, tok, pre = setup
    prompt = build_prompt(tok, "What is the capital of France?")
    ref = generate(
        reference, prompt["prompt_token_ids"], max_new_tokens=NEW_TOKENS, return_logprobs=True
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert_same_greedy(list(out.outputs[0].token_ids), ref.tokens, ref.logprobs)
