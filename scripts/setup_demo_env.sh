#!/usr/bin/env bash
# The toy demo's set-up on a fresh machine: .venv with torch and this project's run-time requirements, plus
# matplotlib and psutil for the experiments' plots and memory numbers. Nothing else (no ComfyUI, no test oracles),
# so it takes a couple of minutes. An existing test environment (setup_test_env.sh) already has all of it and is
# reused as it is. Idempotent: a finished set-up leaves a stamp and is not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TEST_STAMP="$VENV/.setup-done-v1"
STAMP="$VENV/.demo-setup-done-v1"
if [ -f "$TEST_STAMP" ] && [ "$TEST_STAMP" -nt requirements.txt ]; then
  exit 0  # the test environment is a superset of this one
fi
if [ -f "$STAMP" ] && [ "$STAMP" -nt requirements.txt ] && [ "$STAMP" -nt scripts/setup_demo_env.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# the version the test environment pins (torchvision is not needed here)
$PIP install -q torch==2.14.1
$PIP install -q -r requirements.txt
$PIP install -q matplotlib psutil
touch "$STAMP"
