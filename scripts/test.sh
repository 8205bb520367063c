#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the test suite. Extra arguments go to pytest:
#   scripts/test.sh tests/test_points.py -k roundtrip
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup.sh"
set -euo pipefail
cd "$root"
exec python -m pytest "${@:-tests}"
