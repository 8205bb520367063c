"""vLLM's AsyncLLM for a Molmo checkpoint folder, and what the server reads from that folder.

The engine runs in this process's event loop (its EngineCore in vLLM's worker processes);
the Molmo model and its image processor come from our vLLM plugin
(`molmo_vllm`, registered through the `vllm.general_plugins` entry point).
`build_engine` blocks for the whole start-up (tens of seconds on a CPU), so the app calls it
in a thread and answers /health with 503 until it returns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molmo_model.checkpoint import MOLMO, MOLMO2, model_family
from molmo_model.config import MolmoConfig
from molmo_model.preprocessing import MolmoPreprocessor
from server.config import ServerConfig


@dataclass
class ModelInfo:
    """Facts about the served checkpoint that the server needs without the engine."""

    name: str  # the model id clients see
    path: str
    # The checkpoint's image geometry (image token counts): PreprocessConfig for Molmo,
    # Molmo2PreprocessConfig for Molmo 2.
    preprocess: Any
    max_position_embeddings: int
    config: Any  # the base's whole config: MolmoConfig (adapters are checked against it) or Molmo2Config
    family: str = MOLMO  # molmo_model.checkpoint.model_family: "molmo" or "molmo2"

    @classmethod
    def from_dir(cls, path: str, served_name: str | None = None) -> ModelInfo:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"model: {path} has no config.json (not a checkpoint folder)")
        family = model_family(json.loads((folder / "config.json").read_text()))
        name = served_name or folder.resolve().name
        if family == MOLMO2:
            from molmo_model.molmo2.config import Molmo2Config
            from molmo_vllm.config import preprocess_config_of

            m2 = Molmo2Config.load(folder)
            return cls(name, str(folder), preprocess_config_of(folder),
                       m2.text.max_position_embeddings, m2, MOLMO2)  # fmt: skip
        config = MolmoConfig.load(folder)
        return cls(
            name=name,
            path=str(folder),
            preprocess=config.preprocess,
            max_position_embeddings=config.llm.max_position_embeddings,
            config=config,
        )

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer: MolmoTokenizer, or Molmo2Tokenizer for Molmo 2."""
        from molmo_model.tokenizer import Molmo2Tokenizer, MolmoTokenizer

        return (Molmo2Tokenizer if self.family == MOLMO2 else MolmoTokenizer).from_dir(self.path)

    def preprocessor(self, tokenizer: Any) -> Any:
        """The family's preprocessor (the server counts image tokens with it, as the engine's
        processor does with the same class)."""
        if self.family == MOLMO2:
            from molmo_model.molmo2.preprocessing import Molmo2Preprocessor

            return Molmo2Preprocessor(self.preprocess, tokenizer, tokenizer.BOS)
        return MolmoPreprocessor(self.preprocess, tokenizer)


def engine_args(config: ServerConfig) -> Any:
    """vLLM AsyncEngineArgs for `config` (imported lazily: vLLM is slow to import)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = {
        "model": config.model,
        "tokenizer": config.model,
        "enforce_eager": config.enforce_eager,
        # Off: the exact image path; on (vLLM's own default for our model): the fast path.
        "mm_device_do_normalize": config.fast_preprocessing,
        "dtype": config.dtype,
        "seed": config.seed,
        # No video: the server does not take it yet (Molmo 2 would profile a longest video).
        "limit_mm_per_prompt": {"image": config.max_images, "video": 0},
        "disable_log_stats": config.disable_log_stats,
        "structured_outputs_config": {
            "backend": config.structured_outputs_backend,
            "disable_any_whitespace": config.structured_outputs_disable_any_whitespace,
        },
    }
    if config.quantization is not None:
        kwargs["quantization"] = config.quantization
    if config.served_model_name:
        kwargs["served_model_name"] = config.served_model_name
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.max_num_seqs is not None:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if config.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    if config.enable_lora:
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = config.max_loras
        kwargs["max_lora_rank"] = config.max_lora_rank
        # Room for every adapter given at start-up, so none is evicted and reloaded per request.
        kwargs["max_cpu_loras"] = config.max_cpu_loras or max(config.max_loras, len(config.lora_modules))
    kwargs["tensor_parallel_size"] = config.tensor_parallel_size
    kwargs["pipeline_parallel_size"] = config.pipeline_parallel_size
    kwargs["data_parallel_size"] = config.data_parallel_size
    if config.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = config.distributed_executor_backend
    return AsyncEngineArgs(**kwargs)


def check_parallel(config: ServerConfig) -> None:
    """Refuse (ValueError) a parallel layout that cannot run here, before any engine starts.
    On a CPU, vLLM binds each rank (tensor x pipeline) to cores of its own
    (VLLM_CPU_OMP_THREADS_BIND), so the ranks must not outnumber the cores this process may
    use; vLLM itself would only fail deep into its start-up."""
    ranks = config.tensor_parallel_size * config.pipeline_parallel_size
    if ranks == 1:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    cores = len(os.sched_getaffinity(0))
    if ranks > cores:
        raise ValueError(
            f"tensor_parallel_size={config.tensor_parallel_size} x pipeline_parallel_size="
            f"{config.pipeline_parallel_size} = {ranks} ranks, but this server may use {cores} CPU "
            "core(s): vLLM's CPU backend gives every rank cores of its own; use fewer ranks"
        )


def check_quantization(config: ServerConfig) -> None:
    """Refuse (ValueError) a --quantization that vLLM does not know, or fp8 on a CPU: vLLM's
    online fp8 runs on GPUs only (vLLM 0.32's CPU build fails late in its worker, in an fp8
    op it lacks). Other methods' limits are left to vLLM's own errors. int4 checkpoints
    (`molmo quantize`) need no flag: their config.json names the method."""
    if config.quantization is None:
        return
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.platforms import current_platform

    if config.quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of vLLM's methods ({', '.join(QUANTIZATION_METHODS)}), "
                         f"got {config.quantization!r}")  # fmt: skip
    if current_platform.is_cpu() and config.quantization.startswith("fp8"):
        raise ValueError(f"quantization {config.quantization!r} needs a GPU: vLLM's CPU build has no "
                         "fp8 kernels; on a CPU serve an int4 checkpoint (molmo quantize)")  # fmt: skip


def build_engine(config: ServerConfig) -> Any:
    """Start vLLM's AsyncLLM (blocking; returns when the engine can take requests)."""
    check_parallel(config)
    check_quantization(config)
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(
        engine_args(config), usage_context=UsageContext.OPENAI_API_SERVER
    )
