#!/usr/bin/env bash
# Seconds a step of `molmo train --preset demo-gpu`, alone on the GPU, with the packed
# sequences' attention through the Triton kernel and through the PyTorch reference (SDPA with
# the annotation mask), fp32 as the preset trains. Each run trains for 45 s; the rate is read
# from the log rows after step 100 (past the warmup and Triton's compiles).
#
#   OUT=/some/dir bash experiments/gpu_demo_step.sh     # writes OUT/gpu_demo_step_<gpu>.json/.csv
set -u
OUT=${OUT:-experiments/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
for backend in triton torch; do
  MOLMO_KERNELS_BACKEND=$backend timeout 80 $PY -m molmo_cli train --preset demo-gpu \
    --set run.out_dir="runs/step-$backend" --set run.time_limit_s=45 --set run.export_dir=null \
    --set run.progress=false --set run.log_every=20 --set run.save_every=0 ${EXTRA:-} 2>&1 | tail -2
done
$PY - "$OUT" <<'PY'
import os, sys
from pathlib import Path
import torch
from benchmarks.report import write_results
from experiments.compare_runs import read_log
rows = []
for backend in ("triton", "torch"):
    log = Path(f"runs/step-{backend}/log.jsonl")
    if not log.exists():
        rows.append({"backend": backend, "failed": "no log"})
        continue
    logged = read_log(log)
    late = [logged[s] for s in sorted(logged) if s > int(os.environ.get("SKIP", 100))]
    first, last = late[0], late[-1]
    secs = last["elapsed_s"] - first["elapsed_s"]
    rows.append({"backend": backend, "steps": last["step"],
                 "s_per_step_after_100": round(secs / max(last["step"] - first["step"], 1), 4),
                 "images_per_s": round(sum(r["images_per_s"] for r in late[1:]) / max(len(late) - 1, 1), 1)})
gpu = torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu"
write_results(f"gpu_demo_step_{gpu}", rows, meta={"preset": "demo-gpu", "baseline": "torch"}, out_dir=sys.argv[1])
PY
