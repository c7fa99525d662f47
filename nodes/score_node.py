"""ControlNet Score (Suite): how well generated images follow their hint, by the ControlNet++ metrics.

Thin: `annotators.scoring.score` does the work; this node hands it the annotator run of the annotator nodes
(`annotator_nodes.run_annotator`: ComfyUI's memory manager loads the network, its progress bar moves while the batch is
annotated) and a second progress bar for the comparison.

Why the per-image scores are a list output (OUTPUT_IS_LIST): ComfyUI then runs a connected node once per score, so a
"Preview Any" / "Preview as Text" node shows every image's score and a FLOAT input takes them one by one; the mean is
a single FLOAT for the whole batch.
"""
from __future__ import annotations

import comfy.utils
import torch

from ..annotators import scoring
from .annotator_nodes import PRECISION_OPTS, PRECISIONS, run_annotator

CATEGORY = "conditioning/controlnet"


def _annotate_with_host(precision: str):
    """scoring.Annotate through the annotator nodes' path (IMAGE layout, ComfyUI's device and memory manager)."""

    def annotate(key: str, images: torch.Tensor, resolution: int, params: dict):
        maps, keypoints = run_annotator(key, images.movedim(1, -1), resolution, False, precision=precision, **params)
        return maps.movedim(-1, 1), keypoints

    return annotate


class ControlNetSuiteScore:
    DESCRIPTION = ("Controllability: re-annotates the generated images with the annotator that made the hint and compares "
                   "the result with the hint, with the ControlNet++ metrics: F1 for Canny edges, SSIM for soft edges and "
                   "line art, RMSE (0..255, lower is better) for depth, mIoU of the ADE20K classes for segmentation, PCK of "
                   "the body keypoints for OpenPose, IoU for the toy world. Returns one score per image, their mean, and an "
                   "error map (white where the maps disagree).")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    RETURN_TYPES = ("FLOAT", "FLOAT", "IMAGE")
    RETURN_NAMES = ("scores", "mean", "error_map")
    OUTPUT_IS_LIST = (True, False, False)
    OUTPUT_TOOLTIPS = ("One score per generated image, as a list (a connected node runs once per score).",
                       "The mean score of the batch.",
                       "Where the re-annotated map and the hint disagree, at the hint's size: 0 (black) = agree, 1 (white) = differ.")

    @classmethod
    def INPUT_TYPES(cls):
        keys = scoring.available()
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The generated images (a batch). They are resized to the hint's size and annotated."}),
                "hint": ("IMAGE", {"tooltip": "The condition the images were generated from: one for the whole batch, or one per image."}),
                "annotator": (keys, {"default": "canny" if "canny" in keys else keys[0],
                                     "tooltip": "The annotator that made the hint; it also picks the metric. " + "; ".join(
                                         f"{k}: {scoring.SCORERS[k].description}" for k in keys) + "."}),
            },
            "optional": {
                "keypoints": ("POSE_KEYPOINT", {"tooltip": "openpose only, and needed there: the keypoints output of the OpenPose (Suite) "
                                                           "node that drew the hint (a drawn skeleton cannot be read back)."}),
                "edge_threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "canny only: a pixel above this is an edge, in both maps (undoes resampling blur)."}),
                "canny_low_threshold": ("INT", {"default": 100, "min": 1, "max": 255, "step": 1,
                                                "tooltip": "canny only: the low threshold the hint was made with; the images are re-annotated with it."}),
                "canny_high_threshold": ("INT", {"default": 200, "min": 1, "max": 255, "step": 1,
                                                 "tooltip": "canny only: the high threshold the hint was made with."}),
                "pck_alpha": ("FLOAT", {"default": 0.1, "min": 0.01, "max": 1.0, "step": 0.01,
                                        "tooltip": "openpose only: a keypoint is correct within this share of the person's size "
                                                   "(the longer side of the box around the hint's keypoints)."}),
                "precision": (list(PRECISIONS), PRECISION_OPTS),
            },
        }

    def score(self, images, hint, annotator, keypoints=None, edge_threshold=0.5, canny_low_threshold=100, canny_high_threshold=200,
              pck_alpha=0.1, precision="fp32"):
        params = {"low_threshold": canny_low_threshold, "high_threshold": canny_high_threshold} if annotator == "canny" else {}
        bar = comfy.utils.ProgressBar(images.shape[0])
        result = scoring.score(annotator, images.movedim(-1, 1), hint.movedim(-1, 1), annotate=_annotate_with_host(precision),
                               annotator_params=params, hint_keypoints=keypoints, progress=bar.update,
                               edge_threshold=edge_threshold, pck_alpha=pck_alpha)
        error_map = result.error_maps[..., None].expand(-1, -1, -1, 3).contiguous()
        return ([float(s) for s in result.scores], result.mean, error_map)
