"""Short demo-preset runs that differ in one recipe choice, diagnosed the same way.

Every variant is `molmo train --preset demo` with a few `--set` overrides and a shorter
schedule (`--steps`, the cosine decay spanning them), trained from the same seed on the same
synthetic stream. Each final training checkpoint is then read teacher-forced on held-out
(`val`) scenes, which splits the answer into the decisions that make or break pointing and
counting:

- `presence`: "There are none." against an answer with points;
- `point_or_points`: one object or several (the token after ` <`);
- `x_first` / `y_first`: the first character of a coordinate (x picks the next object in
  top-down, left-right order; y reads the object x chose);
- `second_char`: the character after it;
- `stop`: after a point, another one or `alt=` (the end of the list);
- `dense_kind` / `dense_colour`: for runs with `run.dense_loss`, the dense head's read-out of
  the kind and colour of the global view's tokens that lie on an object;
- `recovery_x_first`: the same scenes with one same-row pair of points written in reverse
  (`training.extras.recovery`): the first character of the x that goes back for the object passed.

The baseline is the first variant, `demo` (the preset unchanged). Writes
experiments/results/demo_ablation_<device>.json/.csv with the machine that produced them.

    python experiments/demo_ablation.py --steps 400 --parallel 2          # all variants
    python experiments/demo_ablation.py --variants demo,vit_lr --steps 300
    python experiments/demo_ablation.py --checkpoint runs/demo/checkpoints/step-003000 \
        --checkpoint runs/demo_lead/checkpoints/step-002400    # any training checkpoints
        # -> experiments/results/demo_diagnose_cpu.json/.csv, the first one the baseline
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from benchmarks.report import EXPERIMENT_RESULTS, write_results  # noqa: E402

# name -> `--set` overrides of the demo preset. The first is the baseline.
VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "text_only": ["run.dense_loss=0", "run.grounding_loss=0"],
    "dense_only": ["run.grounding_loss=0"],
    "vit_lr": ["optim.vit_lr=0.001"],
    "ground_2_layers": ["run.grounding_layers=[-2,-1]"],
    "vit_lr+ground_2_layers": ["optim.vit_lr=0.001", "run.grounding_layers=[-2,-1]"],
    "ground_lead": ["run.grounding_lead=true"],
    "object_attributes": ["run.dense_object_attributes=1"],
    # Deeper LLMs at about the same matmul cost: more layers before the grounded ones.
    "llm_4_layers": ["model.llm.num_hidden_layers=4", "model.llm.intermediate_size=512"],
    "llm_5_layers": ["model.llm.num_hidden_layers=5", "model.llm.intermediate_size=384"],
    # More attention patterns at the same matmul cost: 6 heads of 32 instead of 3 of 64.
    "llm_6_heads": ["model.llm.num_attention_heads=6", "model.llm.num_key_value_heads=6"],
}


def train_variant(name: str, sets: list[str], steps: int, threads: int, root: Path) -> subprocess.Popen:
    out = root / name
    args = [sys.executable, "-m", "training.cli", "train", "--preset", "demo",
            "--set", f"run.out_dir={out}", "--set", f"run.steps={steps}", "--set", f"run.threads={threads}",
            "--set", "run.time_limit_s=0", "--set", "run.eval_every=0", "--set", "run.save_every=0",
            "--set", "run.export_dir=null", "--set", "run.progress=false"]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed when the process ends)
    return subprocess.Popen(args, cwd=_HERE.parent, stdout=log, stderr=subprocess.STDOUT)


def _category(toks: list[str], j: int) -> str | None:
    """The decision that predicting the token after position j makes (None: not one we track)."""
    here, prev = toks[j], toks[j - 1] if j else ""
    nxt = toks[j + 1] if j + 1 < len(toks) else ""
    if here == '="' and (prev in (" x", " y") or (j >= 2 and toks[j - 2] in (" x", " y"))):
        return "x_first" if " x" in (prev, toks[j - 2]) else "y_first"
    if j >= 3 and prev == '="' and (toks[j - 2] in (" x", " y") or toks[j - 3] in (" x", " y")):
        return "second_char"
    if here == '"' and nxt in (" x", " alt") and any(t == " y" for t in toks[max(0, j - 9) : j]):
        return "stop"
    if here == " <":
        return "point_or_points"
    return None


def diagnose(checkpoint: Path, examples: int) -> dict[str, float]:
    """Teacher-forced decision accuracies (and the dense head's) on held-out scenes."""
    from experiments.checkpoints import load_for_diagnosis
    from molmo_model.preprocessing import MolmoPreprocessor
    from training.coordinates import coordinate_numbers
    from training.data.synthetic import make_example
    from training.extras.dense import dense_targets
    from training.extras.recovery import recover_example
    from training.packing import collate, pack_example

    model, tok, cfg, head, tap = load_for_diagnosis(checkpoint)
    syn = cfg.data.synthetic()
    pre = MolmoPreprocessor(model.config.preprocess, tok)
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    for i in range(examples):
        ex = make_example("val", i, syn)
        seq = pack_example(ex, pre, cfg.data.max_len)
        batch = collate([seq], tok.pad_id, model.config.preprocess.tokens_per_side**2)
        with torch.no_grad():
            out = model(**batch.model_inputs())
        labels, pred = batch.labels[0], out.logits[0].argmax(-1)
        toks = [tok.decode([int(t)]) for t in batch.input_ids[0]]
        answer_start = True
        for j in range(len(toks) - 1):
            if int(labels[j]) < 0:
                answer_start = True
                continue
            ok = bool(int(pred[j]) == int(labels[j]))
            if answer_start:  # the answer's first token: points or "There are none."
                hits["presence"].append(ok)
                answer_start = False
            cat = _category(toks, j)
            if cat is not None:
                hits[cat].append(ok)
            hits["all_answer_tokens"].append(ok)
        # The same scene with each same-row pair's annotation written in reverse: does the model
        # go back for the object it passed (the first character of the x after the wrong turn)?
        rx = recover_example(ex, 1.0, random.Random(i))
        rseq = pack_example(rx, pre, cfg.data.max_len)
        with torch.no_grad():
            rpred = model(**collate([rseq], tok.pad_id, model.config.preprocess.tokens_per_side**2).model_inputs())
        rpred, rids = rpred.logits[0].argmax(-1).tolist(), rseq.input_ids.tolist()
        for segment, index in enumerate(rseq.kept, start=1):
            if not rx.annotations[index].masked_points:
                continue
            (moved,) = rx.annotations[index].masked_points
            mine = [t for t in range(len(rids) - 1) if int(rseq.segment_ids[t]) == segment]
            numbers = coordinate_numbers([rids[t + 1] for t in mine], tok)
            first = next(t for t, n in zip(mine, numbers, strict=True) if n == 2 * (moved + 1))
            hits["recovery_x_first"].append(rpred[first] == rids[first + 1])
        if head is not None:
            t = dense_targets(ex.metadata, *ex.image.size, model.config.preprocess, syn.scene.kinds,
                              syn.scene.colours)  # fmt: skip
            with torch.no_grad():
                kind, colour, _, _ = head.read_out(tap.take()[0])  # crop 0 = the global view
            on = t.kind > 0
            hits["dense_kind"] += (kind.argmax(-1) == t.kind)[on].tolist()
            hits["dense_colour"] += (colour.argmax(-1) == t.colour)[on].tolist()
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())} | {
        f"n_{k}": len(v) for k, v in sorted(hits.items())
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--steps", type=int, default=400, help="steps per run (the schedule spans them)")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (1 torch thread each)")
    p.add_argument("--examples", type=int, default=40, help="held-out scenes to diagnose")
    p.add_argument("--root", default="runs/ablation", help="where the runs go (deleted first)")
    p.add_argument("--diagnose-only", action="store_true", help="re-read finished runs only")
    p.add_argument("--merge", action="store_true", help="keep other variants' rows of the results file")
    p.add_argument("--checkpoint", action="append", type=Path, default=[],
                   help="diagnose this training checkpoint instead of training variants (repeatable; "
                        "writes demo_diagnose_<device>.json/.csv, the first one the baseline)")  # fmt: skip
    a = p.parse_args()
    if a.checkpoint:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        rows = [{"checkpoint": str(c), **diagnose(c, a.examples)} for c in a.checkpoint]
        for row in rows:
            print(json.dumps(row), flush=True)
        meta = {"baseline": rows[0]["checkpoint"], "examples": a.examples}
        write_results("demo_diagnose_cpu", rows, meta=meta, out_dir=EXPERIMENT_RESULTS)
        return
    names = [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    if not a.diagnose_only:
        pending, running = list(names), {}
        while pending or running:
            while pending and len(running) < a.parallel:
                name = pending.pop(0)
                subprocess.run(["rm", "-rf", str(root / name)], check=True)
                running[name] = (train_variant(name, VARIANTS[name], a.steps, 1, root), time.perf_counter())
            time.sleep(2)
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    if proc.returncode != 0:
                        sys.exit(f"variant {name} failed; see {root / name}.log")
                    seconds[name] = round(time.perf_counter() - t0, 1)
                    del running[name]
                    print(f"{name}: trained in {seconds[name]} s", flush=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = []
    for name in names:
        ckpts = sorted((root / name / "checkpoints").glob("step-*"))
        if not ckpts:
            sys.exit(f"variant {name} has no checkpoint under {root / name}")
        row = {"variant": name, "sets": " ".join(VARIANTS[name]), "steps": a.steps,
               "train_seconds": seconds.get(name), **diagnose(ckpts[-1], a.examples)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = "cpu"
    path = EXPERIMENT_RESULTS / f"demo_ablation_{device}.json"
    if a.merge and path.exists():  # keep the other variants of an earlier run at the same length
        earlier = json.loads(path.read_text())
        if earlier.get("steps") == a.steps and earlier.get("examples") == a.examples:
            rows = [r for r in earlier["rows"] if r["variant"] not in names] + rows
            rows.sort(key=lambda r: list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else len(VARIANTS))
    meta = {"baseline": rows[0]["variant"], "steps": a.steps, "examples": a.examples, "parallel": a.parallel}
    write_results(f"demo_ablation_{device}", rows, meta=meta, out_dir=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
