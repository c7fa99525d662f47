#!/usr/bin/env bash
# The test command: set up .venv on a fresh machine (see setup_test_env.sh), then run pytest.
# Extra arguments go to pytest. COMFYUI_PATH=/path/to/ComfyUI tests against that host instead of the embedded one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export VENV
bash scripts/setup_test_env.sh
exec "$VENV/bin/python" -m pytest "$@"
