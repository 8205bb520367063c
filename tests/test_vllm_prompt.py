"""The one prompt builder (molmo_vllm.prompt) and the plugin's config shim (no engine started).

Run: pytest tests/test_vllm_prompt.py -q
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from molmo_model.config import MolmoConfig, tiny
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_vllm import register
from molmo_vllm.config import MolmoHFConfig
from molmo_vllm.prompt import PromptError, build_prompt, parse_chat


def _expand(ids: list[int], tok, per_image: list[list[int]]) -> list[int]:
    """What vLLM's processor does with placeholders: each <|image|> -> that image's tokens."""
    out, k = [], 0
    for i in ids:
        if i == tok.image_id:
            out.extend(per_image[k])
            k += 1
        else:
            out.append(i)
    assert k == len(per_image)
    return out


def test_prompt_expands_to_build_prompt_ids(tok):
    pre = MolmoPreprocessor(tiny().preprocess, tok)
    images = [Image.new("RGB", (640, 480), "red"), Image.new("RGB", (336, 336), "blue")]
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:..."}},
                {"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": "data:..."}},
            ],
        },
        {"role": "assistant", "content": "Two squares."},
        {"role": "user", "content": "Which is bigger?"},
    ]
    prompt = build_prompt(tok, messages, images)
    assert len(parse_chat(messages).images) == 2
    assert prompt["multi_modal_data"] == {"image": images}
    ids = prompt["prompt_token_ids"]
    assert ids[:3] == [tok.bos_id, tok.image_id, tok.image_id]
    ref_ids, inputs = pre.build_prompt(parse_chat(messages).turns, images)
    assert _expand(ids, tok, [x.tokens for x in inputs]) == ref_ids
    assert (
        tok.decode(ids[3:])
        == " User: Be brief. What is it? Assistant: Two squares. User: Which is bigger? Assistant:"
    )


def test_text_only_prompt_has_bos_and_no_mm_data(tok):
    prompt = build_prompt(tok, "Hi")
    assert prompt == {"prompt_token_ids": [tok.bos_id, *tok.encode(" User: Hi Assistant:")]}


def test_user_text_cannot_smuggle_image_tokens(tok):
    ids = build_prompt(tok, "look: <|image|> <im_patch>")["prompt_token_ids"]
    assert tok.image_id not in ids and tok.im_patch_id not in ids


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "messages"),
        ([{"role": "user", "content": [{"type": "audio"}]}], r"messages\[0\].content\[0\].type"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 3}]}],
            r"messages\[0\].content\[0\].text",
        ),
        ([{"role": "user", "content": 5}], r"messages\[0\].content"),
        ([{"role": "tool", "content": "x"}], r"messages\[0\].role"),
    ],
)
def test_bad_messages_name_the_field(tok, messages, field):
    with pytest.raises(PromptError, match=field) as e:
        build_prompt(tok, messages)
    assert e.value.param.startswith(field.replace("\\", "").split(".")[0])


def test_image_parts_and_images_must_agree(tok):
    im = Image.new("RGB", (336, 336))
    two = [{"role": "user", "content": [{"type": "image_url"}, {"type": "image_url"}]}]
    with pytest.raises(PromptError, match="2 image part"):
        build_prompt(tok, two, [im])
    # a question string (or messages without image parts) takes the images as given
    assert build_prompt(tok, "What is it?", [im])["prompt_token_ids"][:2] == [
        tok.bos_id,
        tok.image_id,
    ]


def test_hf_config_shim_reads_our_config_json(tmp_path):
    from transformers import AutoConfig

    register()
    cfg = tiny()
    cfg.save(tmp_path / "config.json")
    hf = AutoConfig.from_pretrained(tmp_path)  # no trust_remote_code
    assert isinstance(hf, MolmoHFConfig)
    assert hf.hidden_size == 128 and hf.rope_theta == 10_000.0
    assert MolmoConfig.from_hf_dict(json.loads(hf.to_json_string())) == cfg


def test_one_normal_form_of_text(tok):
    # Surrounding whitespace and empty system messages (common from OpenAI clients) do not
    # change the prompt, however the chat arrives.
    plain = build_prompt(tok, "How many red circles are there?")
    assert build_prompt(tok, "How many red circles are there?\n") == plain
    assert build_prompt(tok, [{"role": "system", "content": ""},
                              {"role": "user", "content": " How many red circles are there? "}]) == plain  # fmt: skip
    assert tok.decode(plain["prompt_token_ids"][1:]) == " User: How many red circles are there? Assistant:"


def test_training_sequences_start_with_the_served_prompt(tok):
    """What a model is fine-tuned on (training.packing) is what it is served
    (molmo_vllm.prompt), for user text as loosely spaced as real JSONL."""
    from training.data.records import Annotation
    from training.packing import annotation_tokens

    question, answer = "How many red circles are there?\n", " There are 3.\n"
    ann = Annotation(messages=[{"role": "user", "content": question},
                               {"role": "assistant", "content": answer}])  # fmt: skip
    ids, is_answer = annotation_tokens(ann, tok)
    served = build_prompt(tok, question)["prompt_token_ids"][1:]  # after BOS
    assert ids[: len(served)] == served and not any(is_answer[: len(served)])
    assert ids[len(served) :] == [*tok.encode(" There are 3."), tok.eos_id]
