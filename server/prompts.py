"""OpenAI chat messages -> the token ids handed to vLLM, one `<|image|>` id per image.

Molmo's chat format: BOS `<|endoftext|>`, all the images in order (before any text), then
" User: {q} Assistant:"; earlier turns continue " User: q1 Assistant: a1 User: q2 Assistant:"
and a system message's text is prepended to the first user turn. The text part is
`molmo_model.preprocessing.prompt_text`'s; the vLLM plugin replaces the i-th `<|image|>` id
by the i-th image's tokens.

We tokenize here, with special-token strings in user text read as plain text, so a user
cannot smuggle `<|endoftext|>` or `<|image|>` into the prompt; the same ids give the exact
prompt length for the context check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from molmo_model.preprocessing import prompt_text
from server.errors import bad_request
from server.protocol import ChatMessage, ImagePart, TextPart

POINT_PROMPT = "Point to all the {object}."  # Molmo v1's pointing question


class Tokenizer(Protocol):
    bos_id: int
    image_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class ParsedChat:
    """Messages as `prompt_text` takes them, and the image URLs in the order they appear."""

    messages: list[dict[str, str]] = field(default_factory=list)  # {"role", "content"}
    image_urls: list[tuple[str, str]] = field(default_factory=list)  # (url, param path)


def parse_messages(messages: list[ChatMessage]) -> ParsedChat:
    """Split OpenAI messages into text turns and image references.

    Raises APIError (400) naming the field for what Molmo's format cannot express: images
    outside user messages, a chat without a user message.
    """
    chat = ParsedChat()
    for i, message in enumerate(messages):
        parts = _parts(message)
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        for j, part in enumerate(parts):
            if isinstance(part, ImagePart):
                if message.role != "user":
                    raise bad_request(
                        f"images are only accepted in user messages, not in a {message.role} message",
                        param=f"messages[{i}].content[{j}]",
                    )
                chat.image_urls.append(
                    (part.image_url.url, f"messages[{i}].content[{j}].image_url")
                )
        role = "system" if message.role == "developer" else message.role
        chat.messages.append(
            {"role": role, "content": " ".join(t.strip() for t in texts if t.strip())}
        )
    if not any(m["role"] == "user" for m in chat.messages):
        raise bad_request("messages must contain at least one user message", param="messages")
    return chat


def prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]], num_images: int) -> list[int]:
    """BOS + one `<|image|>` per image + the tokens of the chat text."""
    try:
        text = prompt_text(messages)
        text.encode("utf-8")  # lone surrogates ("\ud800") pass JSON and pydantic, not tokenizers
    except UnicodeError:
        raise bad_request("message text is not valid Unicode", param="messages") from None
    except ValueError as e:
        raise bad_request(str(e), param="messages") from None
    return [tokenizer.bos_id] + [tokenizer.image_id] * num_images + tokenizer.encode(text)


def point_messages(obj: str) -> list[dict[str, str]]:
    """The one-turn chat that asks Molmo to point at `obj`."""
    return [{"role": "user", "content": POINT_PROMPT.format(object=" ".join(obj.split()))}]


def _parts(message: ChatMessage) -> list[TextPart | ImagePart]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [TextPart(type="text", text=message.content)]
    return list(message.content)
