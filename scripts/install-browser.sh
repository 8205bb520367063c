#!/usr/bin/env bash
# Installs Debian's Chromium and its chromedriver, which tests/test_playground.py drives, when
# they are missing (about a minute: ~120 MB of packages). Needs root and apt-get; says why and
# exits 1 when it cannot. No browser is downloaded from anywhere but Debian's registry.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt-get here: install Chromium and its chromedriver by hand" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "not root: run 'sudo apt-get install chromium chromium-driver'" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
wait_lock=(-o DPkg::Lock::Timeout=300)  # another apt run (a parallel test) finishes first
apt-get "${wait_lock[@]}" update -q
apt-get "${wait_lock[@]}" install -y -q chromium chromium-driver
