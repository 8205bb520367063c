"""`molmo train` and `molmo eval` (dispatched from molmo_cli).

    molmo train --preset demo-gpu                      # the demo model, 450 s on one GPU
    molmo train --preset demo                          # the CPU demo model, ~45 min on 2 cores
    molmo train --config run.toml [--set run.steps=50 --set data.batch_size=2]
    molmo train --list-presets
    molmo eval --model models/molmo-demo --engine vllm --examples 200 --out eval_report.json
    molmo eval --model DIR --engine reference --tasks point,count

Distributed: `torchrun --nproc-per-node N -m training.cli train ...` (DDP; FSDP with
`--set run.parallel=fsdp`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from training.config import RUN_PRESETS, TrainConfig, run_preset

TASKS = ("point", "count", "clock")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string


def _apply_sets(d: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """`section.key=value` overrides (values in JSON; bare words are strings)."""
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {k} is not a table")
        node[keys[-1]] = _parse_value(value)
    return d


def build_config(preset: str | None, config: str | None, sets: list[str]) -> TrainConfig:
    """The run's config: a preset and/or a file, then --set overrides (checked by key)."""
    if config:
        p = Path(config)
        if p.suffix == ".toml":
            import tomllib

            d = tomllib.loads(p.read_text())
        elif p.suffix == ".json":
            d = json.loads(p.read_text())
        else:
            raise ValueError(f"--config: {p} must be a .toml or .json file")
        if preset:
            d.setdefault("preset", preset)
    else:
        d = {"preset": preset or "demo"}
    return TrainConfig.from_dict(_apply_sets(d, sets))


def train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="molmo train", description="Train Molmo with the paper's recipe.")
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), help="a named run (default: demo)")
    p.add_argument("--config", help="a .toml or .json TrainConfig (training/config.py)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set run.steps=100 (repeatable)")  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-presets", action="store_true")
    a = p.parse_args(argv)
    if a.list_presets:
        for name in sorted(RUN_PRESETS):
            run = run_preset(name).run
            print(f"{name:12s} steps={run.steps} out_dir={run.out_dir}")
        return 0
    try:
        cfg = build_config(a.preset, a.config, a.set)
    except (ValueError, OSError) as e:
        print(f"molmo train: {e}", file=sys.stderr)
        return 2
    if a.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from training.train import train as run_training

    final = run_training(cfg)
    print(f"final model: {final}")
    return 0


def evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="molmo eval", description="Pointing, counting and clock accuracy.")
    p.add_argument("--model", required=True, help="a checkpoint folder (served layout)")
    p.add_argument("--engine", choices=("vllm", "reference"), default="vllm")
    p.add_argument("--examples", type=int, default=200, help="held-out images to ask about")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--start", type=int, default=0, help="first example index of the split")
    p.add_argument("--tasks", default="point,count,clock", help="comma-separated: point,count,clock")
    p.add_argument("--data-config", help="a TrainConfig file whose [data] describes the scenes; "
                   "default: the model's train_config.json, else the generator's defaults")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--dtype", default="auto", help="vLLM's dtype for --engine vllm (auto: vLLM's choice)")
    p.add_argument("--out", help="write the JSON report here (default: MODEL/eval_report.json)")
    p.add_argument("--answers", action="store_true", help="include every answer in the report")
    a = p.parse_args(argv)
    tasks = tuple(t for t in a.tasks.split(",") if t)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        print(f"molmo eval: --tasks must name some of {TASKS}, got {a.tasks!r}", file=sys.stderr)
        return 2
    model_dir = Path(a.model)
    if not (model_dir / "config.json").exists():
        print(f"molmo eval: --model {model_dir} has no config.json", file=sys.stderr)
        return 2
    source = Path(a.data_config) if a.data_config else model_dir / "train_config.json"
    try:
        data_cfg = TrainConfig.load(source).data if source.exists() else TrainConfig().data
    except ValueError as e:
        print(f"molmo eval: {source}: {e}", file=sys.stderr)
        return 2
    synthetic = data_cfg.synthetic()
    if "clock" in tasks and synthetic.clock_fraction == 0.0:
        tasks = tuple(t for t in tasks if t != "clock")  # the model's data has no clocks

    from training.evaluate import ReferenceEngine, VllmEngine, held_out_queries, run_eval

    queries = held_out_queries(a.examples, synthetic, a.split, a.start, tasks)
    if a.engine == "vllm":
        engine = VllmEngine(model_dir, max_new_tokens=a.max_new_tokens, dtype=a.dtype)
    else:
        engine = ReferenceEngine.from_dir(model_dir, max_new_tokens=a.max_new_tokens)
    report = run_eval(engine, queries, with_answers=a.answers)
    report = {"model": str(model_dir), "engine": a.engine, "split": a.split, "examples": a.examples,
              "start": a.start, "tasks": list(tasks), **({"dtype": a.dtype} if a.engine == "vllm" else {}), **report}  # fmt: skip
    out = Path(a.out) if a.out else model_dir / "eval_report.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: report[k] for k in ("pointing", "counting", "clock") if k in report}
    print(json.dumps(summary, indent=2))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "eval"):
        print(__doc__.strip())
        sys.exit(2)
    command, rest = sys.argv[1], sys.argv[2:]
    sys.exit(train(rest) if command == "train" else evaluate(rest))
