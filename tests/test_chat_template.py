"""Molmo's chat template (molmo_model/chat_template.jinja) writes the prompt of the one prompt
builder (molmo_vllm/prompt.py), token for token, and our exports carry it.

The template is rendered and tokenized by transformers, as vLLM's own OpenAI server does
(rendered text, then the tokenizer with no special tokens added), and compared with
`prompt_token_ids`. Messages are given with images as vLLM hands them to a template
({"type": "image"}) and as clients send them (image_url parts). The end-to-end comparison of
vLLM's own server with ours is test_server_fidelity.py.

    pytest tests/test_chat_template.py -q       # a few seconds, no engine
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from molmo_model.tokenizer import CHAT_TEMPLATE_FILE
from molmo_vllm.prompt import parse_chat, prompt_token_ids
from server.cli import DEMO_MODEL

IMAGE = {"type": "image"}  # an image part as vLLM passes it to the template
URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


CHATS = {
    "question": [{"role": "user", "content": "What is in the image?"}],
    "image, system, parts": [
        {"role": "system", "content": "  Answer briefly. "},
        {"role": "user", "content": [IMAGE, text("  Point to "), text(""), text("the dogs.\n")]},
    ],
    "multi-turn, two images, developer": [
        {"role": "developer", "content": [text("Be exact.")]},
        {"role": "user", "content": [text("Count the cats."), URL]},
        {"role": "assistant", "content": [text("There are 2.")]},
        {"role": "system", "content": "Late system text still goes first."},
        {"role": "user", "content": [URL, text("And the dogs?"), text(" ")]},
    ],
    "empty texts": [
        {"role": "system", "content": ""},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [IMAGE]},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(str(tiny_checkpoint))


@pytest.mark.parametrize("name", sorted(CHATS))
def test_template_renders_the_prompt_builders_tokens(name, hf_tokenizer, tok):
    messages = CHATS[name]
    chat = parse_chat(messages)
    ours = prompt_token_ids(tok, chat.turns, len(chat.images))
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    theirs = hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert theirs == ours, rendered
    assert theirs.count(tok.image_id) == len(chat.images)


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "assistant", "content": "hi"}], "at least one user message"),
        ([{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}], "roles"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": [IMAGE]}],
            "only accepted in user messages",
        ),
        ([{"role": "user", "content": [{"type": "audio"}]}], "not supported"),
    ],
)
def test_template_refuses_what_the_prompt_builder_refuses(messages, error, hf_tokenizer):
    with pytest.raises(Exception, match=error):
        hf_tokenizer.apply_chat_template(messages, tokenize=False)


def test_exports_carry_the_shipped_template(tiny_checkpoint):
    shipped = CHAT_TEMPLATE_FILE.read_text()
    for folder in (tiny_checkpoint, DEMO_MODEL):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["chat_template"] == shipped, folder

