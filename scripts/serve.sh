#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and serves the default model on 127.0.0.1:8000.
# Extra arguments go to `molmo serve` (see `molmo serve --help`):
#   scripts/serve.sh --port 9000 --api-key secret
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup.sh"
set -euo pipefail
cd "$root"
exec molmo serve "$@"
