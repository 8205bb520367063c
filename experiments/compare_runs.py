"""Paired comparison of training runs from their logs, step for step.

Runs of the same preset and seed see the same data stream, so their losses at the same step
compare the recipes and not the data. A run cut short by its time limit on a slow machine
reached fewer steps; comparing at equal steps separates "learns faster" from "got more steps".

    python experiments/compare_runs.py runs/L4 runs/H6 --window 200 --out experiments/results/runs_L4_H6

Each argument is a run folder (with `log.jsonl`) or a log file; the first is the baseline.
Writes OUT.json and OUT.csv (a row per run and window: the means of the token, grounding and
dense losses and the seconds per step; the last step of each run) and OUT.png (the losses
against the step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from benchmarks.report import write_results  # noqa: E402

METRICS = ("loss", "grounding_loss", "dense_loss")


def read_log(path: Path) -> dict[int, dict]:
    log = path / "log.jsonl" if path.is_dir() else path
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows}


def windows(rows: dict[int, dict], width: int, last: int) -> list[dict]:
    """Means over steps (end - width, end] of each metric, for every full window up to `last`."""
    out, steps = [], sorted(rows)
    for end in range(width, last + 1, width):
        inside = [rows[s] for s in steps if end - width < s <= end]
        if not inside:
            continue
        cell = {"end": end}
        for m in METRICS:
            values = [r[m] for r in inside if m in r]
            if values:
                cell[m] = sum(values) / len(values)
        cell["s_per_step"] = sum(1 / r["steps_per_s"] for r in inside) / len(inside)
        out.append(cell)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders or log.jsonl files; the first is the baseline")
    p.add_argument("--window", type=int, default=200, help="steps per averaging window")
    p.add_argument("--out", type=Path, help="write OUT.json, OUT.csv and OUT.png")
    args = p.parse_args(argv)
    logs = {str(r): read_log(r) for r in args.runs}
    common = min(max(rows) for rows in logs.values())  # compare only steps every run reached
    report = {
        "window": args.window,
        "common_steps": common,
        "runs": {
            name: {"last_step": max(rows), "elapsed_s": rows[max(rows)]["elapsed_s"],
                   "windows": windows(rows, args.window, common)}
            for name, rows in logs.items()
        },  # fmt: skip
    }
    names = list(logs)
    print("step  " + "  ".join(f"{Path(n).name:>24}" for n in names) + "   (token / grounding / dense loss)")
    for i, cell in enumerate(report["runs"][names[0]]["windows"]):
        cells = [report["runs"][n]["windows"][i] for n in names]
        text = ["/".join(f"{c.get(m, float('nan')):.3f}" for m in METRICS) for c in cells]
        print(f"{cell['end']:>5} " + "  ".join(f"{t:>24}" for t in text))
    for n in names:
        r = report["runs"][n]
        print(f"{Path(n).name}: last step {r['last_step']} after {r['elapsed_s']:.0f} s")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
        for ax, m in zip(axes, METRICS, strict=True):
            for n in names:
                cells = [c for c in report["runs"][n]["windows"] if m in c]
                ax.plot([c["end"] for c in cells], [c[m] for c in cells], label=Path(n).name)
            ax.set_title(f"{m} (mean over {args.window} steps)")
            ax.set_xlabel("step")
            ax.set_yscale("log")
        axes[0].legend()
        fig.tight_layout()
        rows = [{"run": n, **cell} for n in names for cell in report["runs"][n]["windows"]]
        runs = {n: {k: v for k, v in r.items() if k != "windows"} for n, r in report["runs"].items()}
        meta = {"baseline": names[0], "window": args.window, "common_steps": common, "runs": runs}
        write_results(args.out.stem, rows, meta=meta, out_dir=args.out.parent, figure=fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
