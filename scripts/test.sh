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
