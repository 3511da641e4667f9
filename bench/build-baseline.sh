#!/usr/bin/env bash
# Builds ferry at another revision (default: main's parent of your change, or $1) into
# ~/.cache/ferry-baseline/<rev>/ferry, for `bench/run.py --baseline` to run beside this
# tree's build: a change's cost is read as a ratio within one run.
set -euo pipefail
rev=$(git rev-parse --short "${1:-HEAD~1}")
out="$HOME/.cache/ferry-baseline/$rev"
if [ -x "$out/ferry" ]; then echo "$out/ferry"; exit 0; fi
src=$(mktemp -d)
trap 'git worktree remove --force "$src" >/dev/null 2>&1 || true' EXIT
git worktree add --detach "$src" "$rev" >/dev/null
CARGO_TARGET_DIR="$HOME/.cache/ferry-baseline/target" cargo build --release -q -p ferry --manifest-path "$src/Cargo.toml"
mkdir -p "$out"
cp "$HOME/.cache/ferry-baseline/target/release/ferry" "$out/ferry"
echo "$out/ferry"
