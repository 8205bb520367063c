"""Molmo served through vLLM: the plugin entry point, the config shim and the prompt helper.

Plugin mechanics
----------------
pyproject.toml declares the entry point `vllm.general_plugins: molmo =
molmo_model.vllm_adapter:register`. vLLM calls `register()` in every process it starts (the
front end when it builds its engine config, the engine core and each worker), so it is
idempotent and cheap. It

1. registers `MolmoHFConfig` with transformers' `AutoConfig` for model_type "molmo" and in
   vLLM's own config registry, so config.json loads with no remote code (an official Ai2
   config with an `auto_map` pointing at remote files loads too: the local class wins);
2. registers `molmo_model.vllm_model:MolmoForCausalLM` for the architecture
   "MolmoForCausalLM", replacing vLLM's built-in Molmo (which needs Ai2's remote processor).
   The class carries our multimodal processor (molmo_model/vllm_processor.py).

Prompt contract (requests with images; see also vllm_processor.py)
-----------------------------------------------------------------
* The prompt may contain one `<|image|>` token per image: the i-th is replaced by the i-th
  image's token sequence (global view + high-res grid, `molmo_model.preprocessing`).
* A prompt with no `<|image|>` gets all images' tokens right after BOS (`<|endoftext|>`,
  prepended when missing), which is Molmo's layout. So this works:

      llm = vllm.LLM(model=DIR, enforce_eager=True)
      llm.generate({"prompt": " User: Describe this image. Assistant:",
                    "multi_modal_data": {"image": pil_image}})

* Any other number of `<|image|>` tokens is an error. Text-only prompts are used exactly
  as tokenized (our tokenizer adds no BOS): use `build_vllm_prompt`, which adds it.

`build_vllm_prompt(tokenizer, messages, images)` turns OpenAI-style chat messages and the
request's decoded images into the prompt dict `vllm.LLM.generate` / `AsyncLLM.generate` take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PretrainedConfig

from molmo_model.config import LLMConfig
from molmo_model.preprocessing import prompt_text

ARCHITECTURE = "MolmoForCausalLM"
MODEL_CLASS = "molmo_model.vllm_model:MolmoForCausalLM"


class MolmoHFConfig(PretrainedConfig):
    """config.json of a Molmo checkpoint as a transformers config (model_type "molmo").

    Holds every field as given (our vision / geometry extras included); LLM fields missing
    from the file get `LLMConfig`'s defaults (Molmo-7B-D). `molmo_model.vllm_processor.
    molmo_config_of(cfg)` turns it into our `MolmoConfig`.
    """

    model_type = "molmo"

    def __init__(self, **kwargs: Any) -> None:
        defaults = LLMConfig()
        for name in LLMConfig.__dataclass_fields__:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        kwargs.setdefault("architectures", [ARCHITECTURE])
        # Molmo's BOS and EOS are both <|endoftext|>; its untied head never shares weights.
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


_registered = False


def register() -> None:
    """vLLM plugin entry point (see the module docstring). Safe to call repeatedly."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig

    AutoConfig.register("molmo", MolmoHFConfig, exist_ok=True)
    try:
        from vllm.transformers_utils import config as vllm_config_utils

        # vLLM consults its registry before AutoConfig and then drops trust_remote_code,
        # so an official config.json whose auto_map names remote files still loads locally.
        vllm_config_utils._CONFIG_REGISTRY["molmo"] = MolmoHFConfig
    except (ImportError, AttributeError):  # pragma: no cover - other vLLM versions
        pass

    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    _registered = True


# ---------------------------------------------------------------------------------------------
# Prompt helper for the server
# ---------------------------------------------------------------------------------------------


def _flatten_content(content: Any, where: str) -> str:
    """OpenAI message content -> text. A string stays; a list of parts keeps its text parts
    (joined with a newline) and drops image parts, whose pixels the caller passes as `images`."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, Sequence):
        raise ValueError(f"{where}.content must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or "type" not in part:
            raise ValueError(f"{where}.content[{j}] must be an object with a 'type'")
        if part["type"] == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}.content[{j}].text must be a string")
            texts.append(text)
        elif part["type"] not in ("image_url", "image", "input_image"):
            raise ValueError(f"{where}.content[{j}].type {part['type']!r} is not supported")
    return "\n".join(texts)


def flatten_messages(
    messages: Sequence[Mapping[str, Any]] | str,
) -> list[dict[str, str]] | str:
    """OpenAI-style messages -> the [{"role", "content": str}] list `prompt_text` and
    `MolmoPreprocessor.build_prompt` take (text parts joined with newlines, image parts
    dropped). A plain question string is returned as it is."""
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError(
            "messages must be a non-empty list of {'role', 'content'} objects or a string"
        )
    flat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        flat.append(
            {
                "role": message.get("role"),
                "content": _flatten_content(message.get("content"), f"messages[{i}]"),
            }
        )
    return flat


def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    """Number of image parts in OpenAI-style messages."""
    n = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            n += sum(
                1
                for part in content
                if isinstance(part, Mapping)
                and part.get("type") in ("image_url", "image", "input_image")
            )
    return n


def build_vllm_prompt(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]] | str,
    images: Sequence[Any] = (),
) -> dict[str, Any]:
    """The vLLM prompt for a Molmo chat: `{"prompt_token_ids": [...], "multi_modal_data":
    {"image": [...]}}` (no "multi_modal_data" key without images).

    tokenizer: a `MolmoTokenizer` (needs bos_id, image_id and encode).
    messages:  a question string, or OpenAI-style [{"role", "content"}] with roles user /
               assistant / system; content a string or a list of parts, whose text parts are
               joined with newlines and whose image parts are skipped.
    images:    the request's images in order (PIL images, e.g. from `load_image`).

    Token ids: BOS + one `<|image|>` per image + the text of `preprocessing.prompt_text`
    (" User: q Assistant:", multi-turn continuing the pattern). vLLM's processor replaces
    each `<|image|>` with that image's tokens, giving exactly the ids of
    `MolmoPreprocessor.build_prompt`. User text is encoded as plain text: special-token
    strings in it do not become special tokens.
    """
    flat = flatten_messages(messages)
    images = list(images)
    ids = [
        tokenizer.bos_id,
        *([tokenizer.image_id] * len(images)),
        *tokenizer.encode(prompt_text(flat)),
    ]
    prompt: dict[str, Any] = {"prompt_token_ids": ids}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    return prompt
