"""`ControlResiduals`: what a control model hands the UNet, and the maths on it (strength, block scales, sums).

Public API, version `RESIDUALS_API_VERSION`. The structure is addressed by *site*, never by
list position alone:

- ``down[k]`` is added to the UNet skip connection that ``input_blocks[k]`` produced
  (ControlNet zero-conv outputs; SD1.5 has 12, SDXL 9).
- ``mid`` is added to the middle block's output.
- ``input[k]`` is added to the hidden state right after ``input_blocks[k]`` (T2I-Adapter features).

``None`` anywhere means "nothing for this site".

DiT families have no resolution levels. With ``token_grid`` = (rows, columns) set, every residual is a token sequence
(B, rows * columns, C) over the latent's patches (row-major), added to the image tokens after a transformer block:
``down[k]`` after the block the host numbers k in its "output" list (SD3 / SD3.5: joint block k; Flux: single block
k), ``input[k]`` after the block it numbers k in its "input" list (Flux: double block k), in that order, never
reversed. ``scale`` then takes one weight per input site, then per down site, then the middle one. Consecutive base blocks often share one control
output: the *same tensor object* sits at several sites, and every operation here keeps that sharing (one multiply per
distinct tensor, not per site), as the host's own merge does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

RESIDUALS_API_VERSION = 1

Tensor = torch.Tensor


@dataclass(frozen=True)
class ControlResiduals:
    down: tuple[Optional[Tensor], ...] = ()
    mid: Optional[Tensor] = None
    input: tuple[Optional[Tensor], ...] = ()
    token_grid: Optional[tuple[int, int]] = None  # DiT token residuals: the (rows, columns) of image tokens

    def tensors(self) -> list[Tensor]:
        """Every present residual once, even where one tensor serves several sites."""
        seen: dict[int, Tensor] = {}
        for t in (*self.down, self.mid, *self.input):
            if t is not None:
                seen.setdefault(id(t), t)
        return list(seen.values())

    @property
    def is_tokens(self) -> bool:
        return self.token_grid is not None

    def map(self, fn) -> "ControlResiduals":
        """Apply `fn(tensor) -> tensor` to every present residual, once per distinct tensor (shared sites stay shared)."""
        done: dict[int, Tensor] = {}

        def f(t):
            if t is None:
                return None
            if id(t) not in done:
                done[id(t)] = fn(t)
            return done[id(t)]

        return ControlResiduals(tuple(map(f, self.down)), f(self.mid), tuple(map(f, self.input)), self.token_grid)

    def to(self, *args, **kwargs) -> "ControlResiduals":
        return self.map(lambda t: t.to(*args, **kwargs))


def all_finite(res: ControlResiduals) -> bool:
    """True when no residual holds NaN or inf.

    Why sums: one float32-accumulated reduction per tensor reads it once and allocates nothing of its size (isfinite
    would allocate a bool map), and a NaN or an inf anywhere makes the sum non-finite. One host sync for all of them.
    """
    ts = res.tensors()
    if not ts:
        return True
    sums = torch.stack([t.sum(dtype=torch.float32) for t in ts])
    return bool(torch.isfinite(sums).all())


def scale(res: ControlResiduals, strength: float = 1.0, block_scales: Optional[Sequence[float]] = None) -> ControlResiduals:
    """Multiply residuals by `strength` and, optionally, one factor per site.

    `block_scales` has one entry per down residual plus a last one for the middle block, in the
    order of the original repo's ``control_scales`` (13 for SD1.5). Input-side (T2I) features are
    scaled by `strength` and by the block scale of the same input block.
    """
    n = len(res.down)
    ni = len(res.input) if res.is_tokens else 0  # token residuals weigh their input sites on their own (see module doc)
    if block_scales is not None and len(block_scales) != ni + n + 1:
        what = f"{ni} input + {n} down sites + 1 middle" if ni else f"{n} down sites + 1 middle"
        raise ValueError(f"block_scales has {len(block_scales)} entries; this control has {what} = {ni + n + 1}.")
    bs = list(block_scales) if block_scales is not None else [1.0] * (ni + n + 1)
    input_scales, bs = bs[:ni], bs[ni:]
    done: dict[tuple[int, float], Tensor] = {}  # a tensor shared by sites of equal weight is multiplied once

    def mul(t: Optional[Tensor], s: float) -> Optional[Tensor]:
        if t is None:
            return None
        s = s * strength
        if s == 1.0:
            return t
        if (id(t), s) not in done:
            done[(id(t), s)] = t * s
        return done[(id(t), s)]

    down = tuple(mul(t, bs[k]) for k, t in enumerate(res.down))
    if res.is_tokens:
        inp = tuple(mul(t, input_scales[k]) for k, t in enumerate(res.input))
    else:
        inp = tuple(mul(t, bs[k] if k < n else 1.0) for k, t in enumerate(res.input))
    return ControlResiduals(down, mul(res.mid, bs[n]), inp, res.token_grid)


def soft_weights(num_sites: int, base: float = 0.825) -> list[float]:
    """Layer-decaying weights of guess/soft mode: ``base ** (num_sites - 1 - i)``; the middle gets 1.

    This is ``strength * 0.825 ** (12 - i)`` of the original repo for SD1.5's 13 sites.
    """
    return [base ** (num_sites - 1 - i) for i in range(num_sites)]


def cfg_resolution_weights(down_shapes: Sequence[Optional[Sequence[int]]], mid_shape: Optional[Sequence[int]]) -> list[float]:
    """The paper's CFG resolution weighting (section 3.4): w_i = 64 / h_i, h_i the height of site i.

    The paper states it for 512 px images (latent height 64, so the top sites get 1 and the
    8-high middle block 8). It is applied here as H / h_i, with H the latent height (the height of the
    first site), which is the same at 512 px and keeps the per-level weights at other resolutions. A site without a
    residual (None: a T2I-Adapter leaves most sites empty) gets 1.
    """
    heights = [s[-2] for s in down_shapes if s is not None]
    top = heights[0] if heights else mid_shape[-2]
    return [top / s[-2] if s is not None else 1.0 for s in down_shapes] + [top / mid_shape[-2] if mid_shape is not None else 1.0]


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    if a.shape != b.shape:
        raise ValueError(f"cannot add residuals of shapes {tuple(a.shape)} and {tuple(b.shape)}: the controls were made for different latents or models.")
    return a + b


def add_sites(a: Sequence[Optional[Tensor]], b: Sequence[Optional[Tensor]], *, same_shapes: bool = True) -> list[Optional[Tensor]]:
    """Index-aligned sum of two lists of per-site residuals (`None`: nothing at that site), the shorter one padded with
    `None`: the one place where controls' residuals are summed, by `add` and by the ComfyUI adapter's merge with the
    previous control (`nodes.comfy_adapter.merge_with_previous`, which works on the host's lists).

    A site with one side empty gets the other side's tensor itself; a pair of tensors that sits at several sites is
    added once, so its sum is shared too. `same_shapes=False` leaves shape differences to broadcasting, as the host's
    own merge (`ControlBase.control_merge`) does with a foreign control's lists.
    """
    n = max(len(a), len(b))
    a = list(a) + [None] * (n - len(a))
    b = list(b) + [None] * (n - len(b))
    done: dict[tuple[int, int], Optional[Tensor]] = {}  # pairs of shared tensors are added once and stay shared
    out = []
    for x, y in zip(a, b):
        key = (id(x), id(y))
        if key not in done:
            done[key] = _add(x, y) if same_shapes or x is None or y is None else x + y
        out.append(done[key])
    return out


def add(a: ControlResiduals, b: ControlResiduals) -> ControlResiduals:
    """Site-wise sum: how the paper composes several ControlNets."""
    if a.token_grid and b.token_grid and a.token_grid != b.token_grid:
        raise ValueError(f"cannot add token residuals of grids {a.token_grid} and {b.token_grid}: the controls were made for different latents.")
    return ControlResiduals(tuple(add_sites(a.down, b.down)), _add(a.mid, b.mid), tuple(add_sites(a.input, b.input)), a.token_grid or b.token_grid)


def combine(items: Iterable[ControlResiduals]) -> ControlResiduals:
    out = ControlResiduals()
    for r in items:
        out = add(out, r)
    return out
