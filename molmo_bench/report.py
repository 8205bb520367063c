"""What a run writes, and `compare`: JSON, CSV, PNG plots and one self-contained HTML page.

    OUT/bench.json          settings, the server's /v1/models, the machine, the status, and per
                            load level the summary (`BenchmarkMetrics`), with a mix of models
                            each model's too (`by_model`), and every request's record (so any
                            metric can be recomputed: `metrics.compute_metrics`)
    OUT/bench.csv           one line per request (with its load level and model)
    OUT/bench_summary.csv   one line per load level
    OUT/bench_by_model.csv  with a mix of models: one line per load level and model
    OUT/bench.png           latency CDFs (TTFT, ITL, E2E) per level; with a sweep, throughput
                            and p99 TTFT against the load
    OUT/bench.html          the table and the plots in one file (images inlined)

The machine is the client's: where a benchmark runs on the server's machine it is that too.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

# (label, key in the metrics dict, sub-key) of the printed table
ROWS = [
    ("completed", "completed", None),
    ("failed", "failed", None),
    ("duration (s)", "duration_s", None),
    ("requests/s", "request_throughput", None),
    ("output tok/s", "output_throughput", None),
    ("goodput (req/s)", "goodput", None),
    ("TTFT mean (ms)", "ttft_ms", "mean"),
    ("TTFT median (ms)", "ttft_ms", "median"),
    ("TTFT p90 (ms)", "ttft_ms", "p90"),
    ("TTFT p99 (ms)", "ttft_ms", "p99"),
    ("first chunk median (ms)", "first_chunk_ms", "median"),
    ("TTFT 1st question median (ms)", "ttft_first_question_ms", "median"),
    ("TTFT later question median (ms)", "ttft_later_question_ms", "median"),
    ("TPOT median (ms)", "tpot_ms", "median"),
    ("TPOT p99 (ms)", "tpot_ms", "p99"),
    ("ITL median (ms)", "itl_ms", "median"),
    ("ITL p99 (ms)", "itl_ms", "p99"),
    ("E2E median (ms)", "e2e_ms", "median"),
    ("E2E p99 (ms)", "e2e_ms", "p99"),
    ("points/s", "points_per_s", None),
    ("pointing F1", "pointing_f1", None),
    ("counting accuracy", "counting_accuracy", None),
]
# the per-model table and CSV of a run that mixes models (one row per level and model)
MODEL_COLUMNS = ["level", "model", "requests", "ok", "output tok/s", "TTFT median (ms)",
                 "TPOT median (ms)", "E2E median (ms)"]  # fmt: skip


def describe_client_machine() -> dict[str, Any]:
    """The machine that ran the benchmark: CPU, cores, load average at the start, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def value(metrics: dict[str, Any], key: str, sub: str | None) -> float | None:
    v = metrics.get(key)
    if sub is not None:
        v = (v or {}).get(sub)
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(columns: list[str], metrics: list[dict[str, Any]], extra: list[list[str]] | None = None) -> str:
    """A plain-text table: one row per metric, one column per level (or run)."""
    rows = [[label, *(_fmt(value(m, k, s)) for m in metrics)] for label, k, s in ROWS]
    rows += extra or []
    return grid(["metric", *columns], rows)


def grid(head: list[str], rows: list[list[str]]) -> str:
    """Aligned text columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def by_model_rows(result: dict[str, Any]) -> list[list[Any]]:
    """MODEL_COLUMNS' values per level and model; none for a run of one model."""
    rows = []
    for lv in result["levels"]:
        for name, m in (lv.get("by_model") or {}).items():
            rows.append([lv["load"]["label"], name, m["completed"] + m["failed"], m["completed"],
                         value(m, "output_throughput", None), value(m, "ttft_ms", "median"),
                         value(m, "tpot_ms", "median"), value(m, "e2e_ms", "median")])  # fmt: skip
    return rows


def summary_table(result: dict[str, Any]) -> str:
    """The metrics per level; with a mix of models, each model's beside (a second table)."""
    levels = result["levels"]
    text = table([lv["load"]["label"] for lv in levels], [lv["metrics"] for lv in levels])
    if rows := by_model_rows(result):
        per_model = grid(MODEL_COLUMNS, [[_fmt(v) for v in r] for r in rows])
        text += f"\n\nper model (output tok/s: its tokens over the level's duration)\n{per_model}"
    return text


# ---------------------------------------------------------------- plots


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if values:
        xs = np.sort(np.asarray(values) * 1000.0)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)


def figure(result: dict[str, Any]) -> Any:
    """Latency CDFs per level; with more than one level, throughput and p99 TTFT too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    sweep = len(levels) > 1
    fig, axes = plt.subplots(1, 5 if sweep else 3, figsize=(20 if sweep else 13, 3.6))
    for ax, (title, get) in zip(axes, [
        ("TTFT", lambda r: [r["ttft"]] if r.get("ttft") is not None else []),
        ("ITL", lambda r: r.get("itl") or []),
        ("E2E", lambda r: [r["e2e"]] if r.get("e2e") is not None else []),
    ], strict=False):  # fmt: skip
        for lv in levels:
            _cdf(ax, [v for r in lv["requests"] if r["ok"] for v in get(r)], lv["load"]["label"])
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)  # E2E: every completed request has one
    if sweep:
        axis = "rate" if levels[0]["load"].get("rate") is not None else "concurrency"
        xs = [lv["load"][axis] for lv in levels]
        axes[3].plot(xs, [lv["metrics"]["request_throughput"] for lv in levels], "o-", label="requests/s")
        axes[3].plot(xs, [lv["metrics"]["output_throughput"] for lv in levels], "s-", label="output tok/s")
        axes[3].set(title="throughput", xlabel=axis)
        axes[3].legend(fontsize=7)
        axes[4].plot(xs, [lv["metrics"]["ttft_ms"]["p99"] for lv in levels], "o-")
        axes[4].set(title="p99 TTFT (ms)", xlabel=axis)
        for ax in axes[3:]:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def html_page(title: str, text_table: str, png: bytes, facts: dict[str, Any]) -> str:
    """One self-contained page: facts, the table and the plot (inlined)."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>" for k, v in facts.items())
    img = base64.b64encode(png).decode()
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{text-align:left;padding:2px 8px}"
        "pre{background:#f4f4f4;padding:1em}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table>{rows}</table><pre>{html.escape(text_table)}</pre>"
        f"<img alt='plots' src='data:image/png;base64,{img}'></body></html>\n"
    )


# ---------------------------------------------------------------- writing


def write_run(result: dict[str, Any], out_dir: Path, name: str = "bench") -> list[Path]:
    """Writes JSON, CSVs, PNG and HTML for `result`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.csv", out_dir / f"{name}_summary.csv"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    with paths[1].open("w", newline="") as f:
        w = None
        for lv in result["levels"]:
            for r in lv["requests"]:
                row = {"level": lv["load"]["label"], **{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}}
                if w is None:
                    w = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
                    w.writeheader()
                w.writerow(row)
    with paths[2].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", *(label for label, _, _ in ROWS)])
        for lv in result["levels"]:
            w.writerow([lv["load"]["label"], *(value(lv["metrics"], k, s) for _, k, s in ROWS)])
    if rows := by_model_rows(result):
        paths.append(out_dir / f"{name}_by_model.csv")
        with paths[-1].open("w", newline="") as f:
            csv.writer(f).writerows([MODEL_COLUMNS, *rows])
    if result["levels"]:
        fig = figure(result)
        png = _png(fig)
        (out_dir / f"{name}.png").write_bytes(png)
        facts = {"status": result["status"], "server": result["server"]["base_url"],
                 "models": [m.get("id") for m in result["server"]["models"]],
                 "settings": result["settings"], "machine": result["machine"]}  # fmt: skip
        page = html_page(f"molmo bench: {result['server']['base_url']}", summary_table(result), png, facts)
        (out_dir / f"{name}.html").write_text(page)
        paths += [out_dir / f"{name}.png", out_dir / f"{name}.html"]
    return paths


# ---------------------------------------------------------------- compare


def compare(a: dict[str, Any], b: dict[str, Any], out_dir: Path | None = None) -> str:
    """Two runs side by side, level by level (matched in order), with the ratio B / A."""
    lines = []
    rows: list[dict[str, Any]] = []
    for i, (la, lb) in enumerate(zip(a["levels"], b["levels"], strict=False)):
        ratios = []
        for label, k, s in ROWS:
            va, vb = value(la["metrics"], k, s), value(lb["metrics"], k, s)
            ratio = vb / va if isinstance(va, int | float) and isinstance(vb, int | float) and va else None
            ratios.append([label, _fmt(va), _fmt(vb), _fmt(ratio)])
            rows.append({"level": i, "metric": label, "a": va, "b": vb, "b_over_a": ratio})
        head = f"level {i}: A {la['load']['label']} | B {lb['load']['label']}"
        lines += [head, grid(["metric", "A", "B", "B/A"], ratios), ""]
    if len(a["levels"]) != len(b["levels"]):
        lines.append(f"(A has {len(a['levels'])} levels, B {len(b['levels'])}: compared the first {min(len(a['levels']), len(b['levels']))})")
    text = "\n".join(lines)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.json").write_text(json.dumps({"a": a.get("server"), "b": b.get("server"), "rows": rows}, indent=1) + "\n")
        (out_dir / "compare.png").write_bytes(_png(compare_figure(a, b)))
    return text


def compare_figure(a: dict[str, Any], b: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("requests/s", "request_throughput", None), ("TTFT median (ms)", "ttft_ms", "median"),
            ("ITL median (ms)", "itl_ms", "median"), ("E2E p99 (ms)", "e2e_ms", "p99")]  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    n = min(len(a["levels"]), len(b["levels"]))
    xs = np.arange(n)
    for ax, (label, k, s) in zip(axes, keys, strict=True):
        for off, run, name in ((-0.2, a, "A"), (0.2, b, "B")):
            ax.bar(xs + off, [value(lv["metrics"], k, s) or 0 for lv in run["levels"][:n]], 0.4, label=name)
        ax.set(title=label, xticks=xs, xticklabels=[lv["load"]["label"] for lv in a["levels"][:n]])
        ax.tick_params(axis="x", labelsize=6)
    axes[0].legend()
    fig.tight_layout()
    return fig
