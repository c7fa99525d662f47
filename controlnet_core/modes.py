"""Control modes: how strongly each injection site is weighted, and whether the unconditional branch is steered.

| mode | per-site weight w_i (i = 0..n-1 down sites, n = middle) | unconditional branch |
| --- | --- | --- |
| balanced | 1 | controlled |
| prompt (my prompt is more important) | 0.825 ** (n - i) | controlled |
| controlnet (ControlNet is more important) | 0.825 ** (n - i) | not controlled, so CFG amplifies the control |
| cfg_resolution (paper section 3.4) | H / h_i (= 64 / h_i at 512 px) | controlled |

"prompt" and "controlnet" follow sd-webui-controlnet (its soft injection: 0.825 ** (12 - i) for
SD1.5's 13 sites); "controlnet" is also the original repository's guess mode, where the
unconditional side gets no control.

DiT families (token residuals, `ControlResiduals.token_grid` set) have one resolution and no middle block. Their
sites are the control model's distinct outputs, in block order (a tensor shared by several base blocks is one site;
Flux: the double-block outputs, then the single-block ones).
"prompt" and "controlnet" weight output j of m by 0.825 ** (12 * (m - 1 - j) / (m - 1)): the same span as SD1.5's,
first output 0.099, last 1, whatever the depth, so the modes feel alike across families. "cfg_resolution" has no
resolutions to weigh and equals balanced there.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional

from .residuals import ControlResiduals, cfg_resolution_weights, soft_weights


class ControlMode(str, Enum):
    BALANCED = "balanced"
    PROMPT = "prompt is more important"
    CONTROLNET = "ControlNet is more important"
    CFG_RESOLUTION = "CFG resolution weighting"

    @property
    def applies_to_uncond(self) -> bool:
        return self is not ControlMode.CONTROLNET

    @classmethod
    def parse(cls, value: "str | ControlMode") -> "ControlMode":
        if isinstance(value, ControlMode):
            return value
        for m in cls:
            if value in (m.value, m.name, m.name.lower()):
                return m
        raise ValueError(f"unknown control mode {value!r}; expected one of {[m.value for m in cls]}")


def mode_block_scales(mode: "str | ControlMode", res: ControlResiduals) -> Optional[list[float]]:
    """Per-site weights for `scale()`; None means all ones."""
    mode = ControlMode.parse(mode)
    n = len(res.down) if res.down else len(res.input)
    if mode is ControlMode.BALANCED:
        return None
    if res.is_tokens:
        return _token_block_scales(mode, res)
    if mode in (ControlMode.PROMPT, ControlMode.CONTROLNET):
        return soft_weights(n + 1)
    # CFG resolution weighting needs each site's height; T2I features sit at input-block sites
    sites = res.down or res.input
    return cfg_resolution_weights([None if t is None else t.shape for t in sites], None if res.mid is None else res.mid.shape)


SOFT_SPAN = 12  # SD1.5's 13 sites: the first is weighted 0.825 ** 12 relative to the last


def _token_block_scales(mode: ControlMode, res: ControlResiduals) -> Optional[list[float]]:
    """Per-site weights for DiT token residuals: one weight per distinct control output (see the module doc)."""
    if mode is ControlMode.CFG_RESOLUTION:
        return None
    sites = (*res.input, *res.down)  # Flux: double blocks, then single blocks; SD3: joint blocks
    order: dict[int, int] = {}
    for t in sites:
        if t is not None:
            order.setdefault(id(t), len(order))
    m = len(order)
    weights = [0.825 ** (SOFT_SPAN * (m - 1 - j) / (m - 1)) if m > 1 else 1.0 for j in range(m)]
    return [weights[order[id(t)]] if t is not None else 1.0 for t in sites] + [1.0]
