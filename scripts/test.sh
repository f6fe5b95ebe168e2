#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The web page test drives Debian's Chromium (never a downloaded browser build). Install it when
# we can (root with apt), after setup.sh, which makes room first where the disk is short; otherwise
# that one test is skipped outside CI.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
[ -n "${VIRTUAL_ENV:-}" ] || source .venv/bin/activate
python -m pytest -q "$@"
