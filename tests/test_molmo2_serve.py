"""`molmo serve` on a Molmo 2 checkpoint: the real server process (`python -m server`, vLLM,
eager) on a `molmo init --preset molmo2-tiny` checkpoint, driven by the official `openai`
client and httpx. One server for the module (~60-80 s on 2 CPU cores).

The random model's words are noise, so the answers are checked against our PyTorch
reference (molmo_model.molmo2 with Ai2's bidirectional image prefill, greedy): one image and two
images in one request give the reference's tokens and prompt length. /v1/point answers on one
image with the same text as the chat route asked the same question. That Molmo 2's points
(`coords="t id x y ..."`, 0-1000) land in the pixels of the image they name is checked on
the server's own answer parser (the random model writes none).
"""

from __future__ import annotations

import io

import httpx
import pytest
import torch
from helpers import Server, data_url, noise_image, running_server

from molmo_model.checkpoint import init_checkpoint, load_checkpoint
from molmo_model.molmo2.model import generate
from molmo_model.molmo2.preprocessing import Molmo2PreprocessConfig, Molmo2Preprocessor
from molmo_vllm.prompt import point_question

pytestmark = [pytest.mark.vllm, pytest.mark.server]
openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

KEY = "test-key"
MAX_TOKENS = 6
IMAGES = [noise_image(640, 480, 1), noise_image(300, 200, 2)]


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return init_checkpoint("molmo2-tiny", tmp_path_factory.mktemp("m2") / "ckpt", seed=0, std=0.3)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    flags = ("--api-key", KEY, "--enforce-eager", "--max-model-len", "2048", "--max-images", "2",
             "--max-num-seqs", "4", "--dtype", "float32")  # fmt: skip
    with running_server(checkpoint, tmp_path_factory.mktemp("server"), *flags) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(checkpoint):
    torch.set_num_threads(1)
    model, _, tokenizer = load_checkpoint(checkpoint)
    return model.eval(), tokenizer


def reference_answer(reference, question: str, images) -> tuple[str, int, int]:
    """(the reference's greedy answer text, its token count, its prompt length) for
    `question` on `images`. A trailing partial UTF-8 character is dropped, as vLLM's
    detokenizer holds it back."""
    model, tokenizer = reference
    inputs = Molmo2Preprocessor(Molmo2PreprocessConfig(), tokenizer).build_prompt(question, images)
    out = generate(
        model, inputs.input_ids, max_new_tokens=MAX_TOKENS, eos_id=tokenizer.eos_id,
        pixel_values=inputs.pixel_values, image_token_pooling=inputs.image_token_pooling,
        image_grids=inputs.image_grids, image_num_crops=inputs.image_num_crops,
        token_type_ids=inputs.token_type_ids[None],
    )  # fmt: skip
    tokens = [t for t in out.tokens if t != tokenizer.eos_id]
    text = tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
    return text, len(out.tokens), len(inputs.input_ids)


@pytest.mark.parametrize("n_images", [1, 2])
def test_chat_completion_matches_reference(n_images, client, reference):
    images = IMAGES[:n_images]
    question = "Describe this image." if n_images == 1 else "Compare these images."
    content = [{"type": "image_url", "image_url": {"url": data_url(png(im))}} for im in images]
    content.append({"type": "text", "text": question})
    r = client.chat.completions.create(
        model="ckpt", messages=[{"role": "user", "content": content}],
        max_tokens=MAX_TOKENS, temperature=0,
    )  # fmt: skip
    text, n_tokens, prompt_len = reference_answer(reference, question, images)
    assert r.usage.prompt_tokens == prompt_len  # Ai2's layout, every image's tokens
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == n_tokens


def test_point_on_one_image(server: Server, client, reference):
    image = IMAGES[0]
    body = {"image": data_url(png(image)), "object": "red circles", "max_tokens": MAX_TOKENS}
    r = httpx.post(f"{server.url}/v1/point", json=body,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    point = r.json()
    text, _, prompt_len = reference_answer(reference, point_question("red circles"), [image])
    assert point["text"] == text and point["usage"]["prompt_tokens"] == prompt_len
    assert point["count"] == len(point["points"])


def test_molmo2_points_are_pixels_of_their_image():
    from server.points import pixel_points, points_in_answer

    sizes = [(640, 480), (300, 200)]
    answer = 'Here: <points coords="1 1 500 250\t2 1 100 900 2 300 500">dogs</points>'
    got = [(p.x, p.y, p.image_index, p.label) for p in points_in_answer(answer, sizes)]
    assert got == [(320.0, 120.0, 0, "dogs"), (30.0, 180.0, 1, "dogs"), (90.0, 100.0, 1, "dogs")]
    one = pixel_points('<points coords="1 1 500 250 2 750 500">cats</points>', (640, 480))
    assert [(p.x, p.y) for p in one] == [(320.0, 120.0), (480.0, 240.0)]
