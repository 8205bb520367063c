"""`molmo serve` / `python -m server`: parse flags, pick the model, run uvicorn.

    python -m server --model DIR --port 8000 --api-key KEY --max-images 4 --enforce-eager

With no --model the project's default model is served (see `default_model_dir`). SIGTERM
(or Ctrl-C) stops accepting connections, lets in-flight requests finish for up to
--shutdown-timeout seconds, cancels the rest (aborting them in the engine) and shuts the
engine down. The exit code is 1 when the engine failed to start (or died), 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.config import EXECUTOR_BACKENDS, STRUCTURED_OUTPUTS_BACKENDS, ServerConfig
from server.engine import check_parallel, check_quantization

DEFAULT_PRESET = "tiny"
# The project's trained demo model (`molmo train --preset demo-gpu`; see its README.md).
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "molmo-demo"


def default_model_dir(prefer_demo: bool = True) -> Path:
    """The model `molmo serve` runs when given no --model.

    The trained demo model committed at models/molmo-demo, when this is a checkout that has
    it. Otherwise (an install without the repository's models/ folder, or prefer_demo=False)
    a random-weight `tiny` checkpoint, written once to ~/.cache/molmo-serve/tiny (or
    $MOLMO_SERVE_CACHE/tiny).
    """
    if prefer_demo and (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL
    from molmo_model.checkpoint import init_checkpoint

    cache = Path(os.environ.get("MOLMO_SERVE_CACHE", Path.home() / ".cache" / "molmo-serve"))
    out = cache / DEFAULT_PRESET
    if not (out / "config.json").is_file():
        tmp = cache / f".{DEFAULT_PRESET}.{os.getpid()}.tmp"
        init_checkpoint(DEFAULT_PRESET, tmp)
        try:
            tmp.rename(out)  # atomic: a concurrent start either wins or finds it done
        except OSError:
            if not (out / "config.json").is_file():
                raise
    return out


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig(model="-")
    p = argparse.ArgumentParser(
        prog="molmo serve",
        description="Serve a Molmo checkpoint behind an OpenAI-compatible API with pointing.",
    )
    p.add_argument("--model", help="checkpoint folder (default: the project's default model)")
    p.add_argument("--served-model-name", help="model id clients send (default: folder name)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--api-key",
        default=os.environ.get("MOLMO_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (env MOLMO_API_KEY)",
    )
    p.add_argument(
        "--no-ui",
        dest="ui",
        action="store_false",
        help="no playground page at / (the page only calls /v1/*, with the user's key)",
    )
    g = p.add_argument_group("request limits")
    g.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    g.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (default: data: URLs only)",
    )
    g.add_argument("--remote-image-timeout", type=float, default=d.remote_image_timeout)
    g.add_argument("--remote-image-max-bytes", type=int, default=d.remote_image_max_bytes)
    g.add_argument(
        "--remote-image-domains",
        type=_names,
        help="comma-separated hosts remote images may come from (exact names; default: any)",
    )
    g.add_argument(
        "--remote-image-ports",
        type=_ports,
        default=d.remote_image_ports,
        help="comma-separated ports remote image URLs may use (default: 80,443)",
    )
    g.add_argument(
        "--allow-private-image-addresses",
        action="store_true",
        help="let remote image URLs reach loopback, private and link-local addresses",
    )
    g.add_argument("--decode-workers", type=int, default=d.decode_workers)
    g.add_argument(
        "--decode-pixel-budget",
        type=int,
        help="pixels of all requests decoding at once (default: --max-image-pixels)",
    )
    g.add_argument(
        "--header-read-timeout",
        type=float,
        default=d.header_read_timeout,
        help="seconds a client has to send a request's headers (then 408; an idle new "
        "connection is closed)",
    )
    g.add_argument(
        "--body-read-timeout",
        type=float,
        default=d.body_read_timeout,
        help="seconds a client has to send a request body (then 408)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="open connections; more get 503",
    )
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    g.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="requests in flight at once; more get 429",
    )
    g.add_argument("--max-n", type=int, default=d.max_n, help="choices per chat request")
    e = p.add_argument_group("engine (vLLM)")
    e.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    e.add_argument("--max-num-seqs", type=int, help="sequences batched at once")
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation")
    e.add_argument(
        "--fast-preprocessing",
        action="store_true",
        help="uint8 crops normalized on the device (default: the exact path, float32 crops "
        "pixel-identical to Ai2's preprocessing; README: Image preprocessing)",
    )
    e.add_argument("--dtype", default=d.dtype)
    e.add_argument("--quantization", help="vLLM's quantization method, e.g. fp8 (GPU only; online, "
                   "from a float checkpoint); an int4 checkpoint (molmo quantize) needs none")  # fmt: skip
    e.add_argument("--gpu-memory-utilization", type=float)
    e.add_argument("--seed", type=int, default=d.seed)
    e.add_argument("--disable-log-stats", action="store_true")
    e.add_argument("--structured-outputs-backend", default=d.structured_outputs_backend,
                   choices=STRUCTURED_OUTPUTS_BACKENDS,
                   help="vLLM's backend for response_format / structured_outputs")
    e.add_argument("--structured-outputs-disable-any-whitespace", action="store_true",
                   help="JSON answers without free whitespace (a weak model may otherwise pad "
                   "them with newlines up to max_tokens)")
    s = p.add_argument_group("scale-out (vLLM's parallelism; README: Scaling)")
    for name, short, text in (
        ("tensor_parallel_size", "-tp", "devices each layer is split over (CPU: cores, with "
         "VLLM_CPU_OMP_THREADS_BIND)"),
        ("pipeline_parallel_size", "-pp", "pipeline stages: the decoder's blocks split in "
         "order over ranks, the vision tower on the first (CPU: one core per rank)"),
        ("data_parallel_size", "-dp", "model replicas behind this server"),
    ):
        flag = "--" + name.replace("_", "-")
        s.add_argument(flag, short, type=int, default=getattr(d, name), help=text)
    s.add_argument(
        "--distributed-executor-backend", choices=EXECUTOR_BACKENDS,
        help="how vLLM starts its workers (default: vLLM's choice; ray for several machines)",
    )
    lo = p.add_argument_group("LoRA adapters (README: Adapters)")
    lo.add_argument(
        "--lora-modules", nargs="+", action="extend", metavar="NAME=DIR",
        help="serve these PEFT adapters (molmo train --lora) on the base; a request's model "
        "picks one by NAME, the base's name picks none",
    )
    lo.add_argument("--enable-lora", action="store_true",
                    help="adapters on without any at start (for --allow-runtime-lora)")
    lo.add_argument("--max-loras", type=int, default=d.max_loras, help="adapters in one batch")
    lo.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank,
                    help="largest adapter rank (vLLM's values: 8, 16, 32, 64, ...)")
    lo.add_argument("--max-cpu-loras", type=int, help="adapters kept loaded in host memory")
    lo.add_argument(
        "--allow-runtime-lora", action="store_true",
        help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind --api-key; "
        "required on a non-loopback host)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=d.shutdown_timeout,
        help="seconds SIGTERM waits for in-flight requests",
    )
    p.add_argument(
        "--engine-start-timeout",
        type=float,
        default=d.engine_start_timeout,
        help="seconds the engine may take to start before the server exits with 1",
    )
    p.add_argument(
        "--log-level",
        default=d.log_level,
        choices=["critical", "error", "warning", "info", "debug"],
    )
    return p


def config_from_args(argv: list[str]) -> ServerConfig:
    args = vars(build_parser().parse_args(argv))
    from server.adapters import parse_lora_modules

    args["lora_modules"] = parse_lora_modules(args["lora_modules"])
    if args["model"] is None:
        args["model"] = str(default_model_dir())
    return ServerConfig(**args)


def serve(argv: list[str] | None = None) -> int:
    """Entry point of `molmo serve`; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(argv)
        check_parallel(config)
        check_quantization(config)
    except ValueError as e:
        print(f"molmo serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from server.app import create_app
    from server.connections import protocol_class
    from server.images import return_freed_images_to_the_os

    return_freed_images_to_the_os()
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(config)
    except ValueError as e:
        print(f"molmo serve: error: {e}", file=sys.stderr)
        return 2
    server = _server_class()(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            timeout_graceful_shutdown=config.shutdown_timeout,
            limit_concurrency=config.max_connections,
            http=protocol_class(config.header_read_timeout),
            access_log=False,
        )
    )
    server.run()
    if app.state.startup_error is not None or app.state.engine_died:
        return 1
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _ports(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ports: {text!r}") from None


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a signal that ended in a clean shutdown is not
        raised again afterwards, so `serve` returns 0 instead of dying by SIGTERM."""

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server
