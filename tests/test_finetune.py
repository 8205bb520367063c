"""Fine-tuning on your own data and deploying it (issue 17), end to end and case by case.

The end-to-end test is the user's path with the real parts: a checkpoint in Ai2's release
layout (config.json with the official Molmo-7B-D fields, `auto_map` and all, Ai2's tensor
names, a Qwen2-sized tokenizer.json with the image tokens at 152064..152068; only the widths
are tiny, and because the official config does not describe the vision tower, a tiny tower's
fields are added as our own checkpoints add them: a full ViT-L would take minutes a step on
a CPU) -> a JSONL file and PNG files on disk -> `molmo train --init-from --data --val-data`
(a subprocess) -> `molmo eval --data` (vLLM and the reference, same answers) -> `molmo serve --model` (the real
server on vLLM) answering `POST /v1/point` with the points the fine-tuning taught. The
training data is one image asked about twice; at a high learning rate the tiny model learns
the answers by heart in a few dozen steps, so the served points can only come from the
fine-tuned weights (the random release answers anything but them).

The other tests are each an error case or rule of the issue, run in-process where they can.

    pytest tests/test_finetune.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import OFFICIAL_FIELDS, ROOT, encode_image, running_server
from PIL import Image, ImageDraw

from molmo_model.checkpoint import load_checkpoint, save_checkpoint
from molmo_model.config import MolmoConfig, tiny
from molmo_model.model import MolmoForCausalLM
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_model.tokenizer import build_tokenizer
from training import cli
from training.data.check import DataError, check_jsonl
from training.data.jsonl import load_record, read_jsonl
from training.packing import annotation_tokens
from training.recipe import init_from_scratch

TRUE_POINTS = [[24.0, 20.0], [70.0, 50.0]]  # pixels of the 96x72 image
SIZE = (96, 72)


def release_checkpoint(out: Path) -> Path:
    """A random-weight checkpoint in Ai2's release layout (see the module docstring)."""
    vision = {k: v for k, v in tiny().to_hf_dict().items() if k.startswith(("image_", "vit_"))}
    hf = {**OFFICIAL_FIELDS, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2,
          "num_key_value_heads": 1, "num_hidden_layers": 2, **vision}  # fmt: skip
    config = MolmoConfig.from_hf_dict(hf)
    tok = build_tokenizer(vocab_size=config.llm.embedding_size)
    assert tok.im_start_id == 152064  # Molmo-7B-D's ids
    # Fan-in scaled weights (the demo's start from nothing): a stand-in for trained ones that
    # learns in a few dozen steps, where a uniform 0.02 init barely moves the answers.
    model = init_from_scratch(MolmoForCausalLM(config, im_patch_id=tok.im_patch_id), seed=0)
    path = save_checkpoint(model, out, tok)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")  # the release's own fields
    return path


def dots_image() -> Image.Image:
    image = Image.new("RGB", SIZE, (40, 40, 160))
    draw = ImageDraw.Draw(image)
    for x, y in TRUE_POINTS:
        draw.ellipse((x - 6, y - 6, x + 6, y + 6), fill=(250, 250, 250))
    return image


def write_data(folder: Path) -> Path:
    """train.jsonl with one image: a pointing annotation (answer built from the points) and
    a short written answer."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    dots_image().save(folder / "images" / "dots.png")
    line = {"image": "images/dots.png", "annotations": [
        {"messages": [{"role": "user", "content": "Point to all the dots."}], "points": TRUE_POINTS,
         "label": "dots"},
        {"messages": [{"role": "user", "content": "What colour is the background?"},
                      {"role": "assistant", "content": "Blue."}]}]}  # fmt: skip
    path = folder / "train.jsonl"
    path.write_text(json.dumps(line) + "\n")
    return path


# ---------------------------------------------------------------- end to end


@pytest.mark.vllm
@pytest.mark.server
def test_release_checkpoint_fine_tuned_on_jsonl_is_evaluated_and_served(tmp_path):
    demo_before = _demo_files()
    release = release_checkpoint(tmp_path / "release")
    data = write_data(tmp_path / "data")
    run = tmp_path / "run"
    warmups = [f"--set=optim.{c}_warmup=1" for c in ("connector", "vit", "llm")]
    cmd = [sys.executable, "-m", "molmo_cli", "train", "--init-from", str(release), "--data", str(data),
           "--val-data", str(data), "--out", str(run), "--steps", "40", "--batch-size", "1",
           "--lr-scale", "200", "--max-len", "512", *warmups, "--set=run.log_every=5",
           "--set=run.progress=false"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data " in done.stdout and "1 images, 2 annotations" in done.stdout  # checked before the model
    model_dir = run / "model"
    assert f"molmo serve --model {model_dir}" in done.stdout  # the end-of-run hint
    assert json.loads((model_dir / "train_config.json").read_text())["model"]["init_from"] == str(release)
    # The release's vocabulary and tokenizer travel with the fine-tuned model.
    assert json.loads((model_dir / "config.json").read_text())["embedding_size"] == 152064
    assert _demo_files() == demo_before  # the server's default model is left alone
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.1 * rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[-1]["eval_pointing_f1"] == 1.0 and rows[-1]["eval_exact_match"] == 1.0  # the val data's

    # Scored on the user's data by both engines: vLLM (what users run) and the reference.
    reports = {}
    for engine in ("reference", "vllm"):
        report_path = tmp_path / f"eval_{engine}.json"
        done = subprocess.run([sys.executable, "-m", "molmo_cli", "eval", "--model", str(model_dir), "--data",
                               str(data), "--engine", engine, "--dtype", "float32", "--answers", "--out", str(report_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "pointing f1" in done.stdout
        reports[engine] = report = json.loads(report_path.read_text())
        assert report["pointing"]["f1"] == 1.0 and report["counting"]["accuracy"] == 1.0
        assert report["exact_match"]["accuracy"] == 1.0
    assert reports["vllm"]["per_query"] == reports["reference"]["per_query"]  # answers too

    with running_server(model_dir, tmp_path, "--max-model-len", "1024") as server:
        r = httpx.post(f"{server.url}/v1/point", timeout=120,
                       json={"image": _b64(dots_image()), "object": "dots"})
    assert r.status_code == 200, r.text
    got = sorted((p["x"], p["y"]) for p in r.json()["points"])
    assert len(got) == 2, r.json()
    for (x, y), (tx, ty) in zip(got, sorted(map(tuple, TRUE_POINTS)), strict=True):
        assert abs(x - tx) <= 1.0 and abs(y - ty) <= 1.0, (got, TRUE_POINTS)  # 0.1% steps of 96x72 pixels


def _demo_files() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in (ROOT / "models" / "molmo-demo").iterdir()}


def _b64(image: Image.Image) -> str:
    import base64

    return base64.b64encode(encode_image(image)).decode()


# ---------------------------------------------------------------- the CLI's rules


def test_train_without_data_or_preset_is_a_usage_error_and_no_preset_but_the_demos_exports(capsys):
    assert cli.train([]) == 2
    assert "--data TRAIN.jsonl" in capsys.readouterr().err
    assert cli.train(["--preset", "finetune-7b"]) == 2  # a random 7B with the demo tokenizer: refused
    assert "model.init_from is required" in capsys.readouterr().err
    assert cli.train(["--preset", "finetune-7b", "--init-from", "ckpt", "--print-config"]) == 0
    capsys.readouterr()
    from training.config import RUN_PRESETS, run_preset

    exports = {name: run_preset(name).run.export_dir for name in RUN_PRESETS}
    assert exports == {"demo": "models/molmo-demo", "demo-gpu": "models/molmo-demo",
                       "demo-robust": None, "smoke": None, "pretrain-7b": None,
                       "finetune-7b": None}  # fmt: skip
    example = cli.build_config(None, str(ROOT / "training/configs/example.toml"), ["run.steps=2000"])
    assert example.run.export_dir is None and example.run.steps == 2000
    mine = cli.build_config(None, None, [], _flags("--data", "d.jsonl", "--init-from", "ckpt"))
    assert mine.run.export_dir is None and mine.run.out_dir == "runs/train" and not mine.run.resume
    assert (mine.optim.llm_lr, mine.optim.vit_lr, mine.optim.connector_lr) == (1e-5, 5e-6, 5e-6)  # the paper's


def _flags(*argv: str):
    """The namespace `molmo train` parses from argv (build_config's flags)."""
    seen = {}

    def grab(cfg_preset, cfg_file, sets, flags):
        seen["flags"] = flags
        raise ValueError("stop")

    import unittest.mock

    with unittest.mock.patch.object(cli, "build_config", grab):
        cli.train(list(argv))
    return seen["flags"]


def test_the_demos_extras_never_run_on_jsonl_data(tmp_path, capsys):
    # The fine-tuning config switches none on; asking for one on JSONL data is refused.
    mine = cli.build_config(None, None, [], _flags("--data", "d.jsonl", "--init-from", "ckpt"))
    assert mine.extras.build(mine.data, None) == []  # no order recovery rewriting the answers
    for key in ("extras.recovery.prob=0.5", "extras.dense.weight=1", "extras.grounding.weight=1"):
        cfg = cli.build_config(None, None, [key], _flags("--data", "d.jsonl", "--init-from", "ckpt"))
        with pytest.raises(ValueError, match=key.split("=")[0].rsplit(".", 1)[0] + ".*does not run on JSONL"):
            cfg.check()
    assert cli.train(["--preset", "demo", "--data", "d.jsonl"]) == 2  # the demo's extras on user data
    assert "extras.dense is the synthetic demo's supervision" in capsys.readouterr().err


def test_data_without_a_checkpoint_to_start_from_is_a_usage_error(capsys):
    # A random model at fine-tuning rates would train for the whole schedule and learn nothing.
    assert cli.train(["--data", "d.jsonl"]) == 2
    assert "give --init-from CKPT" in capsys.readouterr().err
    scratch = cli.build_config(None, None, ["model.preset=tiny"], _flags("--data", "d.jsonl"))
    assert scratch.model.preset == "tiny" and scratch.model.init_from is None


BAD_LINES = {
    "role": ({"image": "images/dots.png", "annotations": [{"messages": [{"role": "bot", "content": "hi"}]}]},
             "annotations[0].messages[0].role"),
    "point outside": ({"image": "images/dots.png", "annotations": [{"messages": [{"role": "user", "content": "Point"}],
                      "points": [[97.0, 10.0]], "label": "dot"}]}, "annotations[0].points[0]: [97, 10] is outside"),
    "unreadable image": ({"image": "images/broken.png", "annotations": [{"messages": [
                          {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]}, "image:"),
    "missing image": ({"image": "images/nope.png", "annotations": [{"messages": [
                       {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]}, "image: file not found"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_data_is_reported_with_file_line_field_before_the_model_is_built(case, tmp_path, tiny_checkpoint,
                                                                            capsys, monkeypatch):  # fmt: skip
    import training.train

    monkeypatch.setattr(training.train, "build_model", lambda *a, **k: pytest.fail("built the model"))
    data = write_data(tmp_path)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    line, field = BAD_LINES[case]
    data.write_text(data.read_text() + json.dumps(line) + "\n")  # line 2
    argv = ["--init-from", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "run")]
    assert cli.train(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: {field}" in err, err


def test_bad_val_data_exits_2_without_a_traceback(tmp_path, tiny_checkpoint):
    data = write_data(tmp_path)
    val = tmp_path / "val.jsonl"
    val.write_text('{"image": "images/dots.png", "annotations": []}\n')
    done = subprocess.run([sys.executable, "-m", "molmo_cli", "train", "--init-from", str(tiny_checkpoint),
                           "--data", str(data), "--val-data", str(val), "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"{val}:1: annotations: is required" in done.stderr and "Traceback" not in done.stderr


def test_annotations_dropped_for_length_are_reported(tmp_path, tiny_checkpoint):
    _, config, tok = load_checkpoint(tiny_checkpoint)
    data = write_data(tmp_path)
    pre = MolmoPreprocessor(config.preprocess, tok)
    prefix = 1 + pre.image_token_count(*SIZE)
    first = load_record(read_jsonl(data)[0]).annotations[0]
    max_len = prefix + len(annotation_tokens(first, tok)[0])  # room for the first annotation only
    report = check_jsonl(data, pre, max_len)
    assert (report.images, report.annotations, report.dropped, report.truncated) == (1, 2, [(1, 1)], [])
    assert f"1 of 2 annotations dropped: they do not fit in data.max_len={max_len}" in report.summary(max_len)
    assert "train.jsonl:1 annotations[1]" in report.summary(max_len)
    assert check_jsonl(data, pre, max_len - 1).truncated == [(1, 0)]  # the first one is cut, and said so
    with pytest.raises(DataError, match=r"train.jsonl:1: image: its 96x72 pixels take \d+ tokens"):
        check_jsonl(data, pre, max_len=prefix)


def test_resume_needs_the_flag_and_refuses_a_changed_config(tmp_path, tiny_checkpoint, capsys):
    data = write_data(tmp_path)
    argv = ["--init-from", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "run"),
            "--steps", "1", "--max-len", "512", "--set", "run.progress=false"]  # fmt: skip
    assert cli.train(argv) == 0
    assert f"serve it:    molmo serve --model {tmp_path / 'run' / 'model'}" in capsys.readouterr().out
    assert cli.train(argv) == 2  # an earlier run's checkpoints are never silently resumed or overwritten
    assert "continue it with --resume or choose another --out" in capsys.readouterr().err
    assert cli.train([*argv, "--resume", "--lr-scale", "2"]) == 2
    err = capsys.readouterr().err
    assert "the config changed since it was saved: optim.connector_lr (5e-06 -> 1e-05)" in err, err
    assert "optim.llm_lr (1e-05 -> 2e-05)" in err
    # Changing only the time limit is a resume; the run is already at its last step.
    assert cli.train([*argv, "--resume", "--time-limit", "60"]) == 0


def test_the_eta_follows_the_time_limit():
    from training.run_log import eta_seconds

    assert eta_seconds(10, 20.0, 990, time_limit=0) == pytest.approx(1980.0)  # by steps
    assert eta_seconds(10, 20.0, 990, time_limit=60) == pytest.approx(40.0)  # the limit comes first
    assert eta_seconds(10, 20.0, 5, time_limit=60) == pytest.approx(10.0)  # the steps end first


def test_data_metrics_match_points_by_distance_count_and_exact_match():
    from training.evaluate_data import DataQuery, score_data

    image = Image.new("RGB", (100, 100))  # diagonal 141.4: a hit within 7.07 px
    point = DataQuery([{"role": "user", "content": "Point"}], image, "", [(10.0, 10.0), (50.0, 50.0)], "d:1")
    none = DataQuery([{"role": "user", "content": "Point"}], image, "There are none.", [], "d:2")
    short = DataQuery([{"role": "user", "content": "Colour?"}], image, "Blue.", None, "d:3")
    long = DataQuery([{"role": "user", "content": "Describe"}], image, "a b c d e f g", None, "d:4")
    two = '<points x1="15.0" y1="10.0" x2="51.0" y2="50.0" alt="d">d</points>'  # 5 px and 1 px off
    report = score_data([point, none, short, long], [two, "There are none.", "blue", "x"])
    assert report["pointing"]["f1"] == 1.0 and report["counting"]["accuracy"] == 1.0
    assert report["exact_match"]["accuracy"] == 1.0 and report["unscored"] == 1
    far = '<points x1="20.0" y1="10.0" x2="50.0" y2="50.0" alt="d">d</points>'  # 10 px: a miss
    report = score_data([point, none], [far, '<point x="5.0" y="5.0" alt="d">d</point>'])
    assert report["pointing"]["precision"] == pytest.approx(0.25) and report["pointing"]["f1"] == pytest.approx(0.25)
    assert report["counting"]["mean_abs_error"] == pytest.approx(0.5)
