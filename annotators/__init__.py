"""Condition-image annotators (edges, lines, pose, depth, ...) as plain torch/OpenCV functions, usable without ComfyUI."""
