#!/usr/bin/env bash
# The main job: install what is needed, build kvmbox, prepare the default guest and boot it
# with its console on this terminal (Ctrl-A x quits). Extra arguments go to `kvmbox run`,
# e.g. `./scripts/run-default.sh --cpus 2 --accel kvm`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet -p kvmbox
guest=$(bash guest/testguest/build.sh | tail -n 1)
exec target/release/kvmbox run --kernel "$guest" --memory 256M --cmdline "tests=shell" "$@"
