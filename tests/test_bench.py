"""`molmo bench`: exact metrics against a scripted SSE server, the CLI's outputs and failure
handling, datasets and scoring; and a short run against a real `molmo serve` (tiny model).

Exact timings come from a fake clock that the scripted server drives (tests/scripted_sse.py),
never from wall-clock speed. Run: pytest tests/test_bench.py -q
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import ROOT, free_port, running_server
from PIL import Image
from scripted_sse import FakeClock, Reply, ScriptedServer, chunk, error, in_thread, usage

from molmo_bench.client import RequestConfig
from molmo_bench.datasets import DatasetError, Sample, jsonl_samples, load_dataset, synthetic_scene
from molmo_bench.generator import arrival_gaps
from molmo_bench.metrics import compute_metrics, parse_slo
from molmo_bench.runner import Load, Runner, RunSettings
from molmo_cli import main as molmo

BOXES = [[10.0, 10.0, 30.0, 30.0], [60.0, 40.0, 80.0, 60.0]]  # in a 100 x 100 image
HIT_BOTH = '<points x1="20" y1="20" x2="70" y2="50" alt="dots">dots</points>'  # percent = px here


def sample(task: str, first: bool = True) -> Sample:
    q = "Point to all the dots." if task == "point" else "How many dots are there?"
    return Sample("img", "data:image/png;base64,AA==", 100, 100, q, "dots", task, BOXES, 2, first)


# request i -> (events, status); offsets in seconds after the request was sent
SCRIPT = [
    Reply([(0.125, chunk("", role=True)), (0.25, chunk("I see ")), (0.375, chunk(HIT_BOTH)),
           (0.5, chunk(finish="stop", points=[])), (0.5, usage(100, 3)), (0.625, "[DONE]")]),
    Reply([(0.5, chunk("There are 3", role=True)), (0.75, chunk(" dots.")), (1.0, usage(90, 2)),
           (1.0, "[DONE]")]),
    error(503, "overloaded"),
    Reply([(0.25, chunk("x", role=True)), (0.5, usage(80, 1)), (0.5, "[DONE]")]),
]  # fmt: skip


def test_every_metric_is_exact_against_a_scripted_server() -> None:
    clock = FakeClock()
    server = ScriptedServer(lambda i, body: SCRIPT[i], clock)
    samples = [sample("point"), sample("count", first=False), sample("point"), sample("point")]
    settings = RunSettings("", None, RequestConfig(max_tokens=8), num_requests=4, warmup=0, progress=False)
    runner = Runner(settings, [Load(concurrency=1)], lambda n: samples, [], clock=clock)

    async def go() -> None:
        await server.start()
        runner.settings.base_url = server.url
        await runner.run()
        await server.stop()

    asyncio.run(go())
    level = runner.levels[0]
    recs = sorted(level.records, key=lambda r: r.index)
    assert [r.ok for r in recs] == [True, True, False, True]
    r0, r1, r2, r3 = recs
    assert (r0.first_chunk, r0.ttft, r0.itl, r0.e2e) == (0.125, 0.25, [0.125], 0.625)
    assert r0.text == "I see " + HIT_BOTH and r0.output_tokens == 3 and r0.prompt_tokens == 100
    assert r0.tpot == pytest.approx((0.625 - 0.25) / 2, abs=1e-12)
    assert (r0.num_points, r0.f1, r0.count_correct) == (2, 1.0, None)
    assert (r1.first_chunk, r1.ttft, r1.itl, r1.e2e, r1.count_correct) == (0.5, 0.5, [0.25], 1.0, False)
    assert (r2.status, r2.error) == (503, "overloaded")
    assert (r3.ttft, r3.e2e, r3.tpot, r3.itl) == (0.25, 0.5, None, [])
    # the body that went out: streamed, usage asked for, the model from /v1/models
    body = server.requests[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "scripted" and body["max_tokens"] == 8
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png")

    # the run lasts from the first request to the end of the last (the error took 0 s)
    assert level.ended - level.started == pytest.approx(0.625 + 1.0 + 0.5, abs=1e-12)
    m = level.metrics(parse_slo("ttft_ms=300,e2e_ms=700"), 0.0)
    dur = 2.125
    assert (m.completed, m.failed, m.errors_by_status) == (3, 1, {"503": 1})
    assert m.request_throughput == pytest.approx(3 / dur)
    assert m.output_throughput == pytest.approx(6 / dur) and m.total_input_tokens == 270
    assert m.ttft_ms.mean == pytest.approx(1000 * (0.25 + 0.5 + 0.25) / 3)
    assert m.ttft_ms.median == pytest.approx(250.0)
    assert m.ttft_ms.p90 == pytest.approx(1000 * np.percentile([0.25, 0.5, 0.25], 90))
    assert m.first_chunk_ms.median == pytest.approx(250.0) and m.first_chunk_ms.mean == pytest.approx(1000 * 0.875 / 3)
    assert m.itl_ms.count == 2 and m.itl_ms.mean == pytest.approx(187.5)
    assert m.tpot_ms.count == 2 and m.tpot_ms.mean == pytest.approx(1000 * (0.1875 + 0.5) / 2)
    assert m.e2e_ms.p99 == pytest.approx(1000 * np.percentile([0.625, 1.0, 0.5], 99))
    assert (m.ttft_first_question_ms.count, m.ttft_later_question_ms.median) == (2, 500.0)
    assert m.good_completed == 2 and m.goodput == pytest.approx(2 / dur)  # r1 misses both SLOs
    assert m.points_per_s == pytest.approx(2 / dur)  # r0's two points (r1, r3 have none)
    assert (m.pointing_f1, m.pointing_queries) == (pytest.approx(0.5), 2)  # r0 1.0, r3 0.0
    assert (m.counting_accuracy, m.counting_queries) == (0.0, 1)


def by_model_reply(i: int, body: dict) -> Reply:
    """base: TTFT 0.25 s, E2E 0.5 s, 2 tokens; a: 0.5 s, 1 s, 3 tokens; b: 0.125 s, 0.25 s,
    1 token, except the 6th request (the level's 3rd after 3 warm-ups): a 503."""
    model = body["model"]
    if model == "base":
        return Reply([(0.25, chunk("x", role=True)), (0.5, chunk("y")), (0.5, usage(10, 2)), (0.5, "[DONE]")])
    if model == "a":
        return Reply([(0.5, chunk("x", role=True)), (0.75, chunk("y")), (1.0, chunk("z")),
                      (1.0, usage(10, 3)), (1.0, "[DONE]")])  # fmt: skip
    if i == 5:
        return error(503, "overloaded")
    return Reply([(0.125, chunk("x", role=True)), (0.25, usage(10, 1)), (0.25, "[DONE]")])


def test_a_mix_of_models_is_round_robin_and_each_models_metrics_are_exact() -> None:
    clock = FakeClock()
    server = ScriptedServer(by_model_reply, clock, models=("base", "a", "b"))
    settings = RunSettings("", None, RequestConfig(max_tokens=8), num_requests=6, progress=False,
                           models=["base", "a", "b"])  # fmt: skip
    runner = Runner(settings, [Load(concurrency=1)], lambda n: [sample("point")], [sample("point")], clock=clock)

    async def go() -> None:
        await server.start()
        runner.settings.base_url = server.url
        await runner.run()
        await server.stop()

    asyncio.run(go())
    # One warm-up per model (an adapter's first request loads it), then request i asks mix[i % 3].
    assert runner.warmup == 3 and runner.mix == ["base", "a", "b"]
    assert [b["model"] for b in server.requests] == ["base", "a", "b"] * 3
    level = runner.levels[0]
    recs = sorted(level.records, key=lambda r: r.index)
    assert [r.model for r in recs] == ["base", "a", "b"] * 2
    assert [r.ok for r in recs] == [True, True, False, True, True, True]

    dur = 2 * 0.5 + 2 * 1.0 + 0.25  # the 503 took no time
    m = level.metrics({}, 0.0)
    assert m.duration_s == pytest.approx(dur) and m.total_output_tokens == 11
    by = level.by_model({}, 0.0, ["base", "a", "b"])
    assert list(by) == ["base", "a", "b"]
    base, a, b = by["base"], by["a"], by["b"]
    assert (base.completed, base.failed, base.total_output_tokens) == (2, 0, 4)
    assert (a.completed, a.failed, a.total_output_tokens) == (2, 0, 6)
    assert (b.completed, b.failed, b.errors_by_status, b.total_output_tokens) == (1, 1, {"503": 1}, 1)
    assert base.output_throughput == pytest.approx(4 / dur) and a.output_throughput == pytest.approx(6 / dur)
    assert sum(x.output_throughput for x in by.values()) == pytest.approx(m.output_throughput)
    assert (base.ttft_ms.median, base.e2e_ms.median, base.tpot_ms.median) == (250.0, 500.0, 250.0)
    assert (a.ttft_ms.median, a.e2e_ms.median, a.tpot_ms.median) == (500.0, 1000.0, 250.0)
    assert (b.ttft_ms.median, b.e2e_ms.median, b.tpot_ms.count) == (125.0, 250.0, 0)


def test_metrics_of_no_success_and_slo_parsing() -> None:
    m = compute_metrics([], 0.0)
    assert m.completed == 0 and m.request_throughput == 0.0 and np.isnan(m.ttft_ms.median)
    with pytest.raises(ValueError, match="unknown key 'ttft'"):
        parse_slo("ttft=3")
    with pytest.raises(ValueError, match="e2e_ms needs a number"):
        parse_slo("e2e_ms=fast")


def test_arrivals_are_poisson_or_gamma_with_the_asked_rate() -> None:
    for burstiness in (1.0, 0.25, 4.0):
        gaps = arrival_gaps(4.0, burstiness, seed=1)
        assert next(gaps) == 0.0  # the first request at once
        xs = np.array([next(gaps) for _ in range(20000)])
        assert xs.mean() == pytest.approx(0.25, rel=0.03)
        assert xs.std() / xs.mean() == pytest.approx(burstiness**-0.5, rel=0.05)  # gamma CV
    inf = arrival_gaps(float("inf"), 1.0, 0)
    assert [next(inf) for _ in range(3)] == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- datasets and scoring


def test_synthetic_scenes_draw_the_objects_their_truth_names() -> None:
    image, labels = synthetic_scene(3, (320, 240))
    assert image.size == (320, 240) and len(labels) == 2
    for label, boxes in labels.items():
        for x0, y0, x1, y1 in boxes:
            assert image.getpixel((int((x0 + x1) / 2), int((y0 + y1) / 2))) != (235, 235, 225), label
    samples = load_dataset("synthetic", num_images=2, image_size=(320, 240), seed=3, questions_per_image=3)
    assert [s.first_of_image for s in samples] == [True, False, False] * 2
    assert [s.task for s in samples[:3]] == ["point", "count", "point"]
    assert samples[1].count == len(samples[1].boxes) and samples[1].object == samples[0].object
    from molmo_bench.datasets import COLOURS

    first = Image.open(io.BytesIO(base64.b64decode(samples[0].image_url.split(",", 1)[1])))
    colour = COLOURS[samples[0].object.split()[0]]
    for x0, y0, x1, y1 in samples[0].boxes:  # the question's objects are drawn in its colour
        assert first.getpixel((int((x0 + x1) / 2), int((y0 + y1) / 2))) == colour


def test_jsonl_rows_with_points_and_counts_and_their_errors(tmp_path: Path) -> None:
    Image.new("RGB", (50, 40), "red").save(tmp_path / "a.png")
    rows = [{"image": "a.png", "object": "dots", "points": [[10, 10]], "point_radius": 5},
            {"image": "a.png", "question": "How many?", "count": 4}]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b = jsonl_samples(tmp_path / "d.jsonl", 1)
    assert (a.question, a.task, a.boxes, a.count, a.width) == ("Point to all the dots.", "point", [[5, 5, 15, 15]], 1, 50)
    assert (b.task, b.boxes, b.count) == ("count", None, 4)
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "question": "q"}\n{"image": "missing.png", "question": "q"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: image not found"):
        jsonl_samples(tmp_path / "bad.jsonl", 1)


def test_pointing_f1_is_the_one_molmo_eval_uses() -> None:
    from molmo_model.points import point_scores
    from training import evaluate

    assert evaluate.point_scores is point_scores  # one definition, shared
    assert point_scores([(20, 20), (90, 90)], BOXES)["f1"] == pytest.approx(0.5)


# ---------------------------------------------------------------- the CLI


def bench(tmp_path: Path, url: str, *args: str) -> tuple[int, dict]:
    out = tmp_path / "out"
    code = molmo(["bench", "serve", "--base-url", url, "--out", str(out), "--no-progress",
                  "--image-size", "64x48", *args])  # fmt: skip
    return code, json.loads((out / "bench.json").read_text())


def streamed(i: int, body: dict) -> Reply:
    return Reply([(0.002, chunk("a", role=True)), (0.004, chunk(" b")), (0.004, usage(10, 2)), (0.005, "[DONE]")])


def test_cli_sweep_writes_every_output_and_compare_reads_them(tmp_path: Path, capsys) -> None:
    with in_thread(streamed) as server:
        code, run = bench(tmp_path, server.url, "--num-requests", "5", "--sweep", "concurrency=1,3",
                          "--questions-per-image", "2", "--slo", "e2e_ms=60000")  # fmt: skip
        assert len(server.requests) == 1 + 10  # the warm-up, then 5 per level
    assert code == 0 and run["status"] == "complete"
    assert [lv["load"]["concurrency"] for lv in run["levels"]] == [1, 3]
    for lv in run["levels"]:
        m = lv["metrics"]
        assert m["completed"] == 5 and m["total_output_tokens"] == 10 and m["good_completed"] == 5
        assert len(lv["requests"]) == 5 and all(r["ttft"] is not None for r in lv["requests"])
        assert m["ttft_first_question_ms"]["count"] == 3 and m["ttft_later_question_ms"]["count"] == 2
    assert run["machine"]["cpu_count"] and run["server"]["models"][0]["id"] == "scripted"
    out = tmp_path / "out"
    assert len((out / "bench.csv").read_text().splitlines()) == 1 + 10
    assert len((out / "bench_summary.csv").read_text().splitlines()) == 1 + 2
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (out / "bench.html").read_text()
    printed = capsys.readouterr().out
    assert "TTFT median (ms)" in printed
    # One model: no per-model breakdown anywhere.
    assert "per model" not in printed and not (out / "bench_by_model.csv").exists()
    assert all("by_model" not in lv for lv in run["levels"]) and run["settings"]["model_mix"] == ["scripted"]

    assert molmo(["bench", "compare", str(out / "bench.json"), str(out / "bench.json"), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "B/A" in text and "level 1: A concurrency=3" in text
    assert (tmp_path / "cmp" / "compare.png").exists()


def test_cli_mix_of_models_sends_the_same_mix_at_every_level_and_breaks_it_down(tmp_path: Path, capsys) -> None:
    def reply(i: int, body: dict) -> Reply:
        n = 3 if body["model"] == "a" else 2  # a's answers are a token longer
        return Reply([(0.002, chunk("a", role=True)), (0.004, chunk(" b")), (0.004, usage(10, n)), (0.005, "[DONE]")])

    with in_thread(reply, models=("base", "a", "b")) as server:
        code, run = bench(tmp_path, server.url, "--model", "base,a,b", "--num-requests", "5",
                          "--sweep", "concurrency=1,3")  # fmt: skip
        sent = [b["model"] for b in server.requests]
    assert code == 0 and run["settings"]["model_mix"] == ["base", "a", "b"] and run["settings"]["warmup"] == 3
    assert sent[:3 + 5] == ["base", "a", "b"] + ["base", "a", "b", "base", "a"]  # warm-ups, then concurrency 1
    assert sorted(sent[8:]) == sorted(["base", "a", "b", "base", "a"])  # concurrency 3: any order
    for lv in run["levels"]:
        assert [r["model"] for r in lv["requests"]] == ["base", "a", "b", "base", "a"]
        by, m = lv["by_model"], lv["metrics"]
        assert list(by) == ["base", "a", "b"] and [by[k]["completed"] for k in by] == [2, 2, 1]
        assert [by[k]["total_output_tokens"] for k in by] == [4, 6, 2]
        assert sum(x["output_throughput"] for x in by.values()) == pytest.approx(m["output_throughput"])
        assert by["a"]["output_throughput"] == pytest.approx(6 / m["duration_s"])
    csv_rows = (tmp_path / "out" / "bench_by_model.csv").read_text().splitlines()
    assert csv_rows[0].startswith("level,model,requests,ok,output tok/s") and len(csv_rows) == 1 + 6
    assert csv_rows[2].startswith("concurrency=1,a,2,2,")
    printed = capsys.readouterr().out
    assert "per model" in printed and "E2E median (ms)" in printed

    with in_thread(reply, models=("base", "a")) as server:
        code, run = bench(tmp_path, server.url, "--model", "all", "--num-requests", "3", "--warmup", "0")
        assert [b["model"] for b in server.requests] == ["base", "a", "base"]
    assert code == 0 and list(run["levels"][0]["by_model"]) == ["base", "a"]


def test_cli_a_model_the_server_does_not_list_exits_2_before_any_request(tmp_path: Path, capsys) -> None:
    with in_thread(streamed, models=("base", "a")) as server:
        code, run = bench(tmp_path, server.url, "--model", "base,nope,a,gone")
        assert server.requests == []
    err = capsys.readouterr().err
    assert code == 2 and run["status"] == "failed" and run["levels"] == []
    assert "'nope', 'gone' not served by" in err and "it serves 'base', 'a'" in err


def test_cli_point_endpoint_scores_quality_under_load(tmp_path: Path) -> None:
    def point(i: int, body: dict) -> Reply:
        assert body["object"] and body["image"].startswith("data:image/png")
        text = "There are none." if i % 2 else '<point x="50" y="50" alt="x">x</point>'
        return Reply(json_body={"points": [], "count": 0, "text": text, "usage": {"prompt_tokens": 5, "completion_tokens": 3}})

    with in_thread(point) as server:
        code, run = bench(tmp_path, server.url, "--endpoint", "point", "--num-requests", "4",
                          "--concurrency", "2", "--warmup", "0")  # fmt: skip
    m = run["levels"][0]["metrics"]
    assert code == 0 and m["completed"] == 4 and m["ttft_ms"]["count"] == 0 and m["e2e_ms"]["count"] == 4
    assert m["pointing_queries"] == 4 and m["counting_queries"] == 4


def test_cli_errors_by_status_and_a_server_that_dies(tmp_path: Path) -> None:
    def flaky(i: int, body: dict) -> Reply:
        if i == 3:  # the server goes away: this stream is cut, later connections refused
            asyncio.get_running_loop().call_soon(lambda: server.server.close())
            return Reply([(0.001, chunk("a", role=True))] * 3, drop_after=1)
        return error(500, "boom") if i == 2 else streamed(i, body)

    with in_thread(flaky) as server:
        code, run = bench(tmp_path, server.url, "--num-requests", "20", "--concurrency", "1")
    assert code == 1 and run["status"] == "server_gone" and "stopped answering" in run["message"]
    m = run["levels"][0]["metrics"]
    # request 0 was the warm-up: 1 answered, 2 failed with 500, 3 cut mid-stream, then refused
    assert m["completed"] == 1 and m["errors_by_status"] == {"500": 1, "connection": 3, "stream": 1}


def test_cli_unreachable_and_refused_key(tmp_path: Path, capsys) -> None:
    code, run = bench(tmp_path, f"http://127.0.0.1:{free_port()}")
    assert code == 1 and run["status"] == "failed" and run["levels"] == []
    assert "cannot reach the server" in capsys.readouterr().err
    with in_thread(streamed, api_key="k") as server:
        code, _ = bench(tmp_path, server.url)
        assert code == 1 and "needs --api-key" in capsys.readouterr().err
        code, run = bench(tmp_path, server.url, "--api-key", "k", "--num-requests", "2")
        assert code == 0 and run["levels"][0]["metrics"]["completed"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--slo", "speed=1"], "--slo: unknown key"),
        (["--image-size", "big"], "--image-size: expected WxH"),
        (["--dataset", "/no/such"], "neither 'synthetic', a folder nor a JSONL file"),
        (["--sweep", "rate=-1"], "--sweep: expected"),
        (["--concurrency", "0"], "must be >= 1"),
        (["--model", "all,a"], "'all' (every id the server lists) stands alone"),
        (["--model", "base,,a"], "--model: an empty name"),
    ],
)
def test_bad_usage_exits_2_with_a_message_and_no_traceback(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "molmo_cli", "bench", "serve", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_ctrl_c_writes_what_was_measured(tmp_path: Path) -> None:
    def hang_after_two(i: int, body: dict) -> Reply:
        return Reply(hang=True) if i >= 3 else streamed(i, body)  # request 0 is the warm-up

    with in_thread(hang_after_two) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "molmo_cli", "bench", "serve", "--base-url", server.url, "--out",
             str(tmp_path), "--no-progress", "--image-size", "64x48", "--num-requests", "10"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # A test run started as a background job inherits SIGINT ignored, and Python keeps
            # it so: Ctrl-C must reach the bench as it does at a terminal.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        while len(server.requests) < 4:  # the 4th request hangs: two measured ones are done
            assert proc.poll() is None, proc.communicate()
            server.got_request.wait(1)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    run = json.loads((tmp_path / "bench.json").read_text())
    assert proc.returncode == 130 and run["status"] == "interrupted" and "Ctrl-C" in err
    assert run["levels"][0]["metrics"]["completed"] == 2


def test_point_and_chat_by_hand_fail_clearly(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        molmo(["point", str(tmp_path / "nope.png"), "dots"])
    assert e.value.code == 2 and "image not found" in capsys.readouterr().err
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    url = f"http://127.0.0.1:{free_port()}"
    assert molmo(["chat", str(tmp_path / "a.png"), "Hi", "--base-url", url]) == 1
    assert "cannot reach the server" in capsys.readouterr().err


# ---------------------------------------------------------------- a real server


@pytest.mark.server
@pytest.mark.vllm
def test_against_a_real_molmo_serve(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with running_server(tiny_checkpoint, tmp_path, "--max-model-len", "2048", "--max-images", "1") as server:
        code, run = bench(tmp_path, server.url, "--num-requests", "4", "--concurrency", "2",
                          "--max-tokens", "4", "--questions-per-image", "2", "--ignore-eos")  # fmt: skip
        assert code == 0, run["message"]
        m = run["levels"][0]["metrics"]
        assert m["completed"] == 4 and m["total_output_tokens"] == 16 and m["ttft_ms"]["count"] == 4
        assert m["itl_ms"]["count"] > 0 and m["total_input_tokens"] > 4 * 50  # the image's tokens
        assert m["ttft_first_question_ms"]["count"] == 2 and m["ttft_later_question_ms"]["count"] == 2

        code, run = bench(tmp_path, server.url, "--endpoint", "point", "--num-requests", "2", "--max-tokens", "4")
        assert code == 0 and run["levels"][0]["metrics"]["completed"] == 2

        # By hand: points drawn on a copy, a streamed answer.
        Image.new("RGB", (80, 60), "white").save(tmp_path / "a.png")
        common = ["--base-url", server.url, "--max-tokens", "4"]
        assert molmo(["point", str(tmp_path / "a.png"), "dots", "--draw", str(tmp_path / "p.png"), *common]) == 0
        assert Image.open(tmp_path / "p.png").size == (80, 60)
        assert molmo(["chat", str(tmp_path / "a.png"), "Hi", *common]) == 0

        # The first streamed event carries the first token (its logprobs) with the role.
        img = load_dataset("synthetic", num_images=1, image_size=(64, 48))[0].image_url
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                           {"type": "text", "text": "Hi"}]}],
                "max_tokens": 3, "stream": True, "logprobs": True}  # fmt: skip
        raw = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).text
        events = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
        first = events[0]["choices"][0]
        assert first["delta"]["role"] == "assistant" and first["logprobs"]["content"], first
        assert sum("role" in e["choices"][0]["delta"] for e in events if e["choices"]) == 1
