"""ServerConfig: every setting of `molmo serve`, checked when it is built.

A bad value raises ValueError naming the field, so the CLI can print it and exit 2.
"""

from __future__ import annotations

from dataclasses import dataclass

EXECUTOR_BACKENDS = ("mp", "ray", "uni", "external_launcher")  # vLLM's
STRUCTURED_OUTPUTS_BACKENDS = ("auto", "xgrammar", "guidance", "outlines")  # vLLM's
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank takes
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    model: str  # checkpoint folder (config.json, weights, tokenizer.json)
    served_model_name: str | None = None  # the `model` id clients send; default: folder name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`

    # Request limits: a request over any of them gets a 4xx, never reaches the engine.
    max_images: int = 4  # images per request (also vLLM's limit_mm_per_prompt)
    max_image_pixels: int = 64_000_000  # width * height of one decoded image
    max_body_bytes: int = 32 * 1024 * 1024  # HTTP request body
    max_queue: int = 256  # requests admitted at once (running + waiting); more get 429
    max_n: int = 16  # choices per chat request
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: data: URLs only)
    remote_image_timeout: float = 10.0  # seconds for one remote image, connect to last byte
    remote_image_max_bytes: int = 20 * 1024 * 1024  # size of one remote image
    remote_image_domains: tuple[str, ...] | None = None  # hosts allowed (exact names); None: any
    remote_image_ports: tuple[int, ...] = (80, 443)  # ports remote image URLs may use
    allow_private_image_addresses: bool = False  # fetch from loopback/private/link-local too
    decode_workers: int = 2  # threads decoding images (all requests share them)
    decode_pixel_budget: int | None = None  # pixels decoding at once; default: max_image_pixels
    header_read_timeout: float = 30.0  # seconds to receive a request's headers (then 408)
    body_read_timeout: float = 30.0  # seconds to receive a request's whole body (then 408)
    max_connections: int = 1024  # open HTTP connections; more get 503
    ui: bool = True  # the playground page at / (it calls /v1/* like any client, key included)

    # Engine (vLLM) settings.
    max_model_len: int | None = None  # context length; default: the model's
    max_num_seqs: int | None = None  # sequences batched at once; default: vLLM's
    enforce_eager: bool = False  # no graph capture / compilation (fast start, CPU tests)
    fast_preprocessing: bool = False  # uint8 crops normalized on the device (default: exact)
    dtype: str = "auto"
    quantization: str | None = None  # vLLM's method (fp8: GPU); None: what config.json says
    gpu_memory_utilization: float | None = None
    seed: int = 0
    disable_log_stats: bool = False
    structured_outputs_backend: str = "auto"  # vLLM's: auto, xgrammar, guidance, outlines
    structured_outputs_disable_any_whitespace: bool = False  # JSON answers without free whitespace

    # Scale-out: vLLM's own parallelism, passed through (README, "Scaling").
    tensor_parallel_size: int = 1  # split each layer over this many devices (CPU: cores)
    pipeline_parallel_size: int = 1  # split the decoder's blocks in stages over ranks
    data_parallel_size: int = 1  # model replicas behind one front end
    distributed_executor_backend: str | None = None  # mp, ray, uni, external_launcher

    # LoRA adapters (server/adapters.py): a request's `model` picks one by name.
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, adapter folder) served from the start
    enable_lora: bool = False  # adapters on (implied by lora_modules and allow_runtime_lora)
    max_loras: int = 1  # adapters in one engine batch
    max_lora_rank: int = 16  # the largest rank an adapter may have
    max_cpu_loras: int | None = None  # adapters vLLM keeps loaded in host memory (LRU)
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter

    # Process.
    shutdown_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    engine_start_timeout: float = 3600.0  # seconds the engine may take to start (else exit 1)
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: a checkpoint folder is required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        positive = {
            "max_images": self.max_images,
            "max_image_pixels": self.max_image_pixels,
            "max_body_bytes": self.max_body_bytes,
            "max_queue": self.max_queue,
            "max_n": self.max_n,
            "remote_image_max_bytes": self.remote_image_max_bytes,
            "decode_workers": self.decode_workers,
            "max_connections": self.max_connections,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.remote_image_timeout <= 0:
            raise ValueError(f"remote_image_timeout must be > 0, got {self.remote_image_timeout}")
        if self.decode_pixel_budget is None:
            self.decode_pixel_budget = self.max_image_pixels
        elif self.decode_pixel_budget < 1:
            raise ValueError(f"decode_pixel_budget must be >= 1, got {self.decode_pixel_budget}")
        for name in ("header_read_timeout", "body_read_timeout", "engine_start_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.remote_image_ports or any(not 0 < p < 65536 for p in self.remote_image_ports):
            raise ValueError(
                f"remote_image_ports must be ports in [1, 65535], got {self.remote_image_ports}"
            )
        if self.remote_image_domains is not None:
            self.remote_image_domains = tuple(
                d.strip().lower().rstrip(".") for d in self.remote_image_domains
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distributed_executor_backend not in (None, *EXECUTOR_BACKENDS):
            raise ValueError(
                f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                f"got {self.distributed_executor_backend!r}"
            )
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        self.lora_modules = tuple((str(n), str(p)) for n, p in self.lora_modules)
        names = [n for n, _ in self.lora_modules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"lora_modules: the name(s) {', '.join(duplicates)} are given twice")
        self.enable_lora = self.enable_lora or bool(self.lora_modules) or self.allow_runtime_lora
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))} "
                             f"(vLLM's), got {self.max_lora_rank}")  # fmt: skip
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras}")
        if self.allow_runtime_lora and self.api_key is None and self.host not in _LOOPBACK:
            # Loading an adapter reads a folder on this machine: not for anyone on the network.
            raise ValueError("allow_runtime_lora on a non-loopback host needs an api_key "
                             "(--api-key or MOLMO_API_KEY)")  # fmt: skip
        if self.structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, "
                             f"got {self.structured_outputs_backend!r}")  # fmt: skip
        if self.structured_outputs_disable_any_whitespace:
            if self.structured_outputs_backend == "outlines":
                raise ValueError("structured_outputs_disable_any_whitespace needs the xgrammar or guidance "
                                 "backend, not outlines")  # fmt: skip
            if self.structured_outputs_backend == "auto":
                self.structured_outputs_backend = "xgrammar"  # vLLM allows the option with a named backend only
        if self.quantization is not None and not self.quantization.strip():
            raise ValueError("quantization must not be empty")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
