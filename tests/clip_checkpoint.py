"""A tiny SD1.5-shaped checkpoint *with* a text encoder, for nodes that need CLIP (the Train ControlNet node).

The host's tiny checkpoint has no CLIP (tests feed conditioning through a test node). The SD15 model type fixes
the text encoder's size, so this adds a full-size random CLIP-L, built from ComfyUI's own SD1 CLIP class and
stored under the real checkpoint's key names (`cond_stage_model.transformer.text_model.*`).
"""
from __future__ import annotations

import contextlib

import torch
from factories import randomize_, save
from safetensors.torch import load_file

NAME = "tiny_sd15_with_clip.safetensors"


def tiny_checkpoint_with_clip(host, seed: int = 5) -> str:
    """Writes it next to the host's tiny checkpoint (once per host); returns its file name."""
    import comfy.sd1_clip

    path = host.dirs["checkpoints"] / NAME
    if not path.exists():
        sd = load_file(host.dirs["checkpoints"] / host.checkpoint)
        with torch.no_grad():  # ComfyUI a28a9dc's CLIP fills its projection in place at construction
            clip = randomize_(comfy.sd1_clip.SDClipModel(), seed=seed)
        sd.update({"cond_stage_model." + k: v.half() for k, v in clip.state_dict().items() if k.startswith("transformer.text_model.")})
        save(path, sd)
    return NAME


@contextlib.contextmanager
def fp32_text_encoder():
    """ComfyUI keeps text encoders in fp16 even on the CPU, where fp16 matmuls are many times slower than
    fp32: its own --fp32-text-enc flag while the block runs."""
    from comfy.cli_args import args

    before = args.fp32_text_enc
    args.fp32_text_enc = True
    try:
        yield
    finally:
        args.fp32_text_enc = before
