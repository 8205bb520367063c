"""`molmo serve` at scale: vLLM's parallelism passes through and gives the same answers.

* TP=2 (`--tensor-parallel-size 2 --distributed-executor-backend mp`, one CPU core per rank
  via VLLM_CPU_OMP_THREADS_BIND="0|1") answers a chat with an image with the greedy tokens
  of TP=1, on the tiny decisive checkpoint (wide greedy margins, so that a different but
  correct summation order cannot flip a token).
* `--pipeline-parallel-size 2` is refused at once (exit 2, a message that says why): our
  vLLM model does not implement pipeline parallelism.

    pytest tests/test_server_scale.py -q      # ~1.5 min on 2 CPU cores
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT, blocks_image, image_part, running_server

pytestmark = [pytest.mark.vllm, pytest.mark.server]
openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

FLAGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-images", "1")


def greedy(url: str, messages: list[dict]) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    r = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=8, logprobs=True
    )
    c = r.choices[0]
    return {
        "prompt_tokens": r.usage.prompt_tokens,
        "tokens": [t.token for t in c.logprobs.content],
        "content": c.message.content,
    }


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="TP=2 on a CPU binds one core per rank: needs 2"
)
def test_tensor_parallel_2_gives_the_greedy_tokens_of_1(decisive_checkpoint, tmp_path):
    path = decisive_checkpoint[0]
    image = tmp_path / "blocks.png"
    blocks_image(120, 90, seed=3).save(image)
    messages = [
        {
            "role": "user",
            "content": [image_part(image.read_bytes()), {"type": "text", "text": "Describe it."}],
        }
    ]
    answers = {}
    for tp in (1, 2):
        flags = (*FLAGS, "--tensor-parallel-size", str(tp), "--distributed-executor-backend", "mp")
        with pytest.MonkeyPatch.context() as env:
            if tp == 2:
                env.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
            with running_server(path, tmp_path, *flags) as server:
                answers[tp] = greedy(server.url, messages)
                log = server.log.read_text()
        assert f"tensor_parallel_size={tp}" in log  # vLLM's engine config line: TP passed through
    assert answers[2] == answers[1]
    assert answers[1]["prompt_tokens"] > 316 and len(answers[1]["tokens"]) == 8


def test_pipeline_parallelism_is_refused(tiny_checkpoint):
    cmd = [sys.executable, "-m", "server", "--model", str(tiny_checkpoint), "-pp", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "does not implement pipeline parallelism" in r.stderr
    assert "--tensor-parallel-size" in r.stderr
