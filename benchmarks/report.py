"""The one results writer of benchmarks/ and experiments/, and the machine it records.

Every script writes its numbers through `write_results`: NAME.json holds the script's
settings and summary (`meta`), the machine that produced the numbers and the rows; NAME.csv
holds the same rows, one a line, nested values flattened to dotted columns, plus a `machine`
column; NAME.png is written when the script hands over a matplotlib figure. Numbers compare
only between rows of the same machine and run, which is why the machine goes into each file.

    from benchmarks.report import describe_machine, write_results
    write_results("preprocess", rows, meta={"baseline": "naive PIL (baseline)"})
    # -> benchmarks/results/preprocess.json and .csv

Result files stay summaries: a script that could write a line per answer or per request
does so only behind a flag of its own.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
EXPERIMENT_RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def describe_machine(with_vllm: bool = False) -> dict[str, object]:
    """CPU, core count, load average (other jobs on a shared machine), GPU, and versions."""
    import torch

    from molmo_bench.report import describe_client_machine

    info: dict[str, object] = {
        **describe_client_machine(),  # platform, CPU, cores, load average, Python
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    if with_vllm:
        import vllm

        info["vllm"] = vllm.__version__
    return info


def machine_label(machine: dict[str, Any]) -> str:
    """One line for a CSV column: 'CPU model xN' and the GPU, if any."""
    label = f"{machine.get('cpu', '?')} x{machine.get('cpu_count', '?')}"
    return label + (f" + {machine['gpu']}" if machine.get("gpu") else "")


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'causes': {'right': 3}} -> {'causes.right': 3}; lists become JSON text."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    *,
    meta: dict[str, Any] | None = None,
    out_dir: Path | str = RESULTS,
    machine: dict[str, Any] | None = None,
    figure: Any = None,
) -> Path:
    """Writes OUT_DIR/NAME.json ({"benchmark": NAME, **meta, "machine", "rows"}), NAME.csv
    (when there are rows) and NAME.png (when `figure` is given); returns the JSON's path.

    `machine` defaults to `describe_machine()`; pass your own when it must name vLLM or was
    taken before the run (the load average at the start).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = describe_machine() if machine is None else machine
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, **(meta or {}), "machine": machine, "rows": rows}, indent=2) + "\n")
    if rows:
        flat = [flatten(r) | {"machine": machine_label(machine)} for r in rows]
        columns = list(dict.fromkeys(k for r in flat for k in r))  # first-seen order, rows may differ
        with (out_dir / f"{name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)
    if figure is not None:
        figure.savefig(out_dir / f"{name}.png", dpi=110)
    print(f"wrote {path}" + (" and .csv" if rows else "") + (" and .png" if figure is not None else ""))
    return path
