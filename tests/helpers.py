"""Plain helpers the tests share (not a test module); their fixtures are in conftest.py.

- images: `encode_image`, `image_bytes`, `data_url`, `image_part`, `noise_image`, `blocks_image`;
- the OpenAI error shape: `assert_openai_error`;
- processes: `free_port`, `running_server` (the real `python -m server` on 127.0.0.1);
- vLLM: `vllm_engine` (one in-process `vllm.LLM`), `decisive_model`, `assert_same_greedy`;
- `OFFICIAL_FIELDS`: Ai2's Molmo-7B-D-0924 config.json.

Whatever starts a vLLM engine (`vllm_engine`, `running_server`, a CLI run) first calls
`require_vllm_marker`, which fails a test not marked `vllm` (conftest.py sets `ENGINE_ALLOWED`
before each test's fixtures).

Random tiny models give near-uniform logits, where a 1e-6 difference between two correct
implementations can flip a greedy choice. `decisive_model` scales the untied output head so
that logits spread over several nats and greedy choices have margins far above float32
noise, while everything upstream keeps the usual small init.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from molmo_model.config import MolmoConfig
from molmo_model.model import MolmoForCausalLM
from molmo_model.tokenizer import MolmoTokenizer

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on CPU; set for the session
ENGINE_ALLOWED = False  # whether the running test is marked `vllm` (set by conftest.py)

# ---------------------------------------------------------------- images


def encode_image(
    image: Image.Image, fmt: str = "PNG", orientation: int | None = None, **save_kw: object
) -> bytes:
    """`image` as the bytes of a `fmt` file; `orientation` writes that EXIF orientation tag
    (6: a viewer turns the stored pixels 90 degrees clockwise, 8: counter-clockwise)."""
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save_kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    image.save(buf, fmt, **save_kw)
    return buf.getvalue()


def image_bytes(
    width: int = 40,
    height: int = 30,
    fmt: str = "PNG",
    color: str = "red",
    orientation: int | None = None,
) -> bytes:
    """A plain `width` x `height` image of one colour, as a `fmt` file."""
    return encode_image(Image.new("RGB", (width, height), color), fmt, orientation)


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(raw: bytes, mime: str = "image/png") -> dict:
    """An OpenAI chat content part carrying `raw` as a data URL."""
    return {"type": "image_url", "image_url": {"url": data_url(raw, mime)}}


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def blocks_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Coarse random colour blocks: an image whose crops differ visibly from each other."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 40), max(1, width // 40), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.NEAREST)


# ---------------------------------------------------------------- HTTP


def assert_openai_error(
    r: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict:
    """`r` is an OpenAI-shaped error with `status` (and `code`, `param` where given)."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_vllm_marker() -> None:
    """Called by whatever starts a vLLM engine, in this process or a child."""
    if not ENGINE_ALLOWED:
        pytest.fail("this test starts a vLLM engine: mark it (or its module) `vllm`")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    saw_503: bool  # /health answered 503 while the engine loaded
    model_dir: str


@contextlib.contextmanager
def running_server(
    model_dir: str | Path, workdir: Path, *flags: str, module: str = "server"
) -> Iterator[Server]:
    """`python -m server --model model_dir *flags` on 127.0.0.1 and a free port, in its own
    process group, yielded once /health is 200. On exit: SIGTERM, then SIGKILL of the group.
    `module="vllm.entrypoints.openai.api_server"` runs vLLM's own OpenAI server instead."""
    require_vllm_marker()
    port = free_port()
    log = workdir / f"server-{port}.log"
    cmd = [sys.executable, "-m", module, "--model", str(model_dir), "--port", str(port), *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        saw_503, deadline = False, time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in time:\n{log.read_text()[-4000:]}")
            try:
                code = httpx.get(f"{url}/health", timeout=5).status_code
            except httpx.HTTPError:
                code = None
            saw_503 |= code == 503
            if code == 200:
                break
            time.sleep(0.5)
        yield Server(url, proc, log, saw_503, str(model_dir))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # the engine's processes too
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------- vLLM in process

TIE_MARGIN = 1e-3  # a greedy step may differ only where the reference's top-2 gap is below this
HEAD_SCALE = 8.0  # lm-head std 0.05 * 8 = 0.4: logits std ~4.5 nats for unit-RMS hidden states


def decisive_model(config: MolmoConfig, tok: MolmoTokenizer, seed: int = 0) -> MolmoForCausalLM:
    torch.manual_seed(seed)
    model = MolmoForCausalLM(config, im_patch_id=tok.im_patch_id).init_weights(std=0.05, seed=seed)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(HEAD_SCALE)
        # Image features large enough to move the logits: the projector's output scale.
        model.model.vision_backbone.image_projector.w2.weight.mul_(4.0)
    return model.eval()


@contextlib.contextmanager
def vllm_engine(model_dir: Path, **kwargs) -> Iterator[object]:
    """One `vllm.LLM` in eager mode with float32 weights (parity with the fp32 reference)."""
    require_vllm_marker()
    from vllm import LLM

    args = dict(
        model=str(model_dir),
        enforce_eager=True,
        dtype="float32",
        max_model_len=4096,
        seed=0,
        limit_mm_per_prompt={"image": 4},
    )
    args.update(kwargs)
    llm = LLM(**args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def assert_same_greedy(
    got: list[int], ref_tokens: list[int], ref_logprobs: list[torch.Tensor]
) -> None:
    """Equal tokens; a divergence is tolerated only at a genuine near-tie of the reference
    (top-2 gap < TIE_MARGIN), after which the sequences are not compared further."""
    for i, (a, b) in enumerate(zip(got, ref_tokens, strict=True)):
        if a == b:
            continue
        top2 = torch.topk(ref_logprobs[i], 2).values
        gap = float(top2[0] - top2[1])
        assert gap < TIE_MARGIN, f"step {i}: vLLM chose {a}, reference {b} (top-2 gap {gap:.4f})"
        return


# ---------------------------------------------------------------- Ai2's config

OFFICIAL_FIELDS = {  # the exact fields of Molmo-7B-D-0924's config.json (no vision fields)
    "architectures": ["MolmoForCausalLM"],
    "attention_layer_norm": False,
    "auto_map": {
        "AutoConfig": "config_molmo.MolmoConfig",
        "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM",
    },
    "clip_qkv": None,
    "embedding_size": 152064,
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 37888,
    "layer_norm_eps": 1e-06,
    "layer_norm_type": "rms",
    "max_position_embeddings": 4096,
    "model_type": "molmo",
    "norm_after": False,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "qkv_bias": True,
    "rope_theta": 1000000.0,
    "torch_dtype": "float32",
    "transformers_version": "4.43.3",
    "use_cache": True,
    "use_position_ids": True,
    "vocab_size": 152064,
    "weight_tying": False,
}

# Fields that name Ai2's remote code and tooling; our own configs leave them out.
REMOTE_CODE_FIELDS = ("auto_map", "transformers_version")
