#!/usr/bin/env bash
# Installs what the observability checks need: Debian's `prometheus` package, which ships both
# `promtool` (rule checks and rule unit tests) and the Prometheus server (the test that evaluates
# the dashboard and alert queries against a real Prometheus). Idempotent: does nothing when both
# binaries are already on PATH.
#
# The package's own service must not interfere: the install runs with a policy-rc.d that forbids
# starting services, and the unit is disabled and stopped afterwards. The tests start their own
# Prometheus on a free port and never depend on :9090.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "promtool and prometheus already installed: $(promtool --version 2>&1 | head -n1)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
  # Exit code 101 = "action forbidden": dpkg's maintainer scripts will not start the service.
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  added_policy=1
fi
cleanup() { if [ "$added_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null

# Belt and braces: whatever started anyway is stopped and kept from starting again.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/prometheus ]; then
  $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi

echo "installed: $(promtool --version 2>&1 | head -n1)"
