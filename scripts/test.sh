#!/usr/bin/env bash
# The test command: set up .venv on a fresh machine (see setup_test_env.sh), then run pytest.
# Extra arguments go to pytest. COMFYUI_PATH=/path/to/ComfyUI tests against that host instead of the embedded one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export VENV
bash scripts/setup_test_env.sh
# The linter first (pyproject.toml [tool.ruff]: pyflakes, import order, bugbear, the Comfy Registry's security rules):
# a finding fails the run before any test. CNS_NO_LINT=1 skips it while iterating on one test.
if [ "${CNS_NO_LINT:-0}" != 1 ]; then
  "$VENV/bin/ruff" check . || { echo "ruff found problems (above); fix them, or run 'ruff check --fix .' for the fixable ones" >&2; exit 1; }
fi
exec "$VENV/bin/python" -m pytest "$@"
