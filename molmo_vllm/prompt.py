"""OpenAI-style chat messages and images -> the prompt Molmo's vLLM engine takes.

This is the one prompt builder: the server, `molmo eval`, the benchmarks and the parity
tests all call it, so the prompt under test is the prompt that is served. It knows both
families: a Molmo 2 tokenizer (`molmo_model.tokenizer.Molmo2Tokenizer`) selects Molmo 2's
chat layout (`molmo2_prompt_token_ids`, below); everything else is Molmo's.

Molmo's chat format: BOS `<|endoftext|>`, every image in order (before any text), then
" User: {q} Assistant:"; earlier turns continue " User: q1 Assistant: a1 User: q2 Assistant:"
and system text is prepended to the first user turn (`molmo_model.preprocessing.prompt_text`).
The engine prompt carries one `<|image|>` id per image; the plugin's processor replaces the
i-th by the i-th image's tokens, giving exactly the ids of `MolmoPreprocessor.build_prompt`.

Message rules (the same offline and over HTTP):
* content is a string or a list of parts; a message's text parts are stripped and joined
  with one space; image parts ("image_url", "image", "input_image") mark where images are,
  and are accepted in user messages only;
* roles are user, assistant, system and developer (read as system);
* at least one user message.
User text is tokenized as plain text: `<|endoftext|>` or `<|image|>` typed by a user never
becomes a special token.

    from molmo_vllm.prompt import build_prompt
    llm.generate(build_prompt(tokenizer, "Point to all the red circles.", [image]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from molmo_model.molmo2.preprocessing import _CHAT_END as _M2_CHAT_END  # the pieces' markers
from molmo_model.molmo2.preprocessing import _CHAT_START as _M2_CHAT_START
from molmo_model.molmo2.preprocessing import _IMAGE as _M2_IMAGE
from molmo_model.molmo2.preprocessing import _VIDEO as _M2_VIDEO
from molmo_model.molmo2.preprocessing import (
    CHAT_END,
    CHAT_START,
    VIDEO_PROMPT,
    molmo2_chat_pieces,
)
from molmo_model.preprocessing import prompt_text
from molmo_model.tokenizer import Molmo2Tokenizer

POINT_QUESTION = "Point to all the {object}."  # Molmo v1's pointing question
IMAGE_PART_TYPES = ("image_url", "image", "input_image")
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class PromptError(ValueError):
    """A chat that Molmo's prompt format cannot express; `param` names the offending field."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


class Tokenizer(Protocol):
    bos_id: int
    image_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class ImageRef:
    """An image part of a message: what it points at (a URL, or None offline) and its field."""

    source: Any
    param: str  # e.g. "messages[0].content[1].image_url"


@dataclass
class Chat:
    """Messages as `prompt_text` takes them, and the image parts in the order they appear."""

    turns: list[dict[str, str]] = field(default_factory=list)  # {"role", "content": str}
    images: list[ImageRef] = field(default_factory=list)


def parse_chat(messages: str | Sequence[Mapping[str, Any]]) -> Chat:
    """Split OpenAI-style messages (dicts) into text turns and image references.

    A plain string is one user question. Raises PromptError naming the field for anything
    the format cannot express.
    """
    if isinstance(messages, str):
        return Chat(turns=[{"role": "user", "content": messages}])
    if not isinstance(messages, Sequence) or not messages:
        raise PromptError(
            "messages must be a non-empty list of {'role', 'content'} objects or a string"
        )
    chat = Chat()
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise PromptError(
                f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]"
            )
        role = message.get("role")
        if role not in ROLES:
            raise PromptError(
                f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}",
                f"messages[{i}].role",
            )
        texts = []
        for j, part in enumerate(_parts(message.get("content"), f"messages[{i}]")):
            where = f"messages[{i}].content[{j}]"
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise PromptError(f"{where}.text must be a string", f"{where}.text")
                texts.append(part["text"].strip())
                continue
            if role != "user":
                raise PromptError(
                    f"images are only accepted in user messages, not in a {role} message", where
                )
            chat.images.append(ImageRef(*_image_source(part, where)))
        chat.turns.append({"role": ROLES[role], "content": " ".join(t for t in texts if t)})
    if not any(t["role"] == "user" for t in chat.turns):
        raise PromptError("messages must contain at least one user message")
    return chat


def prompt_token_ids(
    tokenizer: Tokenizer, turns: list[dict[str, str]], num_images: int, num_videos: int = 0
) -> list[int]:
    """Molmo: BOS + one `<|image|>` per image + the tokens of the chat's text. A Molmo 2
    tokenizer (`Molmo2Tokenizer`) gets Molmo 2's layout instead (`molmo2_prompt_token_ids`);
    only Molmo 2 takes a video."""
    if isinstance(tokenizer, Molmo2Tokenizer):
        return molmo2_prompt_token_ids(tokenizer, turns, num_images, num_videos)
    if num_videos:
        raise PromptError("Molmo (v1) does not take video; Molmo 2 does")
    try:
        text = prompt_text(turns)
        text.encode("utf-8")  # lone surrogates ("\ud800") pass JSON and pydantic, not tokenizers
    except UnicodeError:
        raise PromptError("message text is not valid Unicode") from None
    except ValueError as e:  # prompt_text's own checks
        raise PromptError(str(e)) from None
    return [tokenizer.bos_id] + [tokenizer.image_id] * num_images + tokenizer.encode(text)


def molmo2_prompt_token_ids(
    tokenizer: Molmo2Tokenizer, turns: list[dict[str, str]], num_images: int, num_videos: int = 0
) -> list[int]:
    """Molmo 2 (Ai2's chat template, molmo_model.molmo2.preprocessing.molmo2_chat_pieces):
    BOS `<|im_end|>`, the images first ("<|image|>" for one, "Image 1<|image|>Image 2<|image|>..."
    for several) or the video (`<|video|>`, which the processor expands into its frames),
    then Qwen3 turns and the generation prompt. Molmo 2 has no system role: system text is
    prepended to the first user turn, as Molmo's format does."""
    if num_videos and num_images:
        raise PromptError("Molmo 2 takes images or a video in one prompt, not both")
    system = " ".join(t["content"] for t in turns if t["role"] == "system" and t["content"])
    chat = [dict(t) for t in turns if t["role"] != "system"]
    if system and chat:
        chat[0]["content"] = f"{system} {chat[0]['content']}".strip()
    markers = {_M2_IMAGE: tokenizer.image_id, _M2_CHAT_START: tokenizer.token_to_id(CHAT_START),
               _M2_CHAT_END: tokenizer.token_to_id(CHAT_END),
               _M2_VIDEO: tokenizer.token_to_id(VIDEO_PROMPT)}  # fmt: skip
    try:
        ids = [tokenizer.bos_id]
        for piece in molmo2_chat_pieces(chat, num_images, num_videos):
            if isinstance(piece, str):
                piece.encode("utf-8")  # lone surrogates pass JSON and pydantic, not tokenizers
                ids += tokenizer.encode(piece)
            else:
                ids.append(markers[piece])
    except UnicodeError:
        raise PromptError("message text is not valid Unicode") from None
    except ValueError as e:  # molmo2_chat_pieces' own checks (roles must alternate)
        raise PromptError(str(e)) from None
    return ids


def engine_prompt(
    token_ids: list[int], images: Sequence[Any] = (), video: Any = None
) -> dict[str, Any]:
    """The dict `LLM.generate` / `AsyncLLM.generate` take: `{"prompt_token_ids": [...],
    "multi_modal_data": {"image": [...]}}` (or {"video": [video]}; no "multi_modal_data"
    without media)."""
    prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
    if images:
        prompt["multi_modal_data"] = {"image": list(images)}
    if video is not None:
        prompt.setdefault("multi_modal_data", {})["video"] = [video]
    return prompt


def build_prompt(
    tokenizer: Tokenizer,
    messages: str | Sequence[Mapping[str, Any]],
    images: Sequence[Any] = (),
    video: Any = None,
) -> dict[str, Any]:
    """The engine prompt of a chat whose images are already decoded (PIL images, in order).

    messages: a question string, or OpenAI-style [{"role", "content"}] (rules above); when
              they hold image parts there must be exactly one image per part.
    video:    Molmo 2 only, instead of images: decoded frames uint8 [T, H, W, 3], or
              `(frames, {"fps": fps})` (vLLM's video item; without fps the processor takes
              2 frames a second, molmo_vllm.molmo2_processor.DEFAULT_VIDEO_FPS). The prompt
              is Molmo2Preprocessor.build_prompt(messages, video=...)'s once the processor
              expands `<|video|>`.
    """
    chat = parse_chat(messages)
    images = list(images)
    if chat.images and len(chat.images) != len(images):
        raise PromptError(
            f"the messages hold {len(chat.images)} image part(s) but {len(images)} image(s) "
            "were given"
        )
    n_videos = int(video is not None)
    return engine_prompt(prompt_token_ids(tokenizer, chat.turns, len(images), n_videos), images, video)


def point_question(obj: str) -> str:
    """The question that asks Molmo to point at `obj` (whitespace collapsed)."""
    return POINT_QUESTION.format(object=" ".join(obj.split()))


def _parts(content: Any, where: str) -> list[Mapping[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence):
        raise PromptError(f"{where}.content must be a string or a list of parts", f"{where}.content")
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or "type" not in part:
            raise PromptError(
                f"{where}.content[{j}] must be an object with a 'type'", f"{where}.content[{j}]"
            )
        if part["type"] != "text" and part["type"] not in IMAGE_PART_TYPES:
            raise PromptError(
                f"{where}.content[{j}].type {part['type']!r} is not supported",
                f"{where}.content[{j}].type",
            )
    return list(content)


def _image_source(part: Mapping[str, Any], where: str) -> tuple[Any, str]:
    """(what an image part points at, its field): OpenAI's {"image_url": {"url"}} or
    {"image_url": "..."}, or {"image": ...}."""
    if part["type"] == "image":
        return part.get("image"), f"{where}.image"
    url = part.get("image_url")
    if isinstance(url, Mapping):
        return url.get("url"), f"{where}.image_url"
    return url, f"{where}.image_url"
