#!/usr/bin/env bash
# Installs the Debian packages the build and the tests need, when missing (as root, with
# apt-get; otherwise says what is missing). Run by tests/run.sh and, before it builds
# anything, by .ci/run.
set -euo pipefail

# Debian packages: iptables, iproute2 and setpriv for the network-namespace tests and
# `ferry init`; dnsmasq for DNS discovery; curl and openssl for scripts and certificates;
# promtool (package prometheus) checks the Grafana dashboard's rules and ferry's /metrics;
# make and a C compiler build jemalloc, ferry's allocator.
missing=()
for pair in make:make cc:gcc iptables:iptables ip:iproute2 setpriv:util-linux curl:curl openssl:openssl dnsmasq:dnsmasq-base promtool:prometheus; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "== installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "$0: missing Debian packages: ${missing[*]} (sudo apt-get install ${missing[*]}); the tests that need them will fail" >&2
  fi
fi

