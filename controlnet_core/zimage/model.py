"""The Z-Image Fun ControlNet (alibaba-pai, "Z-Image-Turbo-Fun-Controlnet-Union" 1 / 2.0 / 2.1) as a model patch.

Representation (why per-block functions): this ControlNet has no embedder, timestep MLP, rotary table or text encoder
of its own. Its control layers attend over the *base's* tokens: the first adds `before_proj(hint)` to the tokens
entering the base's main blocks, every one is a Z-Image block modulated by the base's timestep embedding and rotated
by the base's rotary table, and (in diffusers' reference) the control state carries the base's refined caption
features. So it can only run inside the base's forward, and `controlnet_core` never imports the base: the host adapter
hands over those pieces from its block hooks and adds what comes back. `ZImageFunControlNet.start` opens one forward's
`ZImageControlSteps`; the adapter calls `after_refiner_block(i, ...)` from the base's noise-refiner hook and
`after_base_block(k, ...)` from its main-block hook, and adds a returned tensor (scaled by its strength) to the base's
tokens *after* that block. The low-level pieces (`embed_hint`, `refine_hint`, `refiner_output`, `layer_output`) are
public too.

Note: every control layer takes the same base tokens, those entering the base's first main block (or, for the
refiner-control layers, those entering its noise refiner), never the ones after block k: both references do so. The
outputs therefore depend only on the base's inputs, which is why a host may also compute them ahead of its blocks.

Which base block gets what (base of 30 main blocks, 2 noise-refiner blocks; `ZImageFunConfig.layer_places`):
- version 1 (6 control layers, 16-channel hint): control layer j -> after main block 5 j (0, 5, ..., 25). Its two
  `control_noise_refiner` blocks are plain blocks that refine the hint tokens (over the image tokens, with the image
  part of the rotary table) before control layer 0; nothing goes to the base's noise refiner.
- versions 2.x (15 control layers, 33-channel hint): control layer j -> after main block 2 j (0, 2, ..., 28); refiner
  control layer i -> after noise-refiner block i (0, 1), computed over the image tokens entering the noise refiner;
  the control state then continues into control layer 0 (whose `before_proj` adds the main blocks' input again).
  The published 2.0 file's refiner `after_proj` weights are all zeros: its refiner outputs come from the control
  layers instead (ComfyUI's `broken` workaround): refiner block 0 gets control layer 0's output, refiner block 1
  control layer 1's, after which layers 2..14 also run, and their final state is what the main chain starts from.

Caption tokens: diffusers (as alibaba-pai's VideoX-Fun code) runs the main control layers over [image tokens, caption
features] and adds the outputs to both; ComfyUI 0.8.0 runs them over the image tokens only and adds to those. Both are
the same functions here: pass `caption` to `after_base_block` for the first, leave it out for the second.

Hint layout (B, C, H, W) at the latent size: version 1 C = 16: the control image's latent in the base's latent space
(Flux VAE: (latent - 0.1159) * 0.3611). Versions 2.x C = 33: that control latent, then 1 keep-mask channel (1 = keep,
0 = repaint; nearest-downscaled), then the 16-channel latent of the image to inpaint with the repaint region greyed out.
Without inpainting, diffusers fills the 17 extra channels with zeros; ComfyUI uses mask 0 and a grey image's latent.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ControlNetError
from ..precision import compute_dtype_of
from .blocks import ControlBlock, TransformerBlock, rope_cos_sin
from .config import BASE_BLOCKS, EMBEDDER_KEY, PATCH, REFINER_FROM_CONTROL_LAYERS, ZImageFunConfig


def _rope(rope: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The table cut to the control state's length (ComfyUI hands the table of all the image tokens, padding included)."""
    cos, sin = rope_cos_sin(rope)
    if cos.shape[1] < tokens:
        raise ControlNetError(f"the rotary table covers {cos.shape[1]} tokens; the control state has {tokens}.")
    return cos[:, :tokens], sin[:, :tokens]


def patchify(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4 C), features ordered (row in patch, column in patch, channel) as Z-Image's
    embedder reads them. Odd sizes are padded circularly first, as ComfyUI pads the base's latent."""
    b, c, h, w = latent.shape
    pad_h, pad_w = (-h) % PATCH, (-w) % PATCH
    if pad_h or pad_w:
        latent = F.pad(latent, (0, pad_w, 0, pad_h), mode="circular")
    rows, cols = (h + pad_h) // PATCH, (w + pad_w) // PATCH
    x = latent.reshape(b, c, rows, PATCH, cols, PATCH).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, rows * cols, PATCH * PATCH * c)


class ZImageFunControlNet(nn.Module):
    """Built like the published file: `control_all_x_embedder.2-1`, `control_layers.{j}`, `control_noise_refiner.{i}`."""

    def __init__(self, config: ZImageFunConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, device=device)
        sizes = (config.dim, config.head_dim, config.ffn_dim, config.adaln_dim)
        self.control_layers = nn.ModuleList([ControlBlock(*sizes, first=j == 0, **kw) for j in range(config.num_control_layers)])
        self.control_all_x_embedder = nn.ModuleDict({EMBEDDER_KEY: nn.Linear(PATCH * PATCH * config.hint_channels, config.dim, **kw)})
        if config.refiner_control:
            refiner = [ControlBlock(*sizes, first=i == 0, **kw) for i in range(config.num_refiner_layers)]
        else:
            refiner = [TransformerBlock(*sizes, **kw) for _ in range(config.num_refiner_layers)]
        self.control_noise_refiner = nn.ModuleList(refiner)

    # --- the pieces -------------------------------------------------------------------------------------------------

    def embed_hint(self, hint_latent: torch.Tensor, pad_token: Optional[torch.Tensor] = None, multiple: int = 1) -> torch.Tensor:
        """(B, hint_channels, H, W) hint -> (B, T, dim) hint tokens, the control state's start.

        A base that pads its image tokens to a multiple (Z-Image: 32, with its `x_pad_token`) and runs the control
        layers over the padding too (diffusers) passes that token and multiple, so both sequences line up."""
        cfg = self.config
        if hint_latent.ndim == 5 and hint_latent.shape[2] == 1:  # (B, C, 1, H, W): one frame
            hint_latent = hint_latent[:, :, 0]
        if hint_latent.ndim != 4 or hint_latent.shape[1] != cfg.hint_channels:
            raise ControlNetError(f"the hint has shape {list(hint_latent.shape)}; this {cfg.summary()} takes [B, {cfg.hint_channels}, H, W].")
        tokens = self.control_all_x_embedder[EMBEDDER_KEY](patchify(hint_latent.to(compute_dtype_of(self) or hint_latent.dtype)))
        pad = (-tokens.shape[1]) % max(1, multiple)
        if pad:
            if pad_token is None:
                raise ControlNetError(f"padding {tokens.shape[1]} hint tokens to a multiple of {multiple} needs the base's pad token.")
            tokens = torch.cat([tokens, pad_token.to(tokens).reshape(1, 1, -1).expand(tokens.shape[0], pad, -1)], dim=1)
        return tokens

    def refine_hint(self, c: torch.Tensor, adaln: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Version 1: the two plain `control_noise_refiner` blocks over the hint tokens (image rotary table); 2.x: as is."""
        if self.config.refiner_control:
            return c
        r = _rope(rope, c.shape[1])
        for block in self.control_noise_refiner:
            c = block(c, adaln, r, mask)
        return c

    def refiner_output(self, index: int, c: torch.Tensor, x: torch.Tensor, adaln: torch.Tensor, rope: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Versions 2.x, after the base's noise-refiner block `index`, in order: (output to add to the image tokens,
        new control state). `x`: the image tokens entering the base's noise refiner. Version 1: (None, c)."""
        cfg = self.config
        if not cfg.refiner_control:
            return None, c
        if not 0 <= index < cfg.num_refiner_layers:
            raise ControlNetError(f"noise-refiner block {index} is outside this {cfg.summary()}.")
        r = _rope(rope, c.shape[1])
        if cfg.refiner_source != REFINER_FROM_CONTROL_LAYERS:
            return self.control_noise_refiner[index](c, x, adaln, r, mask)
        last = index == cfg.num_refiner_layers - 1
        out, c = self.control_layers[index](c, x, adaln, r, mask)
        for layer in self.control_layers[index + 1:] if last else ():
            c = layer(c, x, adaln, r, mask)[1]
        return out, c

    def layer_output(self, index: int, c: torch.Tensor, x: torch.Tensor, adaln: torch.Tensor, rope: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Control layer `index` on state `c` with the tokens `x` entering the base's first main block: (output, state)."""
        if not 0 <= index < self.config.num_control_layers:
            raise ControlNetError(f"control layer {index} is outside this {self.config.summary()}.")
        return self.control_layers[index](c, x, adaln, _rope(rope, c.shape[1]), mask)

    def start(self, hint_tokens: torch.Tensor, adaln: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor] = None,
              base_blocks: int = BASE_BLOCKS) -> "ZImageControlSteps":
        """One base forward's control run, from `embed_hint`'s tokens, the base's timestep embedding `adaln`
        (B, adaln_dim) and its rotary table for the image tokens `rope` (see `blocks.rope_cos_sin`)."""
        if adaln.ndim != 2 or adaln.shape[-1] != self.config.adaln_dim:
            raise ControlNetError(f"the timestep embedding has shape {list(adaln.shape)}; this {self.config.summary()} takes "
                                  f"[B, {self.config.adaln_dim}] (the base's t_embedder output).")
        return ZImageControlSteps(self, hint_tokens, adaln, rope, mask, base_blocks)


class ZImageControlSteps:
    """The control state through one base forward; call the hooks in the base's block order."""

    def __init__(self, net: ZImageFunControlNet, hint_tokens: torch.Tensor, adaln: torch.Tensor, rope: torch.Tensor,
                 mask: Optional[torch.Tensor], base_blocks: int):
        self.net, self.c, self.adaln, self.rope, self.mask = net, hint_tokens, adaln, rope, mask
        self.places = net.config.layer_places(base_blocks)
        self._refiner_done = 0  # noise-refiner blocks seen
        self._next_layer: Optional[int] = None  # None until the main blocks start

    def after_refiner_block(self, index: int, x_input: torch.Tensor) -> Optional[torch.Tensor]:
        """What to add to the image tokens after the base's noise-refiner block `index` (None: nothing).
        `x_input`: the image tokens as they *entered* the noise refiner (the same for every refiner block)."""
        if self._next_layer is not None or index != self._refiner_done:
            raise ControlNetError(f"noise-refiner block {index} came out of order (expected block {self._refiner_done}, before the main blocks).")
        self._refiner_done += 1
        if not self.net.config.refiner_control:
            return None
        out, self.c = self.net.refiner_output(index, self.c, self._fit(x_input), self.adaln, self.rope, self.mask)
        return out

    def after_base_block(self, block: int, x_input: torch.Tensor, rope: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None, caption: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """What to add to the tokens after the base's main block `block` (None: nothing).

        `x_input`: the tokens as they *entered* the first main block (the same for every block). Without `caption`
        (ComfyUI) they are the image tokens and `rope` / `mask` default to the image ones given to `start`. With
        `caption` (diffusers): the refined caption features (B, L, dim), joined after the control state's image
        tokens at the first main block; `x_input`, `rope` and `mask` then cover [image tokens, caption]."""
        cfg = self.net.config
        if self._next_layer is None:
            if cfg.refiner_control and self._refiner_done != cfg.num_refiner_layers:
                raise ControlNetError(f"this {cfg.summary()} needs the base's {cfg.num_refiner_layers} noise-refiner hooks "
                                      f"before its main blocks; {self._refiner_done} were called.")
            self.c = self.net.refine_hint(self.c, self.adaln, self.rope, self.mask)
            if caption is not None:
                self.c = torch.cat([self.c, caption.to(self.c.dtype)], dim=1)
            self._next_layer = 0
        if block not in self.places:
            return None
        target = self.places.index(block)
        if target < self._next_layer:
            raise ControlNetError(f"base block {block} came out of order (control layer {target} has already run).")
        x = x_input if caption is not None else self._fit(x_input)
        rope = self.rope if rope is None else rope
        mask = self.mask if mask is None and caption is None else mask
        while self._next_layer <= target:
            out, self.c = self.net.layer_output(self._next_layer, self.c, x, self.adaln, rope, mask)
            self._next_layer += 1
        return out

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """The base's image tokens, cut to the control state's length (ComfyUI: the base may pad more than the hint)."""
        if x.ndim != 3 or x.shape[-1] != self.c.shape[-1] or x.shape[1] < self.c.shape[1]:
            raise ControlNetError(f"base tokens {list(x.shape)} do not fit the control state {list(self.c.shape)}.")
        return x[:, :self.c.shape[1]]
