"""/v1/point with several objects: `{"image": ..., "objects": [...]}` on the real server and
the demo model (models/molmo-demo, which really points).

Proves:
- one result per object, in request order, each in the single-object response's shape,
  equal (text, points, count, usage) to the single-object call for that object, and the
  points land on the objects asked for (an absent kind gives none);
- `usage` sums the results';
- the request is checked as a whole: `object` and `objects` together, neither, an empty or
  whitespace entry, or more than MAX_POINT_OBJECTS are 400s before the engine sees anything.

The N engine requests of one call are submitted together (they batch and share the image's
encoder output and prefix blocks); the wall times of the call and of the N single calls are
printed, never asserted. One server for the module (float32, eager).

    pytest tests/test_point_many.py -q -s       # ~1.5 min on 2 CPU cores
"""

from __future__ import annotations

import time

import httpx
import pytest
from helpers import assert_openai_error, data_url, encode_image, running_server
from test_server_pointing import assert_on_each

from server.cli import DEMO_MODEL
from server.protocol import MAX_POINT_OBJECTS
from training.config import DEMO_SCENE
from training.data.synthetic import SceneConfig, render_scene, split_seed

pytestmark = [pytest.mark.vllm, pytest.mark.server]
pytest.importorskip("vllm")

KEY = "many-key"
SCENE = 3  # test split: 4 blue squares, 1 blue circle, 1 red triangle (336 x 336)
OBJECTS = ["blue squares", "red triangles", "green circles", "blue circles"]
EXPECTED = {"blue squares": ("blue", "square"), "red triangles": ("red", "triangle")}


@pytest.fixture(scope="module")
def scene():
    return render_scene(split_seed("test", SCENE), SceneConfig(**DEMO_SCENE))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    flags = ("--api-key", KEY, "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024")
    with running_server(DEMO_MODEL, tmp_path_factory.mktemp("many"), *flags) as s:
        yield s


def post(server, body: dict) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/point",
        headers={"Authorization": f"Bearer {KEY}"},
        json=body,
        timeout=300,
    )


def test_objects_answer_like_single_calls(server, scene) -> None:
    image = data_url(encode_image(scene.image))
    t0 = time.perf_counter()
    r = post(server, {"image": image, "objects": OBJECTS})
    t_many = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "model", "results", "usage"}, body
    results = body["results"]
    assert len(results) == len(OBJECTS)

    t0 = time.perf_counter()
    singles = []
    for obj in OBJECTS:
        single = post(server, {"image": image, "object": obj})
        assert single.status_code == 200, single.text
        singles.append(single.json())
    t_singles = time.perf_counter() - t0
    print(f"\n{len(OBJECTS)} objects in one call: {t_many:.2f} s; one call each: {t_singles:.2f} s")

    for obj, got, want in zip(OBJECTS, results, singles, strict=True):
        assert set(got) == set(want), obj  # the single-object shape
        for key in ("text", "points", "count", "usage"):
            assert got[key] == want[key], (obj, key, got[key], want[key])
        if obj in EXPECTED:
            assert_on_each([(p["x"], p["y"]) for p in got["points"]], scene, *EXPECTED[obj])
    assert results[OBJECTS.index("green circles")]["count"] == 0
    assert body["usage"]["prompt_tokens"] == sum(x["usage"]["prompt_tokens"] for x in results)
    assert body["usage"]["completion_tokens"] == sum(
        x["usage"]["completion_tokens"] for x in results
    )
    assert body["usage"]["total_tokens"] == sum(x["usage"]["total_tokens"] for x in results)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"object": "squares", "objects": ["circles"]}, "exactly one"),
        ({}, "`objects`"),
        ({"objects": []}, "objects"),
        ({"objects": ["circles", "  "]}, "objects[1]"),
        ({"objects": ["circles"] * (MAX_POINT_OBJECTS + 1)}, "objects"),
        ({"objects": "circles"}, "objects"),
    ],
)
def test_bad_objects_are_400(server, scene, fields: dict, words: str) -> None:
    r = post(server, {"image": data_url(encode_image(scene.image)), **fields})
    assert_openai_error(r, 400)
    assert words in r.json()["error"]["message"], r.text
