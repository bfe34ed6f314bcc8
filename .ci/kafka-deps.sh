#!/usr/bin/env bash
# What the Kafka sink and its tests need, installed only when missing (safe to run again).
#
# - Build: the rdkafka crate compiles librdkafka 2.12 from source (./configure + make) and
#   links OpenSSL and zlib from the system: a C toolchain with make, pkg-config, libssl-dev,
#   zlib1g-dev. (Debian's librdkafka-dev is 2.0.2, older than rdkafka 0.39 accepts.)
# - Tests: `tansu`, an Apache-Kafka-compatible broker, that each Kafka test starts on a free port.
set -euo pipefail

packages=(build-essential pkg-config libssl-dev zlib1g-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v tansu >/dev/null 2>&1; then
  echo "installing tansu (a Kafka-protocol broker for the tests; takes 15-25 minutes once)"
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
fi
echo "Kafka build and test dependencies present ($(command -v tansu))"
