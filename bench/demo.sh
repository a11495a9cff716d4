#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded defaults, into $DEMO_DIR.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-$HOME/.cache/codejepa/demo}
mkdir -p "$DEMO_DIR"
echo "demo output: $DEMO_DIR"
