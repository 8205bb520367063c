"""Adapters served on one base (issue 24): `molmo serve --lora-modules`, and vLLM's own server.

A tiny base with decisive greedy margins (helpers.decisive_model) and three random adapters
in PEFT's format (molmo_model.lora; lora_B drawn large enough that each adapter answers
differently from the base and from the others). The reference for an adapter is the merged
checkpoint under the PyTorch reference generator, never vLLM: the served adapter must give
its answers token for token (float32, greedy, PNG images, several prompts).

Two servers run one after the other (memory): ours with two adapters at start-up, an API key
and run-time loading on; then vLLM's own OpenAI server with `--enable-lora --lora-modules`
on the same adapters through our plugin. Everything each is asked is collected in one
fixture; the tests read the results.

    pytest tests/test_server_lora.py -q
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from helpers import (
    ROOT,
    assert_openai_error,
    blocks_image,
    data_url,
    decisive_model,
    encode_image,
    noise_image,
    running_server,
)
from safetensors.torch import load_file, save_file

from molmo_model.checkpoint import save_checkpoint
from molmo_model.config import tiny
from molmo_model.generate import generate
from molmo_model.lora import (
    LoRAConfig,
    add_lora,
    lora_modules,
    merge_adapter,
    read_adapter,
    save_adapter,
)
from molmo_model.preprocessing import MolmoPreprocessor

pytestmark = [pytest.mark.vllm, pytest.mark.server]
openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

KEY = "lora-key"
BASE = "base"
MAX_TOKENS = 10
QUESTIONS = ["Point to the dog.", "What is in the image?"]
COMMON = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-lora-rank", "8",
          "--max-loras", "2")  # fmt: skip


def make_adapter(base, out: Path, seed: int, rank: int = 8, scale: float = 0.3):
    """A random adapter of `base` (B drawn, not zero) written in PEFT's format."""
    model = copy.deepcopy(base)
    add_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * scale)
    return save_adapter(model, LoRAConfig(rank=rank, alpha=2.0 * rank), out)


def images() -> list:
    return [noise_image(320, 240, seed=3), blocks_image(200, 300, seed=4)]


def chats() -> list[list[dict]]:
    out = []
    for img in images():
        url = data_url(encode_image(img, "PNG"))
        for q in QUESTIONS:
            out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": q}]}])  # fmt: skip
    return out


def reference_answers(model, tok) -> list[str]:
    """Greedy answers of the PyTorch reference to `chats()` (same order)."""
    pre = MolmoPreprocessor(model.config.preprocess, tok)
    out = []
    for img in images():
        for q in QUESTIONS:
            ids, crops = pre.build_prompt([{"role": "user", "content": q}], [img])
            tokens = generate(model, ids, crops, MAX_TOKENS, eos_id=tok.eos_id).tokens
            out.append(tok.decode([t for t in tokens if t != tok.eos_id]))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tok):
    root = tmp_path_factory.mktemp("lora")
    base = decisive_model(tiny(vocab_size=tok.vocab_size), tok)
    base_dir = save_checkpoint(base, root / BASE, tok)
    refs = {BASE: reference_answers(base, tok)}
    dirs = {}
    seeds = iter(range(1, 40))
    for name in ("a", "b", "c"):
        # Adapters whose answers are whole characters: a greedy run of byte tokens that do not
        # form UTF-8 is text only up to the detokenizer's choice, and answers are compared as text.
        for seed in seeds:
            path = make_adapter(base, root / name, seed)
            merged = merge_adapter(copy.deepcopy(base), read_adapter(path, base.config)).eval()
            answers = reference_answers(merged, tok)
            if not any("\ufffd" in a or not a for a in answers):
                dirs[name], refs[name] = path, answers
                break
        assert name in dirs, "no seed gave an adapter with printable answers"
    # Bad adapters, each wrong in one way.
    bad = {
        "rank over the maximum": make_adapter(base, root / "rank16", 5, rank=16),
        "missing files": root / "empty",
    }
    (root / "empty").mkdir()
    unknown = root / "unknown"
    unknown.mkdir()
    tensors = load_file(str(dirs["a"] / "adapter_model.safetensors"))
    tensors = {k.replace("blocks.0.att_proj", "blocks.0.qkv_proj"): v for k, v in tensors.items()}
    save_file(tensors, str(unknown / "adapter_model.safetensors"))
    (unknown / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    bad["unknown target modules"] = unknown
    other_cfg = tiny(vocab_size=tok.vocab_size)
    other_cfg.llm.intermediate_size *= 2
    other = decisive_model(other_cfg, tok)
    bad["shapes of another base"] = make_adapter(other, root / "other", 6)
    return {"root": root, "base": base_dir, "dirs": dirs, "refs": refs, "bad": bad}


def _texts(client, model: str) -> list[str]:
    return [client.chat.completions.create(model=model, messages=m, temperature=0, max_tokens=MAX_TOKENS)
            .choices[0].message.content for m in chats()]  # fmt: skip


async def _concurrent(url: str, key: str) -> dict[str, list[str]]:
    """Base, a and b asked at once (each prompt for each model in one gather)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    jobs = [(model, m) for m in chats() for model in (BASE, "a", "b")]
    answers = await asyncio.gather(*[client.chat.completions.create(
        model=model, messages=m, temperature=0, max_tokens=MAX_TOKENS) for model, m in jobs])  # fmt: skip
    await client.close()
    out: dict[str, list[str]] = {BASE: [], "a": [], "b": []}
    for (model, _), r in zip(jobs, answers, strict=True):
        assert r.model == model
        out[model].append(r.choices[0].message.content)
    return out


def collect_ours(url: str, setup: dict) -> dict:
    h = {"Authorization": f"Bearer {KEY}"}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    got: dict = {"models": client.models.list().model_dump()["data"]}
    got["chat"] = {name: _texts(client, name) for name in (BASE, "a", "b")}
    got["concurrent"] = asyncio.run(_concurrent(url, KEY))
    png = encode_image(images()[0], "PNG")
    got["point"] = httpx.post(f"{url}/v1/point", headers=h, timeout=120,
                              json={"model": "a", "image": data_url(png), "object": "dog",
                                    "max_tokens": MAX_TOKENS}).json()  # fmt: skip
    got["unknown_model"] = httpx.post(f"{url}/v1/chat/completions", headers=h, timeout=60,
                                      json={"model": "nope", "messages": chats()[0]})  # fmt: skip
    load = f"{url}/v1/load_lora_adapter"
    unload = f"{url}/v1/unload_lora_adapter"
    got["load_no_key"] = httpx.post(load, json={"lora_name": "c", "lora_path": str(setup["dirs"]["c"])})
    got["load"] = httpx.post(load, headers=h, timeout=120,
                             json={"lora_name": "c", "lora_path": str(setup["dirs"]["c"])})  # fmt: skip
    got["load_again"] = httpx.post(load, headers=h, timeout=120,
                                   json={"lora_name": "c", "lora_path": str(setup["dirs"]["c"])})  # fmt: skip
    got["models_with_c"] = [m["id"] for m in client.models.list().model_dump()["data"]]
    got["chat_c"] = _texts(client, "c")
    got["bad"] = {}
    for case, path in setup["bad"].items():
        got["bad"][case] = httpx.post(load, headers=h, timeout=120, json={"lora_name": "x", "lora_path": str(path)})
        got.setdefault("a_after_bad", []).append(_texts(client, "a")[0])
    got["unload"] = httpx.post(unload, headers=h, timeout=60, json={"lora_name": "c"})
    got["unload_again"] = httpx.post(unload, headers=h, timeout=60, json={"lora_name": "c"})
    got["c_after_unload"] = httpx.post(f"{url}/v1/chat/completions", headers=h, timeout=60,
                                       json={"model": "c", "messages": chats()[0]})  # fmt: skip
    got["models_after"] = [m["id"] for m in client.models.list().model_dump()["data"]]
    return got


@pytest.fixture(scope="module")
def runs(setup) -> dict:
    work = setup["root"] / "servers"
    work.mkdir()
    modules = [f"{n}={setup['dirs'][n]}" for n in ("a", "b")]
    with running_server(setup["base"], work, *COMMON, "--served-model-name", BASE, "--api-key", KEY,
                        "--allow-runtime-lora", "--lora-modules", *modules) as s:  # fmt: skip
        ours = collect_ours(s.url, setup)
    vllm_flags = (*COMMON, "--served-model-name", BASE, "--enable-lora", "--lora-modules", *modules,
                  "--limit-mm-per-prompt", '{"image": 1}', "--seed", "0")  # fmt: skip
    with running_server(setup["base"], work, *vllm_flags, module="vllm.entrypoints.openai.api_server") as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        theirs = {name: _texts(client, name) for name in (BASE, "a", "b")}
    return {"ours": ours, "vllm": theirs}


def test_adapters_answer_as_their_merged_checkpoints_and_the_base_as_the_base(setup, runs):
    refs = setup["refs"]
    assert len({tuple(refs[n]) for n in refs}) == len(refs), "the adapters must change the answers"
    for name in (BASE, "a", "b"):
        assert runs["ours"]["chat"][name] == refs[name], name


def test_two_adapters_and_the_base_at_once_each_give_their_own_answers(setup, runs):
    for name in (BASE, "a", "b"):
        assert runs["ours"]["concurrent"][name] == setup["refs"][name], name


def test_point_api_picks_the_adapter(setup, runs):
    r = runs["ours"]["point"]
    assert r["model"] == "a" and r["text"] == setup["refs"]["a"][0], r


def test_models_lists_base_and_adapters_with_parent(setup, runs):
    cards = {m["id"]: m for m in runs["ours"]["models"]}
    assert list(cards) == [BASE, "a", "b"]
    assert cards[BASE]["parent"] is None
    for name in ("a", "b"):
        assert cards[name]["parent"] == BASE
        assert Path(cards[name]["root"]) == setup["dirs"][name].resolve()


def test_unknown_model_is_an_openai_404_naming_what_is_served(runs):
    err = assert_openai_error(runs["ours"]["unknown_model"], 404, "model_not_found", "model")
    assert "'nope'" in err["message"] and "'a'" in err["message"] and f"'{BASE}'" in err["message"]


def test_adapters_load_and_unload_at_run_time_behind_the_key(setup, runs):
    ours = runs["ours"]
    assert ours["load_no_key"].status_code == 401
    assert ours["load"].status_code == 200, ours["load"].text
    assert ours["load"].json()["parent"] == BASE
    assert_openai_error(ours["load_again"], 400, "invalid_adapter")
    assert "already loaded" in ours["load_again"].json()["error"]["message"]
    assert ours["models_with_c"] == [BASE, "a", "b", "c"]
    assert ours["chat_c"] == setup["refs"]["c"]
    assert ours["unload"].status_code == 200 and ours["unload"].json()["deleted"] is True
    assert_openai_error(ours["unload_again"], 404, "model_not_found")
    assert_openai_error(ours["c_after_unload"], 404, "model_not_found")
    assert ours["models_after"] == [BASE, "a", "b"]


@pytest.mark.parametrize("case, words", [
    ("rank over the maximum", "rank 16 is over the server's maximum 8"),
    ("missing files", "has no adapter_config.json"),
    ("unknown target modules", "unknown target modules"),
    ("shapes of another base", "tensors of another shape"),
])  # fmt: skip
def test_a_bad_adapter_is_refused_naming_the_problem_and_the_others_keep_serving(setup, runs, case, words):
    err = assert_openai_error(runs["ours"]["bad"][case], 400, "invalid_adapter")
    assert words in err["message"], err
    assert runs["ours"]["a_after_bad"] == [setup["refs"]["a"][0]] * len(setup["bad"])


def test_vllms_own_server_serves_the_same_adapters_on_our_plugin(setup, runs):
    for name in (BASE, "a", "b"):
        assert runs["vllm"][name] == setup["refs"][name], name


def test_a_bad_adapter_at_start_up_exits_2_naming_it(setup):
    """Checked before any engine starts: exit 2, the message, no traceback."""
    bad = setup["bad"]["rank over the maximum"]
    proc = subprocess.run([sys.executable, "-m", "server", "--model", str(setup["base"]), "--max-lora-rank", "8",
                           "--lora-modules", f"big={bad}"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "rank 16 is over the server's maximum 8" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, words", [
    (("--lora-modules", "a"), "is not NAME=DIR"),
    (("--max-lora-rank", "12"), "max_lora_rank must be one of"),
    (("--allow-runtime-lora", "--host", "0.0.0.0"), "needs an api_key"),
])  # fmt: skip
def test_bad_lora_flags_exit_2(setup, flags, words):
    env = {k: v for k, v in os.environ.items() if k != "MOLMO_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "server", "--model", str(setup["base"]), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
