"""`molmo eval` through both engines: vLLM (what users get, and what the demo's bar is read
from) and the PyTorch reference generator answer the same held-out questions alike.

One tiny checkpoint with decisive logits (conftest.py's `decisive_checkpoint`), a few synthetic
scenes (the training generator's and the independent renderer's), the real CLI in a subprocess
for each engine; vLLM runs in float32 (`--dtype`), where its greedy answers must equal the
reference's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, require_vllm_marker

from molmo_model.points import parse_points

pytestmark = pytest.mark.vllm


def _eval(model: Path, out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "training.cli", "eval", "--model", str(model), "--examples", "2",
           "--tasks", "point,count", "--max-new-tokens", "48", "--answers", "--out", str(out), *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory, decisive_checkpoint):
    root = tmp_path_factory.mktemp("eval_engines")
    model, _, _ = decisive_checkpoint
    require_vllm_marker()
    vllm = _eval(model, root / "vllm.json", "--engine", "vllm", "--dtype", "float32")
    reference = _eval(model, root / "reference.json", "--engine", "reference")
    return vllm, reference


def test_vllm_eval_answers_as_the_reference_does(reports):
    vllm, reference = reports
    assert vllm["engine"] == "vllm" and vllm["dtype"] == "float32"
    assert reference["engine"] == "reference" and "dtype" not in reference
    questions = [a["question"] for a in reference["answers"]]
    assert questions and [a["question"] for a in vllm["answers"]] == questions
    assert [a["answer"] for a in vllm["answers"]] == [a["answer"] for a in reference["answers"]]
    for key in ("pointing", "counting"):
        assert vllm[key] == reference[key]
    # The independent renderer's questions (the default --renderer both), through the same engine.
    for key in ("pointing", "counting"):
        assert vllm["independent"][key] == reference["independent"][key]
    independent = [a["answer"] for a in reference["independent"]["answers"]]
    assert independent and [a["answer"] for a in vllm["independent"]["answers"]] == independent


def test_eval_report_keeps_what_count_errors_reads(reports):
    vllm, _ = reports
    for a in vllm["answers"]:
        assert a["task"] in ("point", "count")
        width, height = a["image_size"]
        assert width > 0 and height > 0
        assert a["count"] == len(a["boxes"])
        parse_points(a["answer"], width, height)  # any text parses (points or none)
