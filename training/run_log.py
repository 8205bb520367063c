"""What a run reports: `log.jsonl` rows, `loss.png`, and the quick held-out evaluation.

A row is written every `run.log_every` steps (and at the last step, also of a run stopped by
its time limit): the step's metrics (training/step.py) plus the throughput of the steps since
the previous row (`steps_per_s`, `images_per_s`, `tokens_per_s`, timed around the steps
only, not the data loading) and the wall time since the loop started (`elapsed_s`). With
`run.eval_every`, rows at those steps add pointing F1 and counting accuracy on held-out
validation scenes (the reference generator).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from molmo_model.model import MolmoForCausalLM
from training.config import TrainConfig


class StepLog:
    """log.jsonl of one run; rows are written by rank 0 only."""

    def __init__(self, path: Path, write: bool) -> None:
        self.path, self.write = path, write
        self.window: list[tuple[float, dict[str, Any]]] = []  # (seconds, metrics) since the last row

    def drop_after(self, step: int) -> None:
        """Drops rows a crashed run wrote after its last checkpoint (`step`)."""
        if self.write and self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
            self.path.write_text("".join(r + "\n" for r in rows))

    def add(self, seconds: float, metrics: dict[str, Any]) -> None:
        """One step's time (the step alone) and metrics."""
        self.window.append((seconds, metrics))

    def row(self, step: int, metrics: dict[str, Any], elapsed: float) -> dict[str, Any]:
        """The row of `step`, with the throughput since the previous row; starts a new window."""
        seconds = sum(w[0] for w in self.window)
        row = {
            "step": step,
            **metrics,
            "steps_per_s": len(self.window) / seconds,
            "images_per_s": sum(w[1]["images"] for w in self.window) / seconds,
            "tokens_per_s": sum(w[1]["tokens"] for w in self.window) / seconds,
            "elapsed_s": elapsed,
        }
        self.window = []
        return row

    def append(self, row: dict[str, Any]) -> None:
        if self.write:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def quick_eval(model: MolmoForCausalLM, tokenizer, cfg: TrainConfig) -> dict[str, float]:
    """Held-out scores through the reference generator: on JSONL data the first
    `run.eval_examples` queries of `data.val_path` (pointing F1, counting and exact-match
    accuracy), on synthetic data pointing F1 and counting accuracy on validation scenes."""
    from training.evaluate import ReferenceEngine, held_out_queries, run_eval

    was_training = model.training
    engine = ReferenceEngine(model, tokenizer, max_new_tokens=200)
    out = {}
    if cfg.data.source == "jsonl":
        from training.evaluate_data import data_queries, run_data_eval

        if not cfg.data.val_path:
            return {}
        report = run_data_eval(engine, data_queries(cfg.data.val_path, cfg.run.eval_examples))
        if "exact_match" in report:
            out["eval_exact_match"] = report["exact_match"]["accuracy"]
    else:
        queries = held_out_queries(cfg.run.eval_examples, cfg.data.synthetic(), split="val",
                                   tasks=("point", "count"))  # fmt: skip
        report = run_eval(engine, queries)
    model.train(was_training)
    if "pointing" in report:
        out["eval_pointing_f1"] = report["pointing"]["f1"]
    if "counting" in report:
        out["eval_counting_accuracy"] = report["counting"]["accuracy"]
    return out


def eta_seconds(steps_done: int, elapsed: float, steps_left: int, time_limit: float) -> float:
    """Seconds until the run ends: the steps left at the pace so far, or the time left under
    `time_limit` (0 = none) when that comes first."""
    by_steps = elapsed / steps_done * steps_left if steps_done else math.inf
    return min(by_steps, max(time_limit - elapsed, 0.0)) if time_limit > 0 else by_steps


def plot_losses(log_path: Path, out: Path) -> None:
    """loss.png from log.jsonl (matplotlib, Agg)."""
    if not log_path.exists():  # stopped before its first log row
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="token loss")
    extras = sorted({k for r in rows for k in r if k.endswith("_loss")})  # the extras' losses
    for key in extras:
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], lw=1, label=key)
    if extras:
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (token loss: mean per answer token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    evals = [r for r in rows if "eval_pointing_f1" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_pointing_f1"] for r in evals], "g.-", label="pointing F1")
        if any("eval_counting_accuracy" in r for r in evals):
            ax2.plot([r["step"] for r in evals], [r.get("eval_counting_accuracy", math.nan) for r in evals],
                     "m.-", label="counting acc.")  # fmt: skip
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
