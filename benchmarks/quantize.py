"""int4 (molmo quantize) against the float model, through vLLM on this machine, in one run.

The demo model (models/molmo-demo) is quantized (RTN, GPTQ layout; group size 64, because
128 does not divide its hidden size 192), then each variant runs
`molmo eval --engine vllm --tasks point,count --renderer own --examples N --answers` in its
own process, one after the other (never together: memory and cores):

    float32   the baseline (the demo model's published numbers are float32)
    bfloat16  the float model with bf16 activations: vLLM runs GPTQ in fp16/bf16 only, so
              this row separates the activation dtype from the int4 weights
    int4      the quantized copy, bf16 activations (its config's torch_dtype)

Per variant: decoder linear bytes on disk (the blocks' att_proj/attn_out/ff_proj/ff_out
tensors) and the whole checkpoint's size; the engine's peak RSS (eval process + vLLM's
EngineCore and worker, summed, sampled every 0.2 s); output tokens/s over the eval (answers
re-tokenized, +1 EOS each, over the eval's own `seconds`: prefill-heavy, short answers, the
vision tower included); pointing F1 and counting accuracy. The goal: int4 within 0.02 F1 of
float32.

    python benchmarks/quantize.py [--examples 600] [--group-size 64]

Writes benchmarks/results/quantize_cpu.{json,csv} (summaries; the per-answer reports stay in
a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import describe_machine, write_results  # noqa: E402

DEMO = ROOT / "models" / "molmo-demo"


def decoder_linear_bytes(model_dir: Path) -> int:
    """Bytes of the decoder blocks' linear layers as stored (float .weight or int4 tensors)."""
    from molmo_model.checkpoint import iter_weights
    from molmo_model.quantize import QUANTIZED_MODULES

    total = 0
    for name, t in iter_weights(model_dir):
        parts = name.split(".")
        if name.startswith("model.transformer.blocks.") and parts[4] in QUANTIZED_MODULES:
            if parts[5] != "bias":
                total += t.numel() * t.element_size()
    return total


def folder_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


class PeakRss:
    """Peak of the summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.proc, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_eval(model: Path, dtype: str, examples: int, out: Path) -> tuple[dict, int, float]:
    cmd = [sys.executable, "-m", "molmo_cli", "eval", "--model", str(model), "--engine", "vllm",
           "--dtype", dtype, "--tasks", "point,count", "--renderer", "own", "--examples",
           str(examples), "--answers", "--out", str(out),
           "--data-config", str(DEMO / "train_config.json")]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    _, err = proc.communicate()
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"molmo eval failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.read_text()), peak, time.perf_counter() - t0


def output_tokens(report: dict, model: Path) -> int:
    from molmo_model.tokenizer import MolmoTokenizer

    tok = MolmoTokenizer.from_dir(model)
    return sum(len(tok.encode(a["answer"])) + 1 for a in report["answers"])  # +1: EOS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=600, help="test scenes per variant")
    p.add_argument("--group-size", type=int, default=64)
    a = p.parse_args()
    machine = describe_machine(with_vllm=True)
    work = Path(tempfile.mkdtemp(prefix="quantize-bench-"))
    int4 = work / "molmo-demo-int4"
    subprocess.run([sys.executable, "-m", "molmo_cli", "quantize", "--model", str(DEMO), "--out",
                    str(int4), "--group-size", str(a.group_size), "--dtype", "bfloat16"],
                   cwd=ROOT, check=True)  # fmt: skip
    variants = [("float32", DEMO, "float32"), ("bfloat16", DEMO, "bfloat16"), ("int4", int4, "bfloat16")]
    rows = []
    for name, model, dtype in variants:
        report, peak, wall = run_eval(model, dtype, a.examples, work / f"{name}.json")
        tokens = output_tokens(report, model)
        row = {
            "variant": name,
            "weights": f"int4 RTN g{a.group_size}" if name == "int4" else dtype,
            "activations": dtype,
            "decoder_linear_bytes": decoder_linear_bytes(model),
            "checkpoint_bytes": folder_bytes(model),
            "engine_peak_rss_mb": round(peak / 2**20),
            "queries": len(report["answers"]),
            "output_tokens": tokens,
            "eval_seconds": round(report["seconds"], 1),
            "output_tokens_per_s": round(tokens / report["seconds"], 1),
            "wall_seconds_with_start": round(wall, 1),
            "point_f1": round(report["pointing"]["f1"], 4),
            "count_accuracy": round(report["counting"]["accuracy"], 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for r in rows:
        r["f1_vs_float32"] = round(r["point_f1"] - base["point_f1"], 4)
        r["count_vs_float32"] = round(r["count_accuracy"] - base["count_accuracy"], 4)
    cols = ["variant", "decoder_linear_bytes", "checkpoint_bytes", "engine_peak_rss_mb",
            "output_tokens_per_s", "point_f1", "f1_vs_float32", "count_accuracy", "count_vs_float32"]  # fmt: skip
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    write_results(
        "quantize_cpu",
        rows,
        meta={
            "baseline": "float32 (the demo model as published)",
            "model": "models/molmo-demo",
            "examples": a.examples,
            "group_size": a.group_size,
            "quantizer": "molmo-rtn (round-to-nearest, symmetric, per group; GPTQ layout)",
            "tasks": ["point", "count"],
            "renderer": "own",
        },
        machine=machine,
    )


if __name__ == "__main__":
    main()
