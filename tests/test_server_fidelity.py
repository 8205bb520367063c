"""The same prompt under vLLM's own OpenAI server and ours; our context arithmetic uses the
served checkpoint's own image geometry; a truncated answer keeps its points.

The served model is models/molmo-demo (224 px crops, max_crops 1: 148 tokens per image, where
the default geometry counts 316), with --max-model-len 512. Two servers run one after the other
(never together: memory), both float32 and eager on the same checkpoint:

* ours: `python -m server` (molmo serve);
* vLLM's: `python -m vllm.entrypoints.openai.api_server --chat-template
  molmo_model/chat_template.jinja` (our plugin loaded through its entry point; the content
  format is left to vLLM's detection).

Each gets the same chats through the official `openai` client (images from PNG files, several
text parts, a system and a developer message, multi-turn), greedy; prompt token counts and
answers must be identical. Context checks on both: a prompt plus max_tokens of exactly the
context is accepted; with no max_tokens (and ignore_eos) an answer fills the context exactly;
three images fit (148 tokens each), four do not. Ours refuses max_tokens one over the room.

    pytest tests/test_server_fidelity.py -q      # ~1.5-2 min on 2 CPU cores
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from helpers import assert_openai_error, blocks_image, data_url, running_server

from molmo_model.points import parse_points
from molmo_model.tokenizer import CHAT_TEMPLATE_FILE
from server.cli import DEMO_MODEL
from training.config import DEMO_SCENE
from training.data.synthetic import SceneConfig, render_scene, split_seed

pytestmark = [pytest.mark.vllm, pytest.mark.server]
openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

MAX_LEN = 512
NAME = "molmo-demo"
SCENE = 3  # test split: 4 blue squares, 1 blue circle, 1 red triangle (336 x 336)
COMMON = ("--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_LEN))
OURS = (*COMMON, "--max-images", "4")
VLLM = (
    *COMMON,
    "--served-model-name", NAME,
    "--limit-mm-per-prompt", '{"image": 4}',
    "--chat-template", str(CHAT_TEMPLATE_FILE),
    "--seed", "0",
    "--disable-uvicorn-access-log",
)  # fmt: skip


def part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    scene = render_scene(split_seed("test", SCENE), SceneConfig(**DEMO_SCENE))
    files = {"scene": folder / "scene.png", "blocks": folder / "blocks.png"}
    scene.image.save(files["scene"])
    blocks_image(320, 200, seed=1).save(files["blocks"])
    return files


def chats(images: dict[str, Path]) -> dict[str, list[dict]]:
    scene, blocks = part(images["scene"]), part(images["blocks"])
    return {
        "point": [{"role": "user", "content": [scene, text("Point to all the blue squares.")]}],
        "system and parts": [
            {"role": "system", "content": "Answer about the picture."},
            {"role": "user", "content": [scene, text(" Point to all "), text("the red triangles. ")]},
        ],
        "multi-turn": [
            {"role": "developer", "content": [text("Be exact.")]},
            {"role": "user", "content": [scene, text("How many blue squares are there?")]},
            {"role": "assistant", "content": "there are 4."},
            {"role": "user", "content": [text("And in this one?"), blocks, text("Count them.")]},
        ],
        "three images": [
            {"role": "user", "content": [scene, blocks, scene, text("Point to all the circles.")]}
        ],
    }


def collect(url: str, images: dict[str, Path], ours: bool) -> dict:
    """Every request of the module against one server; returns what the tests compare."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    out: dict = {"chats": {}}
    for name, messages in chats(images).items():
        room = 32 if name == "three images" else 96  # 3 images take 456 of the 512 tokens
        r = client.chat.completions.create(
            model=NAME, messages=messages, temperature=0, max_tokens=room, logprobs=True
        )
        c = r.choices[0]
        out["chats"][name] = {
            "prompt_tokens": r.usage.prompt_tokens,
            "content": c.message.content,
            "finish_reason": c.finish_reason,
            "tokens": [t.token for t in c.logprobs.content],
            "points": c.message.model_extra.get("points"),
        }
    point = chats(images)["point"]
    room = MAX_LEN - out["chats"]["point"]["prompt_tokens"]

    def post(**fields) -> httpx.Response:
        body = {"model": NAME, "messages": point, "temperature": 0, **fields}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)

    out["exact_fit"] = post(max_tokens=room).status_code
    out["one_over"] = post(max_tokens=room + 1)
    filled = post(ignore_eos=True).json()
    out["default_fill"] = (filled["usage"], filled["choices"][0]["finish_reason"])
    scene = part(images["scene"])
    four = [{"role": "user", "content": [scene, scene, scene, scene, text("Count.")]}]
    out["four_images"] = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": NAME, "messages": four, "max_tokens": 1},
        timeout=300,
    )
    if ours:
        out["cut"] = cut_answers(client, point, out["chats"]["point"])
    return out


def cut_answers(client, messages: list[dict], full: dict) -> dict:
    """The pointing chat stopped by max_tokens inside its `<points` tag, in the third pair."""
    prefix, n = "", 0
    while 'x3="' not in prefix:
        prefix += full["tokens"][n]
        n += 1
    r = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=n
    )
    stream = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=n, stream=True
    )
    last = [c for c in stream if c.choices and c.choices[0].finish_reason][-1].choices[0]
    return {
        "prefix": prefix,
        "content": r.choices[0].message.content,
        "finish_reason": r.choices[0].finish_reason,
        "points": r.choices[0].message.model_extra["points"],
        "stream": (last.finish_reason, last.delta.model_extra["points"]),
    }


@pytest.fixture(scope="module")
def runs(images, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("servers")
    with running_server(DEMO_MODEL, work, *OURS) as s:
        ours = collect(s.url, images, ours=True)
    with running_server(DEMO_MODEL, work, *VLLM, module="vllm.entrypoints.openai.api_server") as s:
        theirs = collect(s.url, images, ours=False)
    return {"ours": ours, "vllm": theirs}


@pytest.mark.parametrize("name", ["point", "system and parts", "multi-turn", "three images"])
def test_same_prompt_and_greedy_answer_as_vllms_server(runs, name):
    ours, theirs = runs["ours"]["chats"][name], runs["vllm"]["chats"][name]
    assert ours["prompt_tokens"] == theirs["prompt_tokens"], name
    assert ours["content"] == theirs["content"], name
    assert ours["tokens"] == theirs["tokens"], name
    assert ours["finish_reason"] == theirs["finish_reason"], name


def test_prompt_counts_use_the_checkpoints_geometry(runs, tok):
    """The demo's images take 148 tokens each (224 px crops, max_crops 1): prompts are the
    text's tokens plus that, and three images fit a 512-token context."""
    chats_ = runs["ours"]["chats"]
    question = tok.encode(" User: Point to all the blue squares. Assistant:")
    assert chats_["point"]["prompt_tokens"] == 1 + 148 + len(question)
    assert chats_["three images"]["prompt_tokens"] > 3 * 148


@pytest.mark.parametrize("server", ["ours", "vllm"])
def test_context_arithmetic(runs, server):
    run = runs[server]
    prompt = run["chats"]["point"]["prompt_tokens"]
    assert run["exact_fit"] == 200
    usage, reason = run["default_fill"]
    assert usage["prompt_tokens"] == prompt
    assert usage["completion_tokens"] == MAX_LEN - prompt and reason == "length"
    assert run["four_images"].status_code == 400, run["four_images"].text


def test_our_context_errors_are_openai_shaped(runs):
    """One token over the context is refused (vLLM 0.32's own server instead lowers
    max_tokens to what fits), and four images are too many for 512 tokens."""
    assert_openai_error(runs["ours"]["one_over"], 400, "context_length_exceeded", "max_tokens")
    err = assert_openai_error(runs["ours"]["four_images"], 400, "context_length_exceeded")
    assert "592 of them for 4 image(s)" in err["message"], err


def test_truncated_answer_keeps_its_complete_points(runs):
    full = runs["ours"]["chats"]["point"]
    cut = runs["ours"]["cut"]
    assert len(full["points"]) == 4, full  # four blue squares
    assert cut["content"] == cut["prefix"] and cut["finish_reason"] == "length", cut
    assert len(parse_points(cut["content"])) == 2
    # The same places as the full answer's first two; no label yet (alt comes after the pairs).
    assert [where(p) for p in cut["points"]] == [where(p) for p in full["points"][:2]], cut
    reason, streamed = cut["stream"]
    assert reason == "length" and streamed == cut["points"]


def where(p: dict) -> tuple:
    return p["x"], p["y"], p["x_norm"], p["y_norm"], p["image_index"]
