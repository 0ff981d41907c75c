#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's "prometheus" package, only when either is missing.
# Idempotent: a second run does nothing. Used by tests/integration/test_prometheus.py under CI=true.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install.sh: prometheus is missing and this user is not root (no sudo either)" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install.sh: installing Debian's prometheus package (prometheus + promtool)" >&2
# the daemon is never started here: tests run their own instance with a generated config
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null && command -v promtool >/dev/null
