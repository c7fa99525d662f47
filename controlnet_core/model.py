"""The ControlNet network of the ldm UNet family (SD1.x, SD2.x, SDXL), structured like its checkpoints.

Paper: Zhang, Rao, Agrawala 2023, https://arxiv.org/abs/2302.05543. The trainable copy of the
UNet encoder and middle block sees ``x + hint_encoder(c)`` after its first block; a zero-initialised
1x1 conv after every block (`zero_convs`, `middle_block_out`) yields the residuals that are added
to the locked UNet's skip connections and middle block.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .config import ControlNetConfig
from .errors import ControlNetError
from .layers import TimestepEmbedSequential, timestep_embedding
from .residuals import ControlResiduals
from .unet import encoder_blocks, middle_block
from .union import add_union_modules, check_types, fuse_conditions

HINT_DOWNSCALE = 8  # three stride-2 convs in input_hint_block


def tensor_version(t: torch.Tensor) -> int:
    """In-place modification counter; inference-mode tensors (ComfyUI samples under inference mode) have none."""
    return -1 if t.is_inference() else t._version


def _hint_encoder(cfg: ControlNetConfig, **kw) -> TimestepEmbedSequential:
    """8 3x3 convs with SiLU between them (indices 0, 2, ..., 14); strides 2 at 4, 8, 12."""
    c16, c32, c96, c256 = cfg.hint_block_channels
    plan = [(cfg.hint_channels, c16, 1), (c16, c16, 1), (c16, c32, 2), (c32, c32, 1), (c32, c96, 2), (c96, c96, 1), (c96, c256, 2), (c256, cfg.model_channels, 1)]
    layers: list[nn.Module] = []
    for i, (cin, cout, stride) in enumerate(plan):
        layers.append(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, **kw))
        if i != len(plan) - 1:
            layers.append(nn.SiLU())
    return TimestepEmbedSequential(*layers)


def _zero_conv(ch: int, **kw) -> TimestepEmbedSequential:
    return TimestepEmbedSequential(nn.Conv2d(ch, ch, 1, **kw))


class ControlNet(nn.Module):
    """ControlNet for ldm UNets. `forward` returns `ControlResiduals` (one per input block + middle)."""

    def __init__(self, config: ControlNetConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        mc, emb = cfg.model_channels, cfg.emb_dim

        # 1. timestep (and SDXL's pooled-text/size) embedding
        self.time_embed = nn.Sequential(nn.Linear(mc, emb, **kw), nn.SiLU(), nn.Linear(emb, emb, **kw))
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb, **kw), nn.SiLU(), nn.Linear(emb, emb, **kw)))

        # 2. encoder copy (the UNet's own builder), with a zero conv after every block
        self.input_hint_block = _hint_encoder(cfg, **kw)
        self.input_blocks, self.zero_convs = nn.ModuleList(), nn.ModuleList()
        for block, ch in encoder_blocks(cfg, **kw):
            self.input_blocks.append(block)
            self.zero_convs.append(_zero_conv(ch, **kw))

        # 3. middle block copy and its zero conv
        self.middle_block = middle_block(cfg, ch, **kw)
        self.middle_block_out = _zero_conv(ch, **kw)
        if cfg.union_types:
            add_union_modules(self, mc, emb, cfg.union_types, cfg.union_layers, cfg.union_type_dim, **kw)

        self._hint_cache: Optional[tuple] = None

    # -- hint encoding (independent of the timestep, so it is cached across sampling steps) --

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """(B, hint_channels, 8h, 8w) in [0, 1] -> (B, model_channels, h, w). Cached while hint, dtype and size stay the same."""
        dtype = self.input_hint_block[0].weight.dtype
        device = self.input_hint_block[0].weight.device
        if torch.is_grad_enabled() and self.training:  # training: a cached result would carry a stale autograd graph
            self._hint_cache = None
            return self.input_hint_block(hint.to(device=device, dtype=dtype))
        key = (id(hint), tensor_version(hint), tuple(hint.shape), dtype, device)
        if self._hint_cache is not None and self._hint_cache[0] is hint and self._hint_cache[1] == key:
            return self._hint_cache[2]
        if hint.ndim != 4 or hint.shape[1] != self.config.hint_channels:
            raise ControlNetError(
                f"ControlNet hint has shape {tuple(hint.shape)}; expected (batch, {self.config.hint_channels}, height, width). "
                "Convert the image to the channel count the ControlNet was trained on (RGB: 3)."
            )
        guided = self.input_hint_block(hint.to(device=device, dtype=dtype))
        self._hint_cache = (hint, key, guided)
        return guided

    def encode_union(self, hints: Sequence[torch.Tensor], types: Sequence[int], weights: Optional[Sequence[float]]) -> torch.Tensor:
        """Several conditions, one type each, fused as a union ControlNet was trained; cached like `encode_hint`."""
        if len(hints) != len(types):
            raise ControlNetError(f"union ControlNet: {len(hints)} condition image(s) for {len(types)} control type(s); give one type per image.")
        check_types(types, self.config.union_types)
        key = (tuple((id(h), tensor_version(h), tuple(h.shape)) for h in hints), tuple(types), tuple(weights or ()))
        if not (torch.is_grad_enabled() and self.training) and self._hint_cache is not None and self._hint_cache[1] == key \
                and all(a is b for a, b in zip(self._hint_cache[0], hints)):
            return self._hint_cache[2]
        self._hint_cache = None
        encoded = []
        for h in hints:
            if h.ndim != 4 or h.shape[1] != self.config.hint_channels:
                raise ControlNetError(f"union ControlNet hint has shape {tuple(h.shape)}; expected (batch, {self.config.hint_channels}, height, width).")
            encoded.append(self.input_hint_block(h.to(device=self.input_hint_block[0].weight.device, dtype=self.input_hint_block[0].weight.dtype)))
        batch = max(e.shape[0] for e in encoded)
        if any(e.shape[0] not in (1, batch) for e in encoded) or len({e.shape[-2:] for e in encoded}) > 1:
            raise ControlNetError(f"union ControlNet: the condition images differ in batch or size ({[tuple(h.shape) for h in hints]}); give each one image or one per latent, all of one size.")
        fused = fuse_conditions(self, [e.expand(batch, -1, -1, -1) for e in encoded], types, weights)
        if not (torch.is_grad_enabled() and self.training):
            self._hint_cache = (tuple(hints), key, fused)
        return fused

    def clear_hint_cache(self) -> None:
        self._hint_cache = None

    def forward(
        self,
        x: torch.Tensor,
        hint: Union[torch.Tensor, Sequence[torch.Tensor]],
        timesteps: torch.Tensor,
        context: Optional[torch.Tensor],
        y: Optional[torch.Tensor] = None,
        control_types: Optional[Sequence[int]] = None,
        condition_weights: Optional[Sequence[float]] = None,
    ) -> ControlResiduals:
        """Residuals for every UNet skip connection and the middle block.

        x: noisy latent (B, in_channels, h, w), already scaled as the UNet sees it;
        hint: condition image (B or 1, hint_channels, 8h, 8w) in [0, 1]; for a union ControlNet, one per control type;
        timesteps: (B,) model timesteps (0..999); context: (B, tokens, context_dim); y: SDXL (B, adm_in_channels).
        control_types: union ControlNets: the type of each condition (`union.UNION_TYPES`); none: the plain hint path
            with an all-zero type vector, as ComfyUI's core runs a union file without a type.
        condition_weights: union ControlNets with several conditions: the weight of each (the reference's
            per-condition conditioning scale); with one condition, the weight scales the residuals.
        """
        cfg = self.config
        dtype = self.input_blocks[0][0].weight.dtype
        if self.config.adm_in_channels and y is None:
            raise ControlNetError(f"This ControlNet ({cfg.family()}) needs the 'y' vector (pooled text + size embedding) of an SDXL-like model; none was given.")
        # 1. embeddings
        emb = self.time_embed(timestep_embedding(timesteps.flatten(), cfg.model_channels).to(dtype))
        types = list(control_types or ())
        if cfg.union_types:
            check_types(types, cfg.union_types)
            emb = emb + self.control_add_embedding(types, x.shape[0], dtype, x.device)
        elif types:
            raise ControlNetError(f"control types {types} were given, but this ControlNet ({cfg.family()}) is not a union model; remove them.")
        if cfg.adm_in_channels:
            emb = emb + self.label_emb(y.to(dtype))
        # 2. hint encoder, matched to the latent's batch
        if types:
            hints = list(hint) if isinstance(hint, (list, tuple)) else [hint] * len(types)
            guided = self.encode_union(hints, types, condition_weights)
        elif isinstance(hint, (list, tuple)):
            raise ControlNetError(f"{len(hint)} condition images were given without control types; a union ControlNet needs one type per image.")
        else:
            guided = self.encode_hint(hint)
        if guided.shape[-2:] != x.shape[-2:]:
            raise ControlNetError(
                f"ControlNet hint of {tuple(hint.shape[-2:])} px encodes to {tuple(guided.shape[-2:])}, but the latent is {tuple(x.shape[-2:])}; "
                f"resize the hint to {HINT_DOWNSCALE}x the latent size ({x.shape[-2] * HINT_DOWNSCALE}x{x.shape[-1] * HINT_DOWNSCALE})."
            )
        if guided.shape[0] != x.shape[0]:
            if x.shape[0] % guided.shape[0]:
                raise ControlNetError(f"hint batch {guided.shape[0]} does not divide latent batch {x.shape[0]}; give one hint or one per latent.")
            guided = guided.repeat(x.shape[0] // guided.shape[0], 1, 1, 1)
        ctx = None if context is None else context.to(dtype)
        # 3. encoder copy
        h = x.to(dtype)
        down: list[torch.Tensor] = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, ctx)
            if i == 0:
                h = h + guided
            down.append(zero_conv(h, emb, ctx))
        # 4. middle block
        h = self.middle_block(h, emb, ctx)
        mid = self.middle_block_out(h, emb, ctx)
        res = ControlResiduals(tuple(down), mid)
        if types and condition_weights is not None and len(types) == 1 and condition_weights[0] != 1.0:
            res = res.map(lambda t: t * condition_weights[0])
        if cfg.global_average_pooling:
            res = res.map(lambda t: t.mean(dim=(2, 3), keepdim=True).expand_as(t))
        return res
