"""`molmo train` and `molmo eval` (dispatched from molmo_cli).

    molmo train --init-from CKPT --data train.jsonl --val-data val.jsonl --out runs/mine
    molmo eval --model runs/mine/model --data val.jsonl [--engine reference]
    molmo train --init-from CKPT --data train.jsonl --lora 16 --out runs/mine   # an adapter
    molmo eval --model CKPT --lora runs/mine/adapter --data val.jsonl
    molmo export --merge-lora --model CKPT --lora runs/mine/adapter --out merged/
    molmo train --preset demo-gpu                      # the demo model, 450 s on one GPU
    molmo train --preset demo                          # the CPU demo model, ~45 min on 2 cores
    molmo train --config run.toml [--set run.steps=50 --set data.batch_size=2]
    molmo train --list-presets
    molmo eval --model models/molmo-demo --engine vllm --examples 200 --out eval_report.json
    molmo eval --model DIR --engine reference --tasks point,count
    molmo eval --model DIR --renderer independent --kinds circle,star --colours red,brown

Distributed: `torchrun --nproc-per-node N -m training.cli train ...` (DDP; FSDP with
`--set run.parallel=fsdp`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from molmo_model.lora import DECODER_TARGETS, TARGETS
from training.config import RUN_PRESETS, RunError, TrainConfig, run_preset
from training.recipe import COMPONENTS

TASKS = ("point", "count", "clock")
RENDERERS = ("own", "independent", "both")


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


def build_config(preset: str | None, config: str | None, sets: list[str], flags: argparse.Namespace | None = None) -> TrainConfig:
    """The run's config: a preset and/or a file, the fine-tuning flags (`--data`,
    `--init-from`, ...), then --set overrides (checked by key). Without data, a preset or a
    file it is a usage error: no default run writes anywhere."""
    data = getattr(flags, "data", None)
    if not (preset or config or data):
        raise ValueError("say what to train on: --data TRAIN.jsonl (your data; with --init-from CKPT), "
                         "--preset NAME (see --list-presets) or --config FILE")  # fmt: skip
    d: dict[str, Any] = {}
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
    lora = flags is not None and _lora_rank(flags, sets) > 0
    if flags is not None:
        if flags.lora is not None and flags.lora < 1:
            raise ValueError(f"--lora RANK must be an integer >= 1, got {flags.lora}")
        _apply_flags(d, flags, own_recipe=not (preset or config), lora=lora)
    if (flags is not None and flags.data and not (preset or config) and not flags.init_from and not lora
            and not any(item.strip().startswith("model.") for item in sets)):  # fmt: skip
        raise ValueError("--data fine-tunes a checkpoint: give --init-from CKPT (a Molmo checkpoint folder, "
                         "Ai2's release layout included); to train a new model from scratch instead, choose "
                         "its shape with --set model.preset=NAME")  # fmt: skip
    cfg = TrainConfig.from_dict(_apply_sets(d, sets))
    if flags is not None and flags.lr_scale is not None:
        if flags.lr_scale <= 0:
            raise ValueError(f"--lr-scale must be > 0, got {flags.lr_scale}")
        for c in COMPONENTS:
            setattr(cfg.optim, f"{c}_lr", getattr(cfg.optim, f"{c}_lr") * flags.lr_scale)
    if flags is not None and flags.val_data and "eval_every" not in d.get("run", {}):
        cfg.run.eval_every = cfg.run.steps  # one quick evaluation of the val data, at the end
    if flags is not None and not cfg.lora.enabled:
        given = [f"--lora-{k}" for k in ("alpha", "dropout", "targets", "base-dtype")
                 if getattr(flags, f"lora_{k.replace('-', '_')}", None) is not None]  # fmt: skip
        if given:
            raise ValueError(f"{given[0]} shapes a LoRA adapter: give its rank with --lora RANK")
    return cfg


def _lora_rank(flags: argparse.Namespace, sets: list[str]) -> int:
    """The LoRA rank asked for by --lora or --set lora.rank=R (0: none)."""
    rank = getattr(flags, "lora", None) or 0
    for item in sets:
        key, _, value = item.partition("=")
        if key.strip() == "lora.rank":
            parsed = _parse_value(value)
            rank = parsed if isinstance(parsed, int) else 0
    return rank


def _apply_flags(d: dict[str, Any], a: argparse.Namespace, own_recipe: bool, lora: bool = False) -> None:
    """The fine-tuning flags as config keys. `own_recipe`: no preset or file chose the
    optimiser, so it is the paper's fine-tuning recipe, or with `lora` the LoRA preset."""
    sections = {k: dict(d.get(k) or {}) for k in ("model", "data", "optim", "run", "lora")}
    if lora and own_recipe:
        sections["optim"].setdefault("preset", "lora")
    if a.data:
        sections["data"].update(source="jsonl", path=a.data)
        if own_recipe:
            sections["optim"].setdefault("preset", "finetune")
            sections["run"].setdefault("resume", a.resume)  # an earlier run's checkpoints need --resume
    for value, key in ((a.lora, "rank"), (a.lora_alpha, "alpha"), (a.lora_dropout, "dropout"),
                       (a.lora_targets, "targets"), (a.lora_base_dtype, "base_dtype")):  # fmt: skip
        if value is not None:
            sections["lora"][key] = value
    for value, (section, key) in ((a.val_data, ("data", "val_path")), (a.init_from, ("model", "init_from")),
                                  (a.out, ("run", "out_dir")), (a.steps, ("run", "steps")),
                                  (a.batch_size, ("data", "batch_size")), (a.max_len, ("data", "max_len")),
                                  (a.time_limit, ("run", "time_limit_s")),
                                  (a.grad_checkpointing or None, ("run", "grad_checkpointing"))):  # fmt: skip
        if value is not None:
            sections[section][key] = value
    if a.resume:
        sections["run"]["resume"] = True
    d.update({k: v for k, v in sections.items() if v})


def train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="molmo train", description="Train Molmo with the paper's recipe: fine-tune a checkpoint on your "
        "JSONL data (--init-from CKPT --data train.jsonl), or run a preset or config file.")  # fmt: skip
    p.add_argument("--init-from", metavar="CKPT", help="start from this checkpoint (served or Ai2's release layout)")
    p.add_argument("--data", metavar="TRAIN.jsonl", help="your training data (format: training/data/jsonl.py)")
    p.add_argument("--val-data", metavar="VAL.jsonl", help="held-out data scored during and at the end of the run")
    p.add_argument("--out", metavar="DIR", help="the run folder (default for --data: runs/train)")
    p.add_argument("--steps", type=int, help="optimizer steps (run.steps)")
    p.add_argument("--batch-size", type=int, help="images per device per micro-batch (data.batch_size)")
    p.add_argument("--lr-scale", type=float, help="multiply every component's learning rate")
    p.add_argument("--max-len", type=int, help="tokens per packed sequence, image included (data.max_len)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop (and export) after this long")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each decoder block in the "
                   "backward pass: less activation memory, ~1/3 more compute (run.grad_checkpointing)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its config must not change)")
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), help="a named run (--list-presets)")
    p.add_argument("--config", help="a .toml or .json TrainConfig (training/config.py)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set run.steps=100 (repeatable)")  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-presets", action="store_true")
    lora = p.add_argument_group("LoRA", "train an adapter on the frozen --init-from checkpoint ([lora] in a config)")
    lora.add_argument("--lora", type=int, metavar="RANK", help="adapter rank (lora.rank); the optimiser "
                      "preset becomes `lora` unless --preset/--config chose one")  # fmt: skip
    lora.add_argument("--lora-alpha", type=float, help="the update's scale is alpha / rank (default 2 x rank)")
    lora.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0.05)")
    lora.add_argument("--lora-targets", metavar="NAMES", help=f"comma-separated, of {','.join(TARGETS)} "
                      f"(default {','.join(DECODER_TARGETS)}: what vLLM serves as an adapter)")  # fmt: skip
    lora.add_argument("--lora-base-dtype", choices=("float32", "bfloat16"),
                      help="the frozen base's weights (bfloat16 needs bf16 autocast: CUDA, or --set run.precision=bf16)")  # fmt: skip
    a = p.parse_args(argv)
    if a.list_presets:
        for name in sorted(RUN_PRESETS):
            run = run_preset(name).run
            print(f"{name:12s} steps={run.steps} out_dir={run.out_dir} export_dir={run.export_dir or '-'}")
        return 0
    try:
        cfg = build_config(a.preset, a.config, a.set, a)
        cfg.check()
    except (ValueError, OSError) as e:
        print(f"molmo train: {e}", file=sys.stderr)
        return 2
    if a.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from training.train import train as run_training

    try:
        final = run_training(cfg)
    except RunError as e:
        print(f"molmo train: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        check = f"--data {cfg.data.val_path}" if cfg.data.val_path else "--data VAL.jsonl"
        if cfg.lora.enabled:
            _print_adapter_hints(cfg, final, check)
        else:
            print(f"final model: {final}")
            print(f"serve it:    molmo serve --model {final}")
            print(f"evaluate it: molmo eval --model {final} {check}")
    return 0


def _print_adapter_hints(cfg: TrainConfig, adapter: Path, check: str) -> None:
    base, name = cfg.model.init_from, Path(cfg.run.out_dir).resolve().name
    print(f"final adapter: {adapter} (LoRA rank {cfg.lora.rank} on {cfg.model.init_from})")
    if cfg.lora.adapter().servable:
        print(f"serve it:      molmo serve --model {base} --lora-modules {name}={adapter}")
    else:  # connector/ViT adapters are served merged
        print(f"serve it:      molmo export --merge-lora --model {base} --lora {adapter} --out MERGED && "
              "molmo serve --model MERGED")  # fmt: skip
    print(f"evaluate it:   molmo eval --model {base} --lora {adapter} {check}")
    print(f"merge it:      molmo export --merge-lora --model {base} --lora {adapter} --out MERGED")


def evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="molmo eval", description="Pointing, counting and clock accuracy.")
    p.add_argument("--model", required=True, help="a checkpoint folder (served layout)")
    p.add_argument("--lora", metavar="ADAPTER", help="a LoRA adapter folder (PEFT's, as molmo train --lora "
                   "writes) to answer with on --model; the report goes to the adapter's folder")  # fmt: skip
    p.add_argument("--engine", choices=("vllm", "reference"), default="vllm")
    p.add_argument("--data", metavar="VAL.jsonl", help="score your own held-out JSONL data instead of "
                   "synthetic scenes (metrics: training/evaluate_data.py)")
    p.add_argument("--point-threshold", type=float, default=None,
                   help="with --data: a predicted point hits a true one within this fraction of the "
                   "image diagonal (default 0.05)")
    p.add_argument("--examples", type=int, default=None,
                   help="held-out images to ask about (default 200); with --data: the first N queries")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--start", type=int, default=0, help="first example index of the split")
    p.add_argument("--tasks", default="point,count,clock", help="comma-separated: point,count,clock")
    p.add_argument("--data-config", help="a TrainConfig file whose [data] describes the scenes; "
                   "default: the model's train_config.json, else the generator's defaults")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--dtype", default="auto", help="vLLM's dtype for --engine vllm (auto: vLLM's choice)")
    p.add_argument("--fast-preprocessing", action="store_true",
                   help="--engine vllm: the fast image path (uint8 crops normalized on the device)")
    p.add_argument("--out", help="write the JSON report here (default: MODEL/eval_report.json)")
    p.add_argument("--answers", action="store_true", help="include every answer in the report")
    p.add_argument("--renderer", choices=RENDERERS, default="both",
                   help="synthetic scenes from the training generator (own), from the independent "
                   "renderer (training/independent_scenes.py), or both (default; one engine)")
    p.add_argument("--kinds", help="independent renderer: comma-separated shape kinds to ask about "
                   "(default: the model's training vocabulary)")
    p.add_argument("--colours", help="independent renderer: comma-separated colour names (default: "
                   "the model's training vocabulary)")  # fmt: skip
    a = p.parse_args(argv)
    if a.data:
        return _evaluate_data(a)
    a.examples = 200 if a.examples is None else a.examples
    tasks = tuple(t for t in a.tasks.split(",") if t)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        print(f"molmo eval: --tasks must name some of {TASKS}, got {a.tasks!r}", file=sys.stderr)
        return 2
    model_dir = Path(a.model)
    if not (model_dir / "config.json").exists():
        print(f"molmo eval: --model {model_dir} has no config.json", file=sys.stderr)
        return 2
    try:
        adapter = _adapter(a, model_dir)
    except ValueError as e:  # AdapterError: names the problem
        print(f"molmo eval: --lora: {e}", file=sys.stderr)
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

    from training.evaluate import held_out_queries, run_eval
    from training.independent_scenes import HSV_COLOURS, SHAPE_KINDS, independent_queries

    independent_tasks = tuple(t for t in tasks if t in ("point", "count"))
    if (a.kinds or a.colours) and a.renderer == "own":
        print("molmo eval: --kinds/--colours choose what the independent renderer draws; "
              "use --renderer independent or both", file=sys.stderr)  # fmt: skip
        return 2
    if a.renderer == "independent" and not independent_tasks:
        print("molmo eval: the independent renderer asks point and count questions; "
              f"--tasks {a.tasks!r} has neither", file=sys.stderr)  # fmt: skip
        return 2
    vocabulary = {}
    for name, given, default, known in (("kinds", a.kinds, synthetic.scene.kinds, SHAPE_KINDS),
                                        ("colours", a.colours, synthetic.scene.colours, tuple(HSV_COLOURS))):  # fmt: skip
        names = [n.strip() for n in given.split(",") if n.strip()] if given else list(default)
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            print(f"molmo eval: --{name}: unknown {unknown or 'none given'}; choose from "
                  f"{','.join(known)}", file=sys.stderr)  # fmt: skip
            return 2
        vocabulary[name] = list(dict.fromkeys(names))

    engine = _engine(a, model_dir, adapter)  # one engine answers both renderers' questions
    head = {"model": str(model_dir), **({"lora": str(adapter.path)} if adapter else {}),
            "engine": a.engine, "split": a.split, "examples": a.examples,
            "start": a.start, "tasks": list(tasks), **({"dtype": a.dtype} if a.engine == "vllm" else {}),
            **({"fast_preprocessing": True} if a.fast_preprocessing else {})}  # fmt: skip
    own: dict[str, Any] = {}
    if a.renderer in ("own", "both"):
        queries = held_out_queries(a.examples, synthetic, a.split, a.start, tasks)
        own = run_eval(engine, queries, with_answers=a.answers)
    independent: dict[str, Any] | None = None
    if a.renderer in ("independent", "both") and independent_tasks:
        queries = independent_queries(a.examples, vocabulary["kinds"], vocabulary["colours"],
                                      a.start, independent_tasks)  # fmt: skip
        independent = {**run_eval(engine, queries, with_answers=a.answers), **vocabulary,
                       "scenes": a.examples}  # fmt: skip
    if a.renderer == "independent":  # no split: the independent scenes are seeds start..start+N-1
        head = {k: v for k, v in head.items() if k != "split"} | {"tasks": list(independent_tasks)}
        report = {**head, "renderer": "independent", **independent}
    else:  # the own generator's results stay at the top level, as other code reads them
        report = {**head, **own, **({"independent": independent} if independent else {})}
    out = Path(a.out) if a.out else (adapter.path if adapter else model_dir) / "eval_report.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for label, part in (("own generator", own), ("independent renderer", independent or {})):
        summary = {k: part[k] for k in ("pointing", "counting", "clock") if k in part}
        if summary:
            print(f"{label}:")
            print(json.dumps(summary, indent=2))
    print(f"report: {out}")
    return 0


def _adapter(a: argparse.Namespace, model_dir: Path):
    """The checked adapter of --lora (None without one). Raises AdapterError naming the
    problem; vLLM serves decoder adapters only, so it refuses connector/ViT ones."""
    if not a.lora:
        return None
    from molmo_model.config import MolmoConfig
    from molmo_model.lora import read_adapter

    return read_adapter(a.lora, MolmoConfig.load(model_dir), servable_only=a.engine == "vllm")


def _engine(a: argparse.Namespace, model_dir: Path, adapter=None):
    from training.evaluate import ReferenceEngine, VllmEngine

    if a.engine == "vllm":
        return VllmEngine(model_dir, max_new_tokens=a.max_new_tokens, dtype=a.dtype,
                          fast_preprocessing=a.fast_preprocessing, adapter=adapter)  # fmt: skip
    return ReferenceEngine.from_dir(model_dir, max_new_tokens=a.max_new_tokens, adapter=adapter)


def _evaluate_data(a: argparse.Namespace) -> int:
    """`molmo eval --data VAL.jsonl`: pointing, counting and exact match on your data."""
    from training.evaluate_data import POINT_THRESHOLD, data_queries, format_table, run_data_eval

    model_dir = Path(a.model)
    threshold = POINT_THRESHOLD if a.point_threshold is None else a.point_threshold
    if not (model_dir / "config.json").exists():
        print(f"molmo eval: --model {model_dir} has no config.json", file=sys.stderr)
        return 2
    if not 0 < threshold <= 1:
        print(f"molmo eval: --point-threshold must be in (0, 1], got {threshold}", file=sys.stderr)
        return 2
    try:
        adapter = _adapter(a, model_dir)
    except ValueError as e:  # AdapterError: names the problem
        print(f"molmo eval: --lora: {e}", file=sys.stderr)
        return 2
    try:
        queries = data_queries(a.data, a.examples)
    except OSError as e:
        print(f"molmo eval: --data: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # names file:line:field
        print(f"molmo eval: {e}", file=sys.stderr)
        return 2
    if not queries:
        print(f"molmo eval: {a.data} has no annotations", file=sys.stderr)
        return 2
    report = run_data_eval(_engine(a, model_dir, adapter), queries, threshold)
    if not a.answers:
        report.pop("per_query")
    report = {"model": str(model_dir), **({"lora": str(adapter.path)} if adapter else {}), "engine": a.engine,
              "data": str(a.data), **report}  # fmt: skip
    out = Path(a.out) if a.out else (adapter.path if adapter else model_dir) / f"eval_{Path(a.data).stem}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "eval"):
        print(__doc__.strip())
        sys.exit(2)
    command, rest = sys.argv[1], sys.argv[2:]
    sys.exit(train(rest) if command == "train" else evaluate(rest))
