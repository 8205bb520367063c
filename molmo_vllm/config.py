"""The config shim: a Molmo checkpoint's config.json as a transformers config, and back.

vLLM reads every model's config through transformers. `MolmoHFConfig` (model_type "molmo")
holds config.json's fields as they are, so our checkpoints and Ai2's releases load with no
remote code; `molmo_config_of` turns what vLLM loaded into our `MolmoConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from molmo_model.config import LLMConfig, MolmoConfig

ARCHITECTURE = "MolmoForCausalLM"


class MolmoHFConfig(PretrainedConfig):
    """config.json of a Molmo checkpoint as a transformers config (model_type "molmo").

    Holds every field as given (our vision / geometry extras included); LLM fields missing
    from the file get `LLMConfig`'s defaults (Molmo-7B-D). `quantization_config` (an int4
    checkpoint of `molmo quantize`) is one of the fields kept: vLLM picks its GPTQ method
    from it (tests/test_vllm_weights.py checks that it does).
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


def molmo_config_of(hf_config: Any) -> MolmoConfig:
    """Our `MolmoConfig` from the transformers config vLLM loaded (official Molmo configs
    carry no vision fields: those default to Molmo-7B-D's tower)."""
    d = hf_config.to_dict()
    rope = d.get("rope_parameters")
    # transformers may move rope_theta into rope_parameters when it standardizes RoPE.
    if d.get("rope_theta") is None and isinstance(rope, dict) and "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    return MolmoConfig.from_hf_dict(d)


# ---------------------------------------------------------------------------------------------
# Molmo 2
# ---------------------------------------------------------------------------------------------

MOLMO2_ARCHITECTURE = "Molmo2ForConditionalGeneration"


class Molmo2TextHFConfig(PretrainedConfig):
    """`text_config` of a Molmo 2 config.json (model_type "molmo2_text"): the decoder fields
    vLLM reads (hidden_size, heads, head_dim, layers, vocab_size, max_position_embeddings)
    as attributes, every other field kept as given."""

    model_type = "molmo2_text"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tie_word_embeddings", False)
        # Given both, transformers 5.x would standardize Ai2's RoPE fields (and fail: it
        # wants fields this config lacks); set afterwards, rope_scaling is stored as
        # `rope_parameters`, which molmo2_config_of reads back.
        rope = {k: kwargs.pop(k) for k in ("rope_scaling", "rope_theta") if k in kwargs}
        super().__init__(**kwargs)
        for key, value in rope.items():
            setattr(self, key, value)


class Molmo2HFConfig(PretrainedConfig):
    """config.json of a Molmo 2 checkpoint (model_type "molmo2"; Ai2's releases and ours).

    `text_config` becomes a `Molmo2TextHFConfig` (what vLLM's `get_text_config()` returns);
    `vit_config` and `adapter_config` stay dicts. `is_mm_prefix_lm` is False: our vLLM model
    does Ai2's bidirectional image prefill itself (vLLM's CPU attention has no mm prefix-LM
    mask, and vLLM's is per image; see molmo_vllm/molmo2_model.py), so vLLM must not plan for
    one. `Molmo2SchedulingHook` keeps each prompt's prefill in one step.
    """

    model_type = "molmo2"
    sub_configs = {"text_config": Molmo2TextHFConfig}

    def __init__(self, text_config: Any = None, **kwargs: Any) -> None:
        if isinstance(text_config, dict):
            text_config = Molmo2TextHFConfig(**text_config)
        self.text_config = text_config if text_config is not None else Molmo2TextHFConfig()
        kwargs.setdefault("architectures", [MOLMO2_ARCHITECTURE])
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs["is_mm_prefix_lm"] = False
        super().__init__(**kwargs)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> Any:
        return self.text_config


def molmo2_config_of(hf_config: Any) -> Any:
    """Our `Molmo2Config` (molmo_model.molmo2.config) from the transformers config vLLM loaded."""
    from molmo_model.molmo2.config import Molmo2Config

    d = hf_config.to_dict()
    text = d["text_config"]
    if not isinstance(text, dict):
        text = text.to_dict()
    rope = text.get("rope_parameters")
    if text.get("rope_theta") is None and isinstance(rope, dict) and "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
    # transformers 5.x keeps Ai2's rope_scaling (yarn for Molmo2-O-7B) as rope_parameters
    if text.get("rope_scaling") is None and isinstance(rope, dict):
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            text["rope_scaling"] = rope
    d["text_config"] = text
    return Molmo2Config.from_hf_dict(d)


def preprocess_config_of(folder: str | Path) -> Any:
    """A Molmo 2 checkpoint's image geometry (`Molmo2PreprocessConfig`): Ai2's
    preprocessor_config.json (+ processor_config.json) when the folder has them, else the
    released Molmo2-4B/8B values (our `molmo init` checkpoints use those)."""
    from molmo_model.molmo2.preprocessing import Molmo2PreprocessConfig

    folder = Path(folder)
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        return Molmo2PreprocessConfig()
    proc = folder / "processor_config.json"
    return Molmo2PreprocessConfig.from_hf(
        json.loads(pre.read_text()), json.loads(proc.read_text()) if proc.is_file() else None
    )


def video_config_of(folder: str | Path) -> Any:
    """A Molmo 2 checkpoint's video sampling and layout (`Molmo2VideoConfig`): Ai2's
    video_preprocessor_config.json (+ processor_config.json) when the folder has them, else
    the released defaults."""
    from molmo_model.molmo2.preprocessing import Molmo2VideoConfig

    folder = Path(folder)
    pre = folder / "video_preprocessor_config.json"
    if not pre.is_file():
        return Molmo2VideoConfig()
    proc = folder / "processor_config.json"
    return Molmo2VideoConfig.from_hf(
        json.loads(pre.read_text()), json.loads(proc.read_text()) if proc.is_file() else None
    )


class Molmo2SchedulingHook:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`, registered by `register()`)
    for Molmo 2: every prompt is prefilled in ONE step, from no cached prefix.

    Our vLLM model reproduces Ai2's bidirectional image prefill (image tokens see every image
    token of the prompt; molmo_vllm/molmo2_model.py) only for a sequence whose whole prompt is
    in the step. A chunk of a prompt cannot know the images of later chunks, and a cached
    prefix's image keys would depend on the images after it, so chunked prefill and prefix
    caching are turned off (`max_num_batched_tokens` raised to `max_model_len` when lower).
    """

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        sched, cache = vllm_config.scheduler_config, vllm_config.cache_config
        max_len = vllm_config.model_config.max_model_len
        changed = []
        if sched.enable_chunked_prefill:
            sched.enable_chunked_prefill = False
            changed.append("chunked prefill off")
        sched.long_prefill_token_threshold = 0
        if sched.max_num_batched_tokens < max_len:
            sched.max_num_batched_tokens = max_len
            sched.max_num_encoder_input_tokens = sched.encoder_cache_size = max(
                sched.max_num_encoder_input_tokens, max_len
            )
            changed.append(f"max_num_batched_tokens {max_len}")
        if getattr(sched, "max_num_scheduled_tokens", None) is not None:
            sched.max_num_scheduled_tokens = max(sched.max_num_scheduled_tokens, max_len)
        if cache.enable_prefix_caching:
            cache.enable_prefix_caching = False
            changed.append("prefix caching off")
        if changed:
            import logging

            logging.getLogger("molmo_vllm").info(
                "Molmo 2 (bidirectional image prefill needs whole prompts): %s", ", ".join(changed)
            )

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        return
