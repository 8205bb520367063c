"""Every command in README.md runs: a doc test that extracts the commands from its code blocks.

`bash` blocks: each line is a command (a trailing `# comment` dropped); `molmo` runs as
`python -m molmo_cli`. Each runs in a scratch folder that links the repository's `training`,
`scripts` and `models`, with `/tmp/tiny` moved into it, at a small size, by `SMALL`: the
arguments appended (or substituted) and why. A command with no entry fails the test, so a
new README command needs one. What runs:

- the fine-tuning commands in full (tiny model, 1 step), and `molmo eval` on the reference
  engine (the vLLM engine is what tests/test_eval_engines.py and test_finetune.py start);
- the demo / example / torchrun training commands with `--print-config`: they resolve and
  check the whole config, but a demo run takes 7-45 minutes and writes models/molmo-demo;
- other subcommands (`molmo bench`, `point`, `chat`) with `--help`, the upstream vLLM server
  not at all: `BY_PREFIX` says why for each;
- `molmo serve ...` up to its parsed `ServerConfig` (starting an engine costs ~30 s and is
  what the server tests do); `scripts/serve.sh` itself is started to /health in the `vllm`
  test below; `scripts/test.sh` is this suite, so it is only syntax-checked (`bash -n`).

`python` blocks need a running server or engine: they are compiled, not run.

    pytest tests/test_readme.py -q
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, free_port, require_vllm_marker

README = ROOT / "README.md"
ONE_STEP = ["--steps", "1", "--batch-size", "1", "--set", "run.progress=false"]
QUICK_EVAL = ["--engine", "reference", "--examples", "1", "--max-new-tokens", "8"]

# README command (as written) -> (how it runs here: "run", "print-config", "serve-args", "syntax",
# "source"; arguments to append)
SMALL: dict[str, tuple[str, list[str]]] = {
    "scripts/serve.sh": ("syntax", []),  # started for real in test_serve_script_answers_health
    "scripts/test.sh": ("syntax", []),  # the suite that runs this test
    ". scripts/setup.sh": ("source", []),
    "molmo init --preset tiny --out /tmp/tiny": ("run", []),
    "molmo serve --model /tmp/tiny --api-key secret --max-images 4": ("serve-args", []),
    "python -m training.data my_data --split train --size 16": ("run", []),
    "python -m training.data my_val --split val --size 4": ("run", []),
    "molmo train --init-from /tmp/tiny --data my_data/train.jsonl --val-data my_val/val.jsonl --out runs/mine "
    "--steps 200": ("run", [*ONE_STEP, "--set", "run.eval_examples=1"]),
    "molmo eval --model runs/mine/model --data my_val/val.jsonl": ("run", QUICK_EVAL),
    "molmo serve --model runs/mine/model": ("serve-args", []),
    "molmo train --preset demo-gpu": ("print-config", ["--print-config"]),
    "molmo train --preset demo": ("print-config", ["--print-config"]),
    "molmo train --config training/configs/example.toml --set run.steps=2000": ("print-config", ["--print-config"]),
    "torchrun --nproc-per-node 2 -m molmo_cli train --config my.toml": ("print-config", ["--print-config"]),
    "molmo eval --model models/molmo-demo --engine vllm": ("run", [*QUICK_EVAL, "--tasks", "count", "--out", "demo_eval.json"]),
    "molmo train --init-from /tmp/tiny --data my_data/train.jsonl --lora 8 --out runs/pets --steps 200": (
        "run", ONE_STEP),
    "molmo eval --model /tmp/tiny --lora runs/pets/adapter --data my_val/val.jsonl": ("run", QUICK_EVAL),
    # Parsed, then the app is built without an engine: the adapter is checked against the base.
    "molmo serve --model /tmp/tiny --lora-modules pets=runs/pets/adapter --max-lora-rank 8": ("serve-args", []),
    "molmo export --merge-lora --model /tmp/tiny --lora runs/pets/adapter --out runs/pets/merged": ("run", []),
    "molmo quantize --model models/molmo-demo --bits 4 --group-size 64 --out runs/demo-int4": ("run", []),
    "molmo serve --model runs/demo-int4": ("serve-args", []),
    "molmo init --preset molmo2-tiny --out /tmp/tiny2": ("run", []),
    "molmo serve --model /tmp/tiny2": ("serve-args", []),  # served for real by tests/test_molmo2_serve.py
}  # fmt: skip

# Commands of other subcommands, by prefix: they need a running server, an image of the
# user's or a download, so their subcommand's --help runs (it exists and parses); why not more:
BY_PREFIX: dict[str, tuple[str, str]] = {
    "molmo bench ": ("help", "load-tests a running server for minutes (tests/ of `molmo bench` run it small)"),
    "molmo point ": ("help", "asks a running server about the user's photo.jpg"),
    "molmo chat ": ("help", "asks a running server about the user's photo.jpg"),
    "python -m vllm.entrypoints.openai.api_server ": ("skip", "downloads allenai/Molmo-7B-D-0924 (7B, no "
                                                      "network in CI); tests/test_vllm_official.py serves its layout"),
}  # fmt: skip


def plan(command: str) -> tuple[str, list[str]]:
    """How `command` runs here (see SMALL and BY_PREFIX)."""
    if command in SMALL:
        return SMALL[command]
    for prefix, (how, _why) in BY_PREFIX.items():
        if command.startswith(prefix):
            return how, []
    raise KeyError(command)


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
    commands = []
    for block in readme_blocks("bash"):
        block = block.replace("\\\n", " ")  # continuation lines
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def test_every_readme_command_has_a_small_run():
    missing = []
    for command in readme_commands():
        try:
            plan(command)
        except KeyError:
            missing.append(command)
    assert not missing, f"README commands without an entry in SMALL: {missing}"


def _argv(command: str, extra: list[str], work: Path) -> list[str]:
    argv = [a.replace("/tmp/tiny", str(work / "tiny")) for a in shlex.split(command)]
    if argv[0] == "molmo":
        argv = [sys.executable, "-m", "molmo_cli", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        argv[argv.index("my.toml")] = "training/configs/example.toml"  # the README's placeholder
    return argv + extra


def test_readme_commands_run_at_small_sizes(tmp_path):
    for name in ("training", "scripts", "models"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    for command in readme_commands():
        how, extra = plan(command)
        if how == "skip":
            continue
        if how == "help":
            words = shlex.split(command)[1:]
            sub = words[:2] if len(words) > 1 and words[1].isalpha() else words[:1]
            done = subprocess.run([sys.executable, "-m", "molmo_cli", *sub, "--help"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
        elif how == "syntax":
            done = subprocess.run(["bash", "-n", str(ROOT / command)], capture_output=True, text=True)
        elif how == "source":
            done = subprocess.run(["bash", "-c", f"{command} && python -c 'import molmo_cli'"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
        elif how == "serve-args":
            from server.app import create_app
            from server.cli import config_from_args

            argv = _argv(command, extra, tmp_path)[4:]  # after `python -m molmo_cli serve`
            argv = [re.sub(r"^((?:\w+=)?)(runs/)", lambda m: m.group(1) + f"{tmp_path}/runs/", a) for a in argv]
            config = config_from_args(argv)
            if config.lora_modules:  # the adapters are checked when the app is built
                app = create_app(config, engine_factory=None)
                assert [a.name for a in app.state.serving.served_adapters()] == [n for n, _ in config.lora_modules]
            continue
        else:
            done = subprocess.run(_argv(command, extra, tmp_path), cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, f"{command}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "runs" / "mine" / "model" / "config.json").exists()
    assert (tmp_path / "runs" / "mine" / "model" / "eval_val.json").exists()
    assert (tmp_path / "runs" / "pets" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "runs" / "pets" / "merged" / "config.json").exists()
    assert "quantization_config" in (tmp_path / "runs" / "demo-int4" / "config.json").read_text()
    assert '"molmo2"' in (tmp_path / "tiny2" / "config.json").read_text()


def test_readme_python_blocks_compile():
    blocks = readme_blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, "README.md", "exec")


@pytest.mark.vllm
@pytest.mark.server
def test_serve_script_answers_health_and_an_adapter_by_name(tmp_path):
    """scripts/serve.sh as the README starts it, with one adapter of the demo model beside it
    (`--lora-modules`, as in "Adapters"): /v1/models lists both, and a chat naming either is
    answered by it."""
    require_vllm_marker()
    import copy

    from molmo_model.checkpoint import load_checkpoint
    from molmo_model.lora import LoRAConfig, add_lora, save_adapter
    from server.cli import DEMO_MODEL

    demo, _, _ = load_checkpoint(DEMO_MODEL, with_tokenizer=False)
    lora = LoRAConfig(rank=8, alpha=16)
    model = copy.deepcopy(demo)
    add_lora(model, lora)
    adapter = save_adapter(model, lora, tmp_path / "pets")
    port = free_port()
    log = tmp_path / "serve.log"
    flags = ["--port", str(port), "--max-model-len", "1024", "--lora-modules", f"pets={adapter}", "--max-lora-rank", "8"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(["scripts/serve.sh", *flags], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert [(m["id"], m["parent"]) for m in models["data"]] == [("molmo-demo", None), ("pets", "molmo-demo")]
        for name in ("molmo-demo", "pets"):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
                "model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})  # fmt: skip
            assert r.status_code == 200 and r.json()["model"] == name, r.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
