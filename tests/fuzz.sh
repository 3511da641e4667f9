#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer) of the parsers that take outside input:
# policy files and annotations, AdmissionReviews, a connection's first bytes, trace headers.
#   tests/fuzz.sh [seconds-per-target] [target ...]   # default 30 s, every target
# Each target starts from its seeds in tests/fuzz/corpus/<target>; what it finds goes to a
# temp dir, so a run leaves the clone clean. Fails if any target crashes, printing the input.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
shift || true
targets=("$@")
((${#targets[@]})) || targets=(policy admission detect trace_context)

export PATH="$HOME/.cargo/bin:$PATH"
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
# Its own target dir: the fuzz build (nightly, instrumented) shares nothing with the main one.
target_dir="$cache/ferry-fuzz-target"

if ! command -v cargo-fuzz >/dev/null; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

# AddressSanitizer needs nightly; without it, plain libFuzzer on stable still finds panics.
if rustup toolchain list 2>/dev/null | grep '^nightly' >/dev/null; then
  toolchain=(+nightly) sanitizer=address
else
  echo "tests/fuzz.sh: no nightly toolchain; fuzzing without AddressSanitizer" >&2
  toolchain=() sanitizer=none
fi
fuzz=(cargo "${toolchain[@]}" fuzz)
# The workspace's versions; cargo adds libFuzzer's crates (git ignores this lock file).
[[ tests/fuzz/Cargo.lock -nt Cargo.lock ]] || cp Cargo.lock tests/fuzz/Cargo.lock
opts=(--fuzz-dir tests/fuzz --target-dir "$target_dir" --sanitizer "$sanitizer")

work="$(mktemp -d)"
# cargo fuzz makes tests/fuzz/artifacts/<target> even when told to write elsewhere.
trap 'rm -rf "$work"; find tests/fuzz/artifacts -type d -empty -delete 2>/dev/null || true' EXIT

echo "== cargo fuzz build (${sanitizer} sanitizer)"
start=$SECONDS
if ! "${fuzz[@]}" build "${opts[@]}" >"$work/build.log" 2>&1; then
  cat "$work/build.log"
  exit 1
fi
echo "built in $((SECONDS - start))s"

failed=()
for t in "${targets[@]}"; do
  echo "== fuzz $t (${secs}s)"
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
  # New inputs go to the first corpus dir (the temp one); the seeds are only read.
  if ! "${fuzz[@]}" run "${opts[@]}" "$t" "$work/corpus/$t" "tests/fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/$t/" >"$work/$t.log" 2>&1; then
    failed+=("$t")
    tail -n 60 "$work/$t.log"
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$work/$t.log" || true
  echo "$t: $(find "$work/corpus/$t" -type f | wc -l) new corpus entries"
done

if ((${#failed[@]})); then
  for t in "${failed[@]}"; do
    for f in "$work/artifacts/$t"/*; do
      [[ -f "$f" ]] || continue
      echo "== $t crashed on this input; to reproduce:"
      echo "echo '$(base64 -w 0 "$f")' | base64 -d > crash"
      echo "${fuzz[*]} run ${opts[*]} $t crash"
    done
  done
  echo "tests/fuzz.sh: crashed: ${failed[*]}" >&2
  exit 1
fi
echo "tests/fuzz.sh: ${#targets[@]} targets, ${secs}s each, no crash"
