#!/usr/bin/env bash
# What the Kafka sink and its tests need, installed only when missing (safe to run again).
#
#   .ci/kafka-deps.sh            both parts below
#   .ci/kafka-deps.sh packages   only the build dependencies (quick: apt)
#   .ci/kafka-deps.sh tansu      only the test broker (slow: 15-25 minutes of compiling, once)
#
# - Build: the rdkafka crate compiles librdkafka 2.12 from source (./configure + make) and
#   links OpenSSL and zlib from the system: a C toolchain with make, pkg-config, libssl-dev,
#   zlib1g-dev. (Debian's librdkafka-dev is 2.0.2, older than rdkafka 0.39 accepts.)
# - Tests: `tansu`, an Apache-Kafka-compatible broker, that each Kafka test starts on a free port.
#   scripts/test starts this part in the background while the workspace builds.
set -euo pipefail
part="${1:-all}"
case "$part" in
  all | packages | tansu) ;;
  *) echo "usage: $0 [all|packages|tansu]" >&2; exit 2 ;;
esac

if [ "$part" != tansu ]; then
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
  echo "Kafka build dependencies present"
fi

if [ "$part" != packages ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! command -v tansu >/dev/null 2>&1; then
    echo "installing tansu (a Kafka-protocol broker for the tests; takes 15-25 minutes once)"
    cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
  fi
  echo "tansu present ($(command -v tansu))"
fi
