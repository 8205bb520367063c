"""The servers a serving benchmark starts, and the CPU time their API process spends.

`server_command("ours" | "vllm", model, common)` gives the command line of `molmo serve` or of
vLLM's own OpenAI server (the baseline) for the same checkpoint and engine flags; vLLM's gets
Molmo's chat template (molmo_model/chat_template.jinja) so that both see token-identical
prompts. `ServerProcess` starts one in its own process group, waits for /health and
stops it. `cpu_seconds(pid)` reads one process's own CPU time.

    port = free_port()
    with ServerProcess("ours", [*server_command("ours", model, common), "--port", str(port)],
                       port, log_path) as server:
        cpu0 = cpu_seconds(server.pid)
        ...  # drive load at server.url
        api_cpu_s = cpu_seconds(server.pid) - cpu0
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from molmo_model.tokenizer import CHAT_TEMPLATE_FILE

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 900  # a cold vLLM start on a loaded 2-core machine takes minutes
SERVED_NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, model: str, common: list[str]) -> list[str]:
    """`molmo serve` ("ours") or vLLM's OpenAI server ("vllm") on `model`, one image per
    request, with the engine flags `common` (context, batch size, dtype, eager) shared by both."""
    if name == "ours":
        return [sys.executable, "-m", "server", "--model", model, "--served-model-name", SERVED_NAME,
                "--max-images", "1", "--max-queue", "100000", *common]  # fmt: skip
    if name == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--served-model-name", SERVED_NAME, "--limit-mm-per-prompt", '{"image": 1}',
                "--chat-template", str(CHAT_TEMPLATE_FILE), "--disable-uvicorn-access-log", *common]  # fmt: skip
    raise ValueError(f"server name: expected 'ours' or 'vllm', got {name!r}")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (all its threads, not its children): for a
    server, the API process (HTTP server + vLLM's frontend), not the engine processes. Unlike
    wall time, other jobs on a shared machine barely move it. None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime in ticks


class ServerProcess:
    """A server started in its own process group, ready (GET /health is 200) inside the
    `with`, stopped on leaving it (SIGTERM; after 60 s SIGKILL to the group, so that vLLM's
    engine processes go too); output goes to `log`."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path) -> None:
        self.name, self.cmd, self.port, self.log = name, cmd, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not started"
        return self.proc.pid

    def __enter__(self) -> ServerProcess:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        t0 = time.monotonic()
        try:
            while not self._healthy():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
                if time.monotonic() - t0 > START_TIMEOUT_S:
                    raise RuntimeError(
                        f"{self.name} did not start:\n{self.log.read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise
        print(f"{self.name}: ready in {time.monotonic() - t0:.0f} s", flush=True)
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group: vLLM's engine processes too
            self.proc.wait()
