"""Molmo served through vLLM: the plugin, its config shim, multimodal processor and model.

    molmo_vllm/__init__.py   register(): the `vllm.general_plugins` entry point
    molmo_vllm/config.py     config.json <-> transformers config (no remote code)
    molmo_vllm/processor.py  images -> crops and the prompt's image tokens, for vLLM
    molmo_vllm/model.py      the vLLM model: molmo_model's vision backbone + a paged decoder
    molmo_vllm/molmo2_processor.py, molmo2_model.py   the same two rooms for Molmo 2
                             (config.json model_type "molmo2", Molmo2ForConditionalGeneration)
    molmo_vllm/cpu_fixes.py   fixes for vLLM 0.32's CPU backend (LoRA mixed batches, eager PP)
    molmo_vllm/prompt.py     OpenAI-style messages and images -> the engine prompt (the one
                             prompt builder: the server, `molmo eval`, benchmarks and tests)

Plugin mechanics: pyproject.toml declares the entry point `vllm.general_plugins: molmo =
molmo_vllm:register`. vLLM calls `register()` in every process it starts (the front end when
it builds its engine config, the engine core and each worker), so it is idempotent and cheap.
It registers `MolmoHFConfig` with transformers' `AutoConfig` for model_type "molmo" and in
vLLM's own config registry, so config.json loads with no remote code (an official Ai2 config
with an `auto_map` naming remote files loads too: the local class wins), and it registers
`molmo_vllm.model:MolmoForCausalLM` for the architecture "MolmoForCausalLM", replacing vLLM's
built-in Molmo (which needs Ai2's remote processor). Likewise for Molmo 2: `Molmo2HFConfig`
for model_type "molmo2" and `molmo_vllm.molmo2_model:Molmo2ForConditionalGeneration` for
"Molmo2ForConditionalGeneration", replacing vLLM's built-in molmo2.

Prompt contract (requests with images; see processor.py): the prompt may hold one `<|image|>`
token per image, the i-th replaced by the i-th image's tokens; a prompt with none gets all
images' tokens right after BOS (prepended when missing), which is Molmo's layout. So this
works:

    llm = vllm.LLM(model=DIR, enforce_eager=True)
    llm.generate({"prompt": " User: Describe this image. Assistant:",
                  "multi_modal_data": {"image": pil_image}})

Text-only prompts are used exactly as tokenized (our tokenizer adds no BOS): build prompts
with `molmo_vllm.prompt.build_prompt`, which adds it.

Importing this package imports neither vLLM nor torch; `register()` does.
"""

from __future__ import annotations

MODEL_CLASS = "molmo_vllm.model:MolmoForCausalLM"
MOLMO2_MODEL_CLASS = "molmo_vllm.molmo2_model:Molmo2ForConditionalGeneration"

_registered = False


def register() -> None:
    """vLLM plugin entry point (see the module docstring). Safe to call repeatedly."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig

    from molmo_vllm.config import (
        ARCHITECTURE,
        MOLMO2_ARCHITECTURE,
        Molmo2HFConfig,
        Molmo2TextHFConfig,
        MolmoHFConfig,
    )

    AutoConfig.register("molmo", MolmoHFConfig, exist_ok=True)
    AutoConfig.register("molmo2", Molmo2HFConfig, exist_ok=True)
    AutoConfig.register("molmo2_text", Molmo2TextHFConfig, exist_ok=True)
    try:
        from vllm.transformers_utils import config as vllm_config_utils

        # vLLM consults its registry before AutoConfig and then drops trust_remote_code,
        # so an official config.json whose auto_map names remote files still loads locally.
        vllm_config_utils._CONFIG_REGISTRY["molmo"] = MolmoHFConfig
        vllm_config_utils._CONFIG_REGISTRY["molmo2"] = Molmo2HFConfig
    except (ImportError, AttributeError):  # pragma: no cover - other vLLM versions
        pass

    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    # Replaces vLLM's built-in Molmo 2 (which needs Ai2's remote processor).
    ModelRegistry.register_model(MOLMO2_ARCHITECTURE, MOLMO2_MODEL_CLASS)
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP

        from molmo_vllm.config import Molmo2SchedulingHook

        # Whole-prompt prefills for Molmo 2 (bidirectional image prefill; config.py).
        MODELS_CONFIG_MAP[MOLMO2_ARCHITECTURE] = Molmo2SchedulingHook  # type: ignore[assignment]
    except ImportError:  # pragma: no cover - other vLLM versions
        pass
    from molmo_vllm import cpu_fixes

    cpu_fixes.patch()  # vLLM 0.32's CPU backend: LoRA in mixed batches, eager PP (cpu_fixes.py)
    _registered = True
