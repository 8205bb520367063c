"""The independent evaluation renderer (training/independent_scenes.py) and `molmo eval`
reporting it beside the training generator.

The scenes are checked for what scoring relies on: deterministic per seed, sizes, boxes that
do not overlap and lie in the image, a box centre that shows its object's colour, shades that
vary, the vocabulary respected, and queries whose truth matches the picture. The last test
runs the real CLI (reference engine, tiny checkpoint, 2 scenes) for the report's layout.

    pytest tests/test_independent_scenes.py -q
"""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

from molmo_model.points import format_points
from training.data.synthetic.scenes import SHAPE_KINDS
from training.evaluate import score
from training.independent_scenes import (
    HSV_COLOURS,
    SIZE_RANGE,
    independent_queries,
    render_independent,
)

SEEDS = range(12)
TRAINING_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")


@pytest.fixture(scope="module")
def scenes():
    return [render_independent(seed) for seed in SEEDS]


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def test_same_seed_same_scene_and_seeds_differ() -> None:
    a, b = render_independent(7), render_independent(7)
    assert a.objects == b.objects and a.target == b.target
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert render_independent(8).objects != a.objects


def test_every_training_colour_has_its_own_hsv_range() -> None:
    assert set(TRAINING_COLOURS) <= set(HSV_COLOURS)


def test_sizes_and_boxes(scenes) -> None:
    lo, hi = SIZE_RANGE
    assert len({s.image.size for s in scenes}) > 1
    for scene in scenes:
        w, h = scene.image.size
        assert lo <= w <= hi and lo <= h <= hi
        boxes = [o.box for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                assert not overlap, (scene.seed, a, b)


def test_box_centre_shows_the_objects_colour(scenes) -> None:
    for scene in scenes:
        pixels = np.asarray(scene.image)  # [H, W, 3] uint8
        for o in scene.objects:
            cx, cy = o.centre
            r, g, b = pixels[int(cy), int(cx)] / 255.0
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            hue, jitter, (s0, _), _ = HSV_COLOURS[o.colour]
            assert s > 0.3, (scene.seed, o)  # the light backgrounds have s < 0.15
            assert _hue_distance(h * 360.0, hue) <= jitter + 6.0, (scene.seed, o, h * 360.0)


def test_shades_of_one_colour_vary() -> None:
    shades: dict[str, set[tuple[int, ...]]] = {}
    for seed in SEEDS:
        scene = render_independent(seed, ("circle",), ("red", "blue"))
        pixels = np.asarray(scene.image)
        for o in scene.objects:
            cx, cy = o.centre
            shades.setdefault(o.colour, set()).add(tuple(int(v) for v in pixels[int(cy), int(cx)]))
    assert all(len(s) >= 3 for s in shades.values()), shades


def test_restricted_vocabulary_is_respected() -> None:
    for seed in SEEDS:
        scene = render_independent(seed, ("circle", "square"), ("red", "blue"))
        assert scene.target[0] in ("circle", "square") and scene.target[1] in ("red", "blue")
        assert all(
            o.kind in ("circle", "square") and o.colour in ("red", "blue") for o in scene.objects
        )
    with pytest.raises(ValueError, match="kinds"):
        render_independent(0, ("circle", "blob"), ("red",))
    with pytest.raises(ValueError, match="colours"):
        render_independent(0, ("circle",), ("teal",))


def test_queries_carry_the_truth() -> None:
    queries = independent_queries(20, ("circle", "square", "triangle"), ("red", "green", "blue"))
    by_seed: dict[int, list] = {}
    for q in queries:
        assert q.source["renderer"] == "independent"
        by_seed.setdefault(q.source["seed"], []).append(q)
    assert sorted(by_seed) == list(range(20))
    absent = 0
    for seed, qs in by_seed.items():
        scene = render_independent(seed, ("circle", "square", "triangle"), ("red", "green", "blue"))
        targets = scene.matching(*scene.target)
        point, count = qs[0], qs[1]
        assert point.task == "point" and count.task == "count"
        assert count.count == len(targets) == len(count.boxes) == point.count
        assert point.boxes == [tuple(float(v) for v in o.box) for o in targets]
        for extra in qs[2:]:
            assert extra.task == "point" and extra.boxes == [] and extra.count == 0
            absent += 1
    assert 1 <= absent <= 10  # about 1 scene in 5
    assert any(
        "red" in q.question or "green" in q.question or "blue" in q.question for q in queries
    )


def test_perfect_answers_score_one() -> None:
    queries = independent_queries(10, SHAPE_KINDS, TRAINING_COLOURS, tasks=("point",))
    answers = []
    for q in queries:
        w, h = q.image.size
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in q.boxes]
        answers.append(format_points(centres, "shapes", width=w, height=h))
    report = score(queries, answers)
    assert report["pointing"]["f1"] == 1.0
    assert report["pointing"]["micro_precision"] == report["pointing"]["micro_recall"] == 1.0


def test_molmo_eval_reports_both_renderers(tmp_path, tiny_checkpoint) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "training.cli", "eval", "--model", str(tiny_checkpoint),
           "--engine", "reference", "--examples", "2", "--tasks", "point,count",
           "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "pointing" in report and "counting" in report and "renderer" not in report
    independent = report["independent"]
    assert "pointing" in independent and "counting" in independent
    assert independent["scenes"] == 2 and independent["kinds"] and independent["colours"]
    assert "own generator:" in done.stdout and "independent renderer:" in done.stdout

    bad = subprocess.run([*cmd, "--colours", "red,teal"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "teal" in bad.stderr
