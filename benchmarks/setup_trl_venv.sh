#!/usr/bin/env bash
# TRL's own venv for benchmarks/compare.py: trl 1.12.0 (the last release that ships PPOTrainer)
# with every dependency pinned and the CPU build of torch. The pin list lives beside the TRL
# anchor in ../shared/bench-anchors (the versions its published numbers were measured with);
# this runs that script, so there is one list.
#   usage: bash benchmarks/setup_trl_venv.sh [VENV_DIR]     (default: $TRL_VENV or /tmp/trlppo)
set -euo pipefail
ANCHORS="${QUARTET_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}/bench-anchors"
if [[ ! -f "$ANCHORS/setup_trl_venv.sh" ]]; then
    echo "error: no TRL anchor at $ANCHORS (set QUARTET_SHARED to the folder holding bench-anchors/)" >&2
    exit 2
fi
exec bash "$ANCHORS/setup_trl_venv.sh" "$@"
