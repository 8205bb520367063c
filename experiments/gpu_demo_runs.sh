#!/usr/bin/env bash
# Two demo trainings side by side on one lent GPU, then the kernels' check, in one device call.
#
#   OUT=/some/dir bash experiments/gpu_demo_runs.sh     # OUT defaults to the ignored runs/gpu_demo
#
# A: `molmo train --preset demo-gpu` as documented (16 images a step, the Triton
#    annotation-attention kernel, 8 loader processes).
# B: the same preset at the CPU demo's 8 images a step, with the kernels forced to their PyTorch
#    references (MOLMO_KERNELS_BACKEND=torch): a second model should A go wrong, and a run whose
#    attention does not go through our kernel.
# The two runs share the GPU (each keeps its own 450 s limit; OUT/gpu_utilization.txt samples
# how busy it is). Each run's served model, log and loss curve come back as
# OUT/<run>_model.tar.gz, its last resumable state as OUT/<run>_state.pt. Then
# `benchmarks/kernel_ops.py --check` runs, cut at 60 s (on an H100 that ended its timings
# before their JSON/CSV: benchmarks/results/kernel_ops_check_NVIDIA_H100_80GB_HBM3.txt is its output).
# Runs from a checkout with no install (PYTHONPATH), on the machine's own python3 and torch.
set -u
OUT=${OUT:-runs/gpu_demo}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  nvidia-smi -L
  $PY -c "import torch, triton, tokenizers; print('torch', torch.__version__, 'triton', triton.__version__, 'tokenizers', tokenizers.__version__, torch.cuda.get_device_name(0))"
  nproc
} 2>&1 | tee "$OUT/env.txt"

# EXTRA: more --set overrides for both runs, e.g. a dry run on the CPU:
#   EXTRA="--set run.device=cpu --set run.time_limit_s=20" bash experiments/gpu_demo_runs.sh
# shellcheck disable=SC2206
common=(--set run.progress=false --set run.export_dir=null --set run.threads=1 ${EXTRA:-})
$PY -m molmo_cli train --preset demo-gpu --set run.out_dir=runs/gpu-A --set data.num_workers=8 \
  "${common[@]}" >runs_A.out 2>&1 &
a=$!
MOLMO_KERNELS_BACKEND=torch $PY -m molmo_cli train --preset demo-gpu --set run.out_dir=runs/gpu-B \
  --set data.batch_size=8 --set data.num_workers=5 "${common[@]}" >runs_B.out 2>&1 &
b=$!
# How busy the GPU is with both runs on it (one sample a minute, from the second minute on).
(for i in 1 2 3 4 5 6; do sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done \
  >"$OUT/gpu_utilization.txt" 2>&1) &
wait $a; echo "run A exit $?"
wait $b; echo "run B exit $?"

for r in A B; do
  dir=runs/gpu-$r
  mkdir -p "$dir" && mv "runs_$r.out" "$dir/"
  last=$(ls -d "$dir"/checkpoints/step-* 2>/dev/null | tail -1)
  if [ ! -d "$dir/model" ] && [ -n "$last" ]; then  # a crashed run: its last checkpoint, served files only
    mkdir -p "$dir/model" && cp "$last"/*.json "$last"/*.safetensors "$dir/model/"
  fi
  cmp -s "$dir/model/tokenizer.json" models/molmo-demo/tokenizer.json && echo "$r: tokenizer as committed" \
    || echo "$r: tokenizer differs from the committed one"
  tail -4 "$dir/runs_$r.out"
  tar -czf "$OUT/${r}_model.tar.gz" -C "$dir" model log.jsonl train_config.json "runs_$r.out" 2>/dev/null
  [ -n "$last" ] && cp "$last/training_state.pt" "$OUT/${r}_state.pt"
done
ls -la "$OUT"
timeout 60 $PY benchmarks/kernel_ops.py --check --dtypes fp32,bf16,fp16 --out-dir "$OUT" 2>&1 | tail -40
echo done
