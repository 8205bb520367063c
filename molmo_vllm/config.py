"""The config shim: a Molmo checkpoint's config.json as a transformers config, and back.

vLLM reads every model's config through transformers. `MolmoHFConfig` (model_type "molmo")
holds config.json's fields as they are, so our checkpoints and Ai2's releases load with no
remote code; `molmo_config_of` turns what vLLM loaded into our `MolmoConfig`.
"""

from __future__ import annotations

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
