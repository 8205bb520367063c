"""Synthetic PixMo-style data and the JSONL loader: targets agree with the pictures.

Checks that generation is reproducible, that splits never share seeds or images, that every
point target (read back with `parse_points`) lands once on each asked-for object and on
nothing else, that clock hands show the stated time, and that the JSONL format round-trips
and rejects bad lines with the line number and field.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from molmo_model.points import NOT_PRESENT, format_points, parse_points
from training.data.jsonl import JsonlDataset
from training.data.synthetic import (
    COLOURS,
    PLURALS,
    SPLIT_CAPACITY,
    SPLITS,
    ClockConfig,
    SceneConfig,
    SceneObject,
    SyntheticConfig,
    SyntheticDataset,
    caption_prompt,
    make_example,
    render_clock,
    render_scene,
    scene_annotations,
    split_of_seed,
    split_seed,
    write_synthetic_split,
)

SCENES_ONLY = SyntheticConfig(clock_fraction=0.0)
CLOCKS_ONLY = SyntheticConfig(clock_fraction=1.0)
KIND_OF_PLURAL = {plural: kind for kind, plural in PLURALS.items()}


# ---------------------------------------------------------------- reproducibility and splits


def _same(a, b) -> None:
    assert a.image.size == b.image.size
    assert a.image.tobytes() == b.image.tobytes()
    assert a.annotations == b.annotations
    assert a.metadata == b.metadata


def test_same_seed_gives_identical_examples():
    for config in (SCENES_ONLY, CLOCKS_ONLY):
        for index in (0, 7):
            _same(make_example("train", index, config), make_example("train", index, config))
        a, b = make_example("train", 1, config), make_example("train", 2, config)
        assert a.image.tobytes() != b.image.tobytes()


def test_splits_own_disjoint_seed_ranges():
    seeds = {split: {split_seed(split, i) for i in range(200)} for split in SPLITS}
    assert not seeds["train"] & seeds["val"]
    assert not seeds["train"] & seeds["test"]
    assert not seeds["val"] & seeds["test"]
    # The ranges do not touch even at the ends.
    assert split_seed("train", SPLIT_CAPACITY - 1) < split_seed("val", 0)
    assert split_seed("val", SPLIT_CAPACITY - 1) < split_seed("test", 0)
    for split in SPLITS:
        assert split_of_seed(split_seed(split, 12345)) == split
    with pytest.raises(ValueError, match="split"):
        split_seed("dev", 0)
    with pytest.raises(ValueError, match="index"):
        split_seed("train", SPLIT_CAPACITY)


def test_held_out_images_differ_from_training_images():
    train = {SyntheticDataset("train", 8, SCENES_ONLY)[i].image.tobytes() for i in range(8)}
    held_out = {
        SyntheticDataset(split, 8, SCENES_ONLY)[i].image.tobytes()
        for split in ("val", "test")
        for i in range(8)
    }
    assert not train & held_out


# ---------------------------------------------------------------- scenes


def _query(question: str) -> tuple[str | None, str | None]:
    """(kind, colour) that a templated question asks about, read from its words."""
    words = re.findall(r"[a-z]+", question.lower())
    colour = next((w for w in words if w in COLOURS), None)
    kind = next((KIND_OF_PLURAL[w] for w in words if w in KIND_OF_PLURAL), None)
    assert kind is not None or colour is not None or "shapes" in words, question
    return kind, colour


def _check_scene_layout(objects: list[SceneObject], width: int, height: int, gap: int) -> None:
    for i, a in enumerate(objects):
        x0, y0, x1, y1 = a.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        for b in objects[i + 1 :]:
            apart_x = b.box[0] >= x1 + gap or a.box[0] >= b.box[2] + gap
            apart_y = b.box[1] >= y1 + gap or a.box[1] >= b.box[3] + gap
            assert apart_x or apart_y, f"{a} overlaps {b}"


def test_point_and_count_targets_hit_each_asked_object_once():
    seen_counts: set[int] = set()
    not_present = {"point": 0, "count": 0}
    for index in range(48):
        example = make_example("train", index, SCENES_ONLY)
        image, meta = example.image, example.metadata
        objects = [SceneObject.from_dict(d) for d in meta["objects"]]
        _check_scene_layout(objects, image.width, image.height, SceneConfig().gap)
        assert len(example.annotations) >= 1
        for ann in example.annotations:
            if ann.task == "caption":
                continue
            kind, colour = _query(ann.question)
            assert (ann.info["kind"], ann.info["colour"]) == (kind, colour)
            wanted = [
                o
                for o in objects
                if (kind is None or o.kind == kind) and (colour is None or o.colour == colour)
            ]
            seen_counts.add(len(wanted))
            points = parse_points(ann.answer, image.width, image.height)
            assert len(points) == len(wanted), ann.answer
            hits = {i: 0 for i in range(len(wanted))}
            for p in points:
                inside = [i for i, o in enumerate(wanted) if o.contains(p.x, p.y)]
                assert len(inside) == 1, f"{p} is in {len(inside)} asked-for objects"
                hits[inside[0]] += 1
                # The picture agrees: the pixel under the point has the object's colour.
                obj = wanted[inside[0]]
                assert image.getpixel((int(p.x), int(p.y))) == COLOURS[obj.colour]
            assert all(n == 1 for n in hits.values())
            if not wanted:
                assert ann.answer == NOT_PRESENT
                not_present[ann.task] += 1
            elif ann.task == "count":
                m = re.fullmatch(r"Counting the <points?\b.*>, there (is|are) (\d+)\.", ann.answer)
                assert m and int(m.group(2)) == len(wanted), ann.answer
    assert not_present["point"] and not_present["count"]
    assert max(seen_counts) >= 10


def test_no_target_instances_answer_not_present():
    scene = render_scene(5, SceneConfig(max_count=0))
    assert not scene.matching(*scene.target)
    target = [
        a
        for a in scene_annotations(scene)
        if a.task != "caption" and _query(a.question) == scene.target
    ]
    assert target and all(a.answer == NOT_PRESENT for a in target)


def test_scene_size_is_a_parameter():
    default = render_scene(3)
    assert 288 <= default.width <= 384 and 288 <= default.height <= 384
    wide = render_scene(3, SceneConfig(width_range=(640, 640), height_range=(200, 200)))
    assert wide.image.size == (640, 200)
    _check_scene_layout(wide.objects, 640, 200, SceneConfig().gap)


def test_rendering_variety_off_draws_the_scenes_the_demo_model_knew():
    """With every variety option at its default, scenes (and clocks) are the pixels the
    committed demo models were trained and evaluated on (hashes taken before the options)."""
    import hashlib

    from training.config import DEMO_SCENE

    def digest(image: Image.Image) -> str:
        return hashlib.sha256(image.tobytes()).hexdigest()[:16]

    seeds = (0, 7, 12345)
    assert [digest(render_scene(s).image) for s in seeds] == [
        "90d71ce5e696b49e", "e70b87f68c678ce5", "19dbfed1bd3d6450"]  # fmt: skip
    assert [digest(render_scene(s, SceneConfig(**DEMO_SCENE)).image) for s in seeds] == [
        "9e4791afa690cbe8", "fc0e8cdb261bab95", "d8b88b9e142dde6f"]  # fmt: skip
    assert [digest(render_clock(s).image) for s in (0, 3)] == [
        "93e2b19d1ed53ded", "1da2f12214ee0780"]  # fmt: skip


def test_robust_scenes_vary_the_drawing_and_keep_the_targets_true():
    """ROBUST_SCENE: shades, outlines, rotations, soft edges, textures, JPEG. Each object's box
    is the tight box of its drawn pixels, its centre shows its colour, and the shades of a
    colour name vary while staying nearest to that colour among the scene's colours."""
    from training.config import ROBUST_SCENE

    cfg = SceneConfig(**{**ROBUST_SCENE, "jpeg_prob": 0.0})
    sizes, shades = set(), {c: set() for c in cfg.colours}
    for seed in range(12):
        scene = render_scene(seed, cfg)
        assert 224 <= scene.width <= 800 and 224 <= scene.height <= 800
        sizes.add((scene.width, scene.height))
        _check_scene_layout(scene.objects, scene.width, scene.height, 0)
        pixels = scene.image.convert("RGB")
        for o in scene.objects:
            x, y = (round(v - 0.5) for v in o.centre)
            got = pixels.getpixel((x, y))
            shades[o.colour].add(got)
            nearest = min(cfg.colours, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], got, strict=True)))
            assert nearest == o.colour, (seed, o, got)
        # Tight boxes: the pixels just outside a box are background, not the object's colour.
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert x1 - x0 >= 6 and y1 - y0 >= 6
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            fill = pixels.getpixel((cx, cy))
            for px, py in ((x0 - 2, cy), (x1 + 1, cy), (cx, y0 - 2), (cx, y1 + 1)):
                if 0 <= px < scene.width and 0 <= py < scene.height:
                    assert pixels.getpixel((px, py)) != fill
    assert len(sizes) == 12
    assert all(len(v) >= 3 for v in shades.values())  # shades, not one RGB per name
    jpeg = render_scene(5, SceneConfig(**{**ROBUST_SCENE, "jpeg_prob": 1.0}))
    assert jpeg.image.mode == "RGB" and jpeg.objects


def test_scene_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kinds"):
        SceneConfig(kinds=("blob",))
    with pytest.raises(ValueError, match="max_count"):
        SceneConfig(max_count=41)
    with pytest.raises(ValueError, match="width_range"):
        SceneConfig(width_range=(400, 300))
    with pytest.raises(ValueError, match="clock_fraction"):
        SyntheticConfig(clock_fraction=1.5)
    with pytest.raises(ValueError, match="backgrounds"):
        SceneConfig(backgrounds=("marble",))
    with pytest.raises(ValueError, match="shade"):
        SceneConfig(shade=2.0)
    with pytest.raises(ValueError, match="rotation"):
        SceneConfig(rotation=360.0)
    with pytest.raises(ValueError, match="jpeg_quality"):
        SceneConfig(jpeg_quality=(50, 100))


def test_captions_carry_length_hints_nine_times_in_ten():
    rng = random.Random(0)
    caption = "x" * 600
    hints = [caption_prompt(caption, rng)[1] for _ in range(4000)]
    given = [h for h in hints if h is not None]
    assert 0.87 < len(given) / len(hints) < 0.93
    assert abs(sum(given) / len(given) - 600 / 15) < 1.0  # (len + N(0, 25)) // 15
    config = SceneConfig(caption_prob=1.0)
    words = "no one two three four five six seven eight nine ten eleven twelve thirteen".split()
    words += "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    for seed in range(12):
        scene = render_scene(seed, config)
        (a,) = [a for a in scene_annotations(scene, config) if a.task == "caption"]
        m = re.fullmatch(r"long_caption(?: (\d+))?:", a.question)
        assert m, a.question
        assert (int(m.group(1)) if m.group(1) else None) == a.info["length_hint"]
        # The caption counts every group of shapes right.
        groups = Counter((o.colour, o.kind) for o in scene.objects)
        for (colour, kind), n in groups.items():
            noun = PLURALS[kind] if n > 1 else kind
            assert f"{words[n]} {colour} {noun}" in a.answer, (groups, a.answer)
        assert a.answer.startswith("A ") and "background" in a.answer


# ---------------------------------------------------------------- clocks


def _angle(centre: list[float], tip: list[float]) -> float:
    """Degrees clockwise from 12 o'clock."""
    return math.degrees(math.atan2(tip[0] - centre[0], centre[1] - tip[1])) % 360.0


def _diff(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def test_clock_hands_show_the_stated_time():
    for index in range(30):
        example = make_example("val", index, CLOCKS_ONLY)
        (ann,) = example.annotations
        m = re.search(r"(\d{1,2}):(\d{2})", ann.answer)
        assert m, ann.answer
        hour, minute = int(m.group(1)), int(m.group(2))
        assert 1 <= hour <= 12 and 0 <= minute <= 59
        geo = example.metadata["clock"]
        second = geo["second"] or 0
        minute_angle = _angle(geo["centre"], geo["minute_tip"])
        hour_angle = _angle(geo["centre"], geo["hour_tip"])
        assert _diff(minute_angle, 6 * minute + second / 10) < 0.01
        assert _diff(hour_angle, 30 * (hour % 12) + minute / 2 + second / 120) < 0.01
        # The pictured hands are where the geometry says, and nowhere opposite.
        ink = tuple(geo["hand_colour"])
        cx, cy = geo["centre"]
        for tip in (geo["minute_tip"], geo["hour_tip"]):
            mid = (cx + (tip[0] - cx) / 2, cy + (tip[1] - cy) / 2)
            assert example.image.getpixel((round(mid[0]), round(mid[1]))) == ink
        if _diff(hour_angle, minute_angle + 180) > 30:
            far = (cx - (geo["minute_tip"][0] - cx) / 2, cy - (geo["minute_tip"][1] - cy) / 2)
            assert example.image.getpixel((round(far[0]), round(far[1]))) != ink


def test_clock_config_and_styles():
    clocks = [render_clock(i, ClockConfig(second_hand_prob=0.5)) for i in range(24)]
    assert {c.second is None for c in clocks} == {True, False}
    assert len({c.style["face"] for c in clocks}) >= 3
    assert len({c.style["numerals"] for c in clocks}) >= 3
    with pytest.raises(ValueError, match="radius_range"):
        ClockConfig(radius_range=(0.3, 0.6))


# ---------------------------------------------------------------- JSONL


def test_synthetic_split_round_trips_through_jsonl(tmp_path: Path):
    config = SyntheticConfig(clock_fraction=0.5)
    path = write_synthetic_split(tmp_path, "test", 6, config)
    loaded = JsonlDataset(path)
    generated = SyntheticDataset("test", 6, config)
    assert len(loaded) == len(generated) == 6
    assert {generated[i].metadata["source"] for i in range(6)} == {
        "synthetic-points",
        "synthetic-clocks",
    }
    for i in range(6):
        _same(loaded[i], generated[i])


def _image(tmp_path: Path, name: str = "img.png", size: tuple[int, int] = (200, 100)) -> Path:
    path = tmp_path / name
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def test_points_without_answer_are_formatted(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    image = _image(tmp_path, "sub/img.png")
    line = {
        "image": "sub/img.png",
        "annotations": [
            {
                "messages": [{"role": "user", "content": "Point to the dots."}],
                "points": [[150, 80], [20, 10]],
                "label": "dots",
            },
            {
                "messages": [{"role": "user", "content": "Point to the cat."}],
                "points": [],
                "label": "cat",
            },
            {
                "messages": [
                    {"role": "user", "content": "What colour is it?"},
                    {"role": "assistant", "content": "Dark blue."},
                    {"role": "user", "content": "Point to the corner."},
                ],
                "points": [[0, 0]],
                "label": "corner",
            },
        ],
    }
    other = {
        "image": str(image),
        "annotations": [{"messages": line["annotations"][2]["messages"][:2]}],
    }
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(line) + "\n\n" + json.dumps(other) + "\n")
    dataset = JsonlDataset(path)
    assert len(dataset) == 2
    dots, cat, corner = dataset[0].annotations
    assert dots.answer == format_points([(150, 80), (20, 10)], "dots", width=200, height=100)
    read = [(p.x, p.y) for p in parse_points(dots.answer, 200, 100)]
    assert read == [(20.0, 10.0), (150.0, 80.0)]  # top-down order
    assert cat.answer == NOT_PRESENT
    assert [m["role"] for m in corner.messages] == ["user", "assistant", "user", "assistant"]
    assert dataset[1].annotations[0].answer == "Dark blue."  # absolute image path
    assert dataset[1].image.size == (200, 100)


GOOD = {
    "image": "img.png",
    "annotations": [
        {
            "messages": [
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        }
    ],
}


def _edit(change) -> str:
    """GOOD with `change(line, annotation)` applied, as one JSONL line."""
    line = json.loads(json.dumps(GOOD))
    change(line, line["annotations"][0])
    return json.dumps(line)


def _ask(content: str = "q") -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (_edit(lambda d, a: d.pop("image")), "image"),
    (_edit(lambda d, a: d.update(image="missing.png")), "image"),
    (_edit(lambda d, a: d.update(annotations=[])), "annotations"),
    (_edit(lambda d, a: d.update(extra=1)), "extra"),
    (_edit(lambda d, a: d.update(metadata=[1])), "metadata"),
    (_edit(lambda d, a: a.update(point=[[1, 2]])), "annotations[0].point"),
    (_edit(lambda d, a: a["messages"][1].update(role="bot")), "annotations[0].messages[1].role"),
    (_edit(lambda d, a: a["messages"].reverse()), "annotations[0].messages[0].role"),
    (_edit(lambda d, a: a["messages"][0].update(content="")), "annotations[0].messages[0].content"),
    (_edit(lambda d, a: a.update(messages=_ask())), "annotations[0].messages"),
    (_edit(lambda d, a: a.update(messages=_ask(), points=[[1, 2]])), "annotations[0].label"),
    (_edit(lambda d, a: a.update(points=[[1, "2"]])), "annotations[0].points[0]"),
    (_edit(lambda d, a: a.update(points=[[-1, 2]])), "annotations[0].points[0]"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_LINES)
def test_bad_line_names_line_and_field(tmp_path: Path, bad: str, field: str):
    _image(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError) as err:
        JsonlDataset(path)
    message = str(err.value)
    assert "data.jsonl:3: " in message, message
    assert field in message, message


def test_point_outside_image_is_reported_on_load(tmp_path: Path):
    _image(tmp_path)  # 200 x 100
    line = _edit(lambda d, a: a.update(messages=_ask(), points=[[10, 10], [50, 150]], label="x"))
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n")
    dataset = JsonlDataset(path)  # the size is only known once the image is open
    with pytest.raises(
        ValueError, match=r"data\.jsonl:1: annotations\[0\]\.points\[1\]: .*200x100"
    ):
        dataset[0]


def test_unreadable_image_is_reported_on_load(tmp_path: Path):
    (tmp_path / "img.png").write_bytes(b"not a png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    dataset = JsonlDataset(path)
    with pytest.raises(
        ValueError, match=r"data\.jsonl:1: image: .*not in a recognised image format"
    ):
        dataset[0]


def test_documented_example_line_loads(tmp_path: Path):
    import training.data.jsonl

    doc = training.data.jsonl.__doc__ or ""
    block = re.search(r"\n(    \{\"image\".*?)\n\n\(written", doc, re.S)
    assert block, "the JSONL example in training/data/jsonl.py's docstring moved"
    line = json.loads(block.group(1))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (640, 480), (200, 200, 200)).save(tmp_path / "images/kitchen.jpg")
    (tmp_path / "data.jsonl").write_text(json.dumps(line) + "\n")
    example = JsonlDataset(tmp_path / "data.jsonl")[0]
    chat, mugs, cat = example.annotations
    assert chat.answer == "Two mugs and a teapot."
    assert len(parse_points(mugs.answer, 640, 480)) == 2
    assert cat.answer == NOT_PRESENT
    assert example.metadata == {"source": "my-photos"}
