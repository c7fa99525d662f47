"""Condition-image annotators (edges, lines, pose, depth, segmentation...) as plain torch/OpenCV code.

Usable without ComfyUI: `from annotators import registry; registry.load("canny")(images)`.
"""
from .base import Annotator, AnnotatorError, as_rgb
from .registry import ANNOTATORS, AnnotatorInfo, Param, load, load_all, register

__all__ = ["Annotator", "AnnotatorError", "as_rgb", "ANNOTATORS", "AnnotatorInfo", "Param", "load", "load_all", "register"]
