#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run few-shot generation with the built-in offline model on the
# bundled example images. Extra arguments go to `flamingo-vlm generate --demo` (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test >/dev/null
[ -n "${VIRTUAL_ENV:-}" ] || source .venv/bin/activate
flamingo-vlm generate --demo "$@"
