"""Stability AI's own SD3.5 Large ControlNets (blur / canny / depth), in the layout of their release files, which
ComfyUI loads with `load_controlnet_sd35`.

How they differ from the diffusers-layout SD3 ControlNets (`sd3_control.py`):
- the blocks are plain DiT blocks (self-attention over image tokens only, no text stream), named like the reference
  MMDiT code (`attn.qkv`, `mlp.fc1`, `adaLN_modulation.1`);
- the latent's patch embedding (`x_embedder`) is *not* in the file: it is the base model's, adopted before sampling
  (`adopt_base_embedders`), and 2-D sin-cos positions are added to it instead of a stored grid;
- the pooled text vector is used (not zeroed), and the hint latent keeps the VAE's shift;
- the file stores its control type (0 blur, 1 canny, 2 depth), which decides how the condition image is prepared;
- one variant ("double y embedding": a square `y_embedder.mlp.0`) carries its own `x_embedder` and instead adopts the
  base's pooled-text embedder as `orig_y_embedder`; its blocks all read the same input tokens.

Outputs: one per block; ComfyUI repeats each `ceil(base_depth / blocks)` times in a row (`host_output_list`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ControlNetError
from ..layers import timestep_embedding
from .config import HEAD_DIM, TIME_FREQ_DIM
from .layers import PatchEmbed, _layer_norm, _modulate

CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}
VAE_SHIFT, VAE_SCALE = 0.0609, 1.5305  # the SD3 VAE's latent shift and scale; these ControlNets take both


@dataclass(frozen=True)
class SD35ControlNetConfig:
    """Architecture of a Stability SD3.5 ControlNet, read off its tensor shapes (`formats.sd35_keys`)."""

    hidden_size: int = 2432  # SD3.5 Large: 38 heads x 64
    num_layers: int = 19
    patch_size: int = 2
    in_channels: int = 16
    adm_in_channels: int = 2048  # pooled CLIP-L + CLIP-G
    mlp_hidden_dim: int = 4 * 2432
    double_y_emb: bool = False
    control_type: Optional[int] = None  # 0 blur, 1 canny, 2 depth; None when the file does not say

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "patch_size", "in_channels", "adm_in_channels", "mlp_hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ControlNetError(f"impossible SD35ControlNetConfig: {name} = {value!r} is not a positive integer.")
        if self.hidden_size % HEAD_DIM:
            raise ControlNetError(f"impossible SD35ControlNetConfig: hidden_size {self.hidden_size} is not a multiple of {HEAD_DIM}.")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def base_depth(self) -> int:
        """Depth of the SD3.5 model of this width (ComfyUI: width / 64; SD3.5 Large: 38)."""
        return self.hidden_size // HEAD_DIM

    @property
    def control_name(self) -> str:
        return CONTROL_TYPES.get(self.control_type, "unknown type" if self.control_type is not None else "untyped")

    @property
    def base_embedders(self) -> tuple[str, ...]:
        """The submodules adopted from the base model instead of read from the file."""
        return ("orig_y_embedder",) if self.double_y_emb else ("x_embedder",)

    def summary(self) -> str:
        return (f"Stability SD3.5 ControlNet ({self.control_name}): {self.num_layers} blocks of width {self.hidden_size} "
                f"({self.num_heads} heads), patch {self.patch_size}")


def sincos_positions(hidden: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """(rows * cols, hidden) 2-D sin-cos positions on a grid centred at 7.5 whose shorter side spans 0..15, as the
    reference adds them to these ControlNets' tokens; first half of the channels for columns, second for rows."""
    small = min(rows, cols)
    half_h, half_w = (rows / small) * 7.5, (cols / small) * 7.5  # this order of operations keeps the reference's rounding
    ys = torch.linspace(-half_h + 7.5, half_h + 7.5, rows, device=device)
    xs = torch.linspace(-half_w + 7.5, half_w + 7.5, cols, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        quarter = hidden // 4
        omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / (hidden / 4))
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_axis(grid_x), one_axis(grid_y)], dim=1)


def _two_layer(in_dim: int, out_dim: int, **kw) -> nn.Sequential:
    """Linear -> SiLU -> Linear, as `nn.Sequential` so the keys are `mlp.0` and `mlp.2` like the files'."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, **kw), nn.SiLU(), nn.Linear(out_dim, out_dim, **kw))


class _Embedder(nn.Module):
    """`t_embedder` / `y_embedder` / `orig_y_embedder`: a two-layer MLP under `mlp`."""

    def __init__(self, in_dim: int, out_dim: int, **kw):
        super().__init__()
        self.mlp = _two_layer(in_dim, out_dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class _Attention(nn.Module):
    def __init__(self, hidden: int, **kw):
        super().__init__()
        self.heads = hidden // HEAD_DIM
        self.qkv = nn.Linear(hidden, 3 * hidden, **kw)
        self.proj = nn.Linear(hidden, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class _Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int, **kw):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner, **kw)
        self.fc2 = nn.Linear(inner, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Self-attention and MLP, each pre-normed and adaLN-modulated (shift, scale, gate) by the conditioning vector."""

    def __init__(self, hidden: int, inner: int, **kw):
        super().__init__()
        self.attn = _Attention(hidden, **kw)
        self.mlp = _Mlp(hidden, inner, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden, **kw))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(_modulate(_layer_norm(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(_modulate(_layer_norm(x), shift_m, scale_m))


class SD35ControlNet(nn.Module):
    """`forward(x, hint_latent, timesteps, y)` -> one (B, T, hidden) output per block, unscaled."""

    def __init__(self, config: SD35ControlNetConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        c = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, c, cfg.patch_size, None, **kw)
        self.t_embedder = _Embedder(TIME_FREQ_DIM, c, **kw)
        if cfg.double_y_emb:
            self.orig_y_embedder = _Embedder(cfg.adm_in_channels, c, **kw)
            self.y_embedder = _Embedder(c, c, **kw)
        else:
            self.y_embedder = _Embedder(cfg.adm_in_channels, c, **kw)
        self.transformer_blocks = nn.ModuleList([DiTBlock(c, cfg.mlp_hidden_dim, **kw) for _ in range(cfg.num_layers)])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(c, c, **kw) for _ in range(cfg.num_layers)])
        self.pos_embed_input = PatchEmbed(cfg.in_channels, c, cfg.patch_size, None, **kw)
        self.adopted = False  # whether the base model's embedder is in place

    def adopt_base_embedders(self, base: Mapping[str, torch.Tensor]) -> None:
        """Take the base model's embedder (`x_embedder.proj.*`, or `y_embedder.mlp.*` for the double-y variant) from
        `base`, a state dict of the SD3.5 transformer in the reference naming (ComfyUI's `diffusion_model`)."""
        own, theirs = ("orig_y_embedder", "y_embedder") if self.config.double_y_emb else ("x_embedder", "x_embedder")
        target = getattr(self, own)
        wanted = {k: v for k, v in base.items() if k.startswith(theirs + ".")}
        expected = target.state_dict()
        got = {k[len(theirs) + 1:]: v for k, v in wanted.items() if k[len(theirs) + 1:] in expected}
        missing = [k for k in expected if k not in got]
        wrong = [f"{k} {list(v.shape)} vs {list(expected[k].shape)}" for k, v in got.items() if v.shape != expected[k].shape]
        if missing or wrong:
            raise ControlNetError(
                f"the base model's '{theirs}' does not fit this {self.config.summary()}: "
                f"{'missing ' + ', '.join(missing) if missing else ''}{'; ' if missing and wrong else ''}{', '.join(wrong)}. "
                "Use it with the SD3.5 model it was made for (SD3.5 Large).")
        with torch.no_grad():
            for k, v in got.items():
                expected[k].copy_(v.to(expected[k]))
        self.adopted = True

    def forward(self, x: torch.Tensor, hint_latent: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: the noisy latent (B, 16, H, W) as the base sees it; hint_latent: (B or 1, 16, H, W), the prepared condition
        image through the VAE, (latent - 0.0609) x 1.5305; timesteps: (B,) sigma x 1000; y: the pooled text (B, 2048)."""
        cfg = self.config
        if not self.adopted:
            raise ControlNetError(f"this {cfg.summary()} has not adopted the base model's {cfg.base_embedders[0]}; call "
                                  "adopt_base_embedders with the SD3.5 model's weights first.")
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ControlNetError(f"x has shape {list(x.shape)}; expected [B, {cfg.in_channels}, H, W] (an SD3 latent).")
        b, _, h, w = x.shape
        if hint_latent.ndim != 4 or hint_latent.shape[1] != cfg.in_channels or tuple(hint_latent.shape[-2:]) != (h, w) \
                or hint_latent.shape[0] not in (1, b):
            raise ControlNetError(f"hint_latent has shape {list(hint_latent.shape)}; expected [{b} or 1, {cfg.in_channels}, {h}, {w}] "
                                  "(the condition image through the VAE, at the latent's size).")
        if y is None or tuple(y.shape) != (b, cfg.adm_in_channels):
            raise ControlNetError(f"y has shape {None if y is None else list(y.shape)}; expected [{b}, {cfg.adm_in_channels}] "
                                  "(the pooled text vector of the SD3.5 text encoders).")
        tokens = self.x_embedder(x)
        if not cfg.double_y_emb:
            rows, cols = self.x_embedder.grid(h, w)
            tokens = tokens + sincos_positions(cfg.hidden_size, rows, cols, x.device).to(tokens.dtype)
        t = torch.as_tensor(timesteps, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(b)
        cond = self.t_embedder(timestep_embedding(t, TIME_FREQ_DIM).to(tokens.dtype))
        pooled = y.to(tokens.dtype)
        if cfg.double_y_emb:
            pooled = self.orig_y_embedder(pooled)
        cond = cond + self.y_embedder(pooled)
        tokens = tokens + self.pos_embed_input(hint_latent.to(tokens.dtype))
        outputs = []
        for block, out_proj in zip(self.transformer_blocks, self.controlnet_blocks):
            out = block(tokens, cond)
            if not cfg.double_y_emb:
                tokens = out
            outputs.append(out_proj(out))
        return tuple(outputs)


def host_output_list(outputs: tuple[torch.Tensor, ...], base_depth: int) -> list[torch.Tensor]:
    """ComfyUI's `control["output"]` for these ControlNets: each output repeated `ceil(base_depth / len(outputs))`
    times in a row (the same tensor object); the base reads the first `base_depth` entries."""
    repeat = math.ceil(base_depth / len(outputs))
    return [o for o in outputs for _ in range(repeat)]


def prepare_pixels(image: torch.Tensor, control_type: Optional[int]) -> torch.Tensor:
    """The condition image (B, 3, H, W) in 0..1 as these ControlNets were trained to see it before the VAE: depth
    inverted, canny scaled as the reference does (x 127.5 + 0.5), blur unchanged."""
    if control_type == 1:
        return image * 255 * 0.5 + 0.5
    if control_type == 2:
        return 1.0 - image
    return image


def hint_latent_from_vae(latent: torch.Tensor) -> torch.Tensor:
    """The VAE's raw encoding -> the hint these ControlNets take (the SD3 latent format, shift included)."""
    return (latent - VAE_SHIFT) * VAE_SCALE
