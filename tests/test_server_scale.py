"""`molmo serve` at scale: vLLM's parallelism passes through and gives the same answers.

* TP=2 (`--tensor-parallel-size 2 --distributed-executor-backend mp`, one CPU core per rank
  via VLLM_CPU_OMP_THREADS_BIND="0|1") and PP=2 (`--pipeline-parallel-size 2`: the blocks in
  two stages, the vision tower on the first) each answer a chat with an image with the greedy
  tokens of TP=PP=1, on the tiny decisive checkpoint (wide greedy margins, so that a
  different but correct summation order cannot flip a token).
* More ranks than cores (TP=2 x PP=2 on two cores) is refused at once (exit 2, a message
  that says why).

    pytest tests/test_server_scale.py -q      # ~2 min on 2 CPU cores
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
def test_tensor_and_pipeline_parallel_2_give_the_greedy_tokens_of_1(decisive_checkpoint, tmp_path):
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
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        flags = (*FLAGS, "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
                 "--distributed-executor-backend", "mp")  # fmt: skip
        with pytest.MonkeyPatch.context() as env:
            if tp * pp == 2:
                env.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
            with running_server(path, tmp_path, *flags) as server:
                answers[tp, pp] = greedy(server.url, messages)
                log = server.log.read_text()
        # vLLM's engine config line: the layout passed through
        assert f"tensor_parallel_size={tp}, pipeline_parallel_size={pp}" in log
    assert answers[2, 1] == answers[1, 1]
    assert answers[1, 2] == answers[1, 1]
    assert answers[1, 1]["prompt_tokens"] > 316 and len(answers[1, 1]["tokens"]) == 8


@pytest.mark.skipif(len(os.sched_getaffinity(0)) >= 4, reason="needs fewer than 4 cores to refuse TP=2 x PP=2")
def test_more_ranks_than_cores_is_refused(tiny_checkpoint):
    cmd = [sys.executable, "-m", "server", "--model", str(tiny_checkpoint), "-tp", "2", "-pp", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "= 4 ranks, but this server may use" in r.stderr and "Traceback" not in r.stderr
