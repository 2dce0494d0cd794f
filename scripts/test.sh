#!/usr/bin/env bash
# Run every kvmbox test: unit tests, and integration tests that boot real guests.
# Tests that need /dev/kvm skip with one loud line where it is absent; the count is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
skips=$(mktemp)
trap 'rm -f "$skips"' EXIT
export KVMBOX_SKIP_LOG="$skips"
status=0
cargo test --workspace --release --no-fail-fast "$@" || status=$?
# The software engine's own tests once more with every translated block compiled by its JIT from
# the first run (the run above uses the default: compiled after 16 runs), so both tiers of every
# engine test are tested.
KVMBOX_EMU_JIT=1 cargo test -p kvmbox-emu --release --no-fail-fast "$@" || status=$?
n=$(grep -c . "$skips" || true)
if [ "$n" -gt 0 ]; then
    echo "=================================================================="
    echo "SKIPPED: $n test(s) did not run here:"
    sed 's/^/  /' "$skips"
    echo "=================================================================="
else
    echo "skipped: 0 tests"
fi
exit $status
