"""Keyframes: how a control's strength changes along the sampling schedule and across the frames of a batch.

Two independent schedules, both pure data (no host knowledge):

- `TimestepKeyframes`: keyframes at start percents of the schedule (0 = first step, 1 = last), each with a strength
  multiplier, optional per-site weights and an optional mask. Between a keyframe and the next one the strength holds
  or moves along a curve (linear, ease-in, ease-out, ease-in-out); the last keyframe holds to the end. Before the first
  keyframe the multiplier is 1 (the unit as configured). `bind(percent_to_sigma)` turns it into a `TimestepSchedule`
  that answers per sampler call, from the call's sigma.
- `LatentKeyframes`: a strength per frame (batch index) of the latent batch, chosen with Python-style indices and
  ranges (negative ones count from the end); frames no keyframe names get `default_strength`; a keyframe over several
  frames may move from one strength to another along a curve.

Why sigma and not step numbers: the host hands a control only the sigma of each call (not the step index), and its
own start/end window compares sigmas with `percent_to_sigma(percent)`; keyframe boundaries are compared the same way,
so a keyframe at p switches exactly where a unit with start_percent p starts. The curves need a percent, which is
found by inverting the same (monotonic) `percent_to_sigma` by bisection.

The semantics follow ComfyUI-Advanced-ControlNet's TimestepKeyframe / LatentKeyframe where the two overlap; the README
("Keyframes") lists where they differ and why.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .errors import ControlNetError
from .residuals import ControlResiduals

log = logging.getLogger(__name__)

HOLD = "hold"
INTERPOLATIONS = (HOLD, "linear", "ease-in", "ease-out", "ease-in-out")
MAX_STRENGTH = 10.0  # the apply nodes' strength bound


class KeyframeError(ControlNetError):
    """A keyframe that cannot be used: a percent outside 0-1, a frame outside the batch, a malformed frame list."""


def curve(fraction: float, interpolation: str) -> float:
    """Where a transition stands at `fraction` (0..1) of its way: 0 at the start, 1 at the end.

    ease-in f^2 (slow start), ease-out 1-(1-f)^2 (slow end), ease-in-out (1-cos(pi f))/2: the curves of
    ComfyUI-Advanced-ControlNet's StrengthInterpolation, so the same names give the same shapes. `hold` stays at 0.
    """
    f = min(max(fraction, 0.0), 1.0)
    if interpolation == HOLD:
        return 0.0
    if interpolation == "linear":
        return f
    if interpolation == "ease-in":
        return f * f
    if interpolation == "ease-out":
        return 1.0 - (1.0 - f) ** 2
    if interpolation == "ease-in-out":
        return (1.0 - math.cos(math.pi * f)) / 2.0
    raise KeyframeError(f"unknown interpolation {interpolation!r}; expected one of {list(INTERPOLATIONS)}.")


def _between(a: float, b: float, fraction: float, interpolation: str) -> float:
    c = curve(fraction, interpolation)
    return a if c == 0.0 else a + (b - a) * c  # exactly `a` at the start and for hold: no rounding where nothing moves


def _check_strength(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= MAX_STRENGTH:
        raise KeyframeError(f"{what} is {value}; a strength must be a number from 0 to {MAX_STRENGTH:g}.")
    return value


def _check_interpolation(value: str, what: str) -> str:
    if value not in INTERPOLATIONS:
        raise KeyframeError(f"{what} is {value!r}; expected one of {list(INTERPOLATIONS)}.")
    return value


def parse_block_weights(text: str) -> Optional[tuple[float, ...]]:
    """'1, 0.8, 0.5' -> (1.0, 0.8, 0.5); empty -> None (keep the control mode's weights)."""
    text = (text or "").strip()
    if not text:
        return None
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        try:
            w = float(part)
        except ValueError:
            raise KeyframeError(f"block_weights: {part!r} is not a number; give comma-separated numbers, one per injection "
                                "site (SD1.5: 12 skip connections, then the middle block), or leave it empty.") from None
        if not math.isfinite(w) or w < 0:
            raise KeyframeError(f"block_weights: {w} is not a finite number >= 0.")
        out.append(w)
    return tuple(out)


# -- timestep keyframes --


@dataclass(frozen=True)
class TimestepKeyframe:
    """One keyframe of the schedule.

    start_percent: where it takes effect (0..1 of the schedule, the unit's start/end scale).
    strength: multiplies the unit's strength from here on (0 = the unit is off, exactly).
    interpolation: how the multiplier goes from this keyframe's strength to the next keyframe's (`hold`: stays).
    block_weights: per-site weights replacing the control mode's (down sites then the middle one, as `scale` takes
        them); None = inherited from the keyframe before (or the mode's when `inherit_missing` is off).
    mask: (B, H, W) or (H, W), multiplies the unit's own mask; None = inherited (or no keyframe mask).
    """

    start_percent: float
    strength: float = 1.0
    interpolation: str = HOLD
    block_weights: Optional[tuple[float, ...]] = None
    mask: Optional[torch.Tensor] = field(default=None, compare=False)
    inherit_missing: bool = True

    def __post_init__(self):
        p = float(self.start_percent)
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise KeyframeError(f"a timestep keyframe's start_percent is {p}; it must be within 0 to 1 "
                                "(0 = the first sampling step, 1 = the last).")
        object.__setattr__(self, "start_percent", p)
        object.__setattr__(self, "strength", _check_strength(self.strength, "a timestep keyframe's strength"))
        _check_interpolation(self.interpolation, "a timestep keyframe's interpolation")
        if self.block_weights is not None:
            object.__setattr__(self, "block_weights", tuple(float(w) for w in self.block_weights))
        if self.mask is not None and (self.mask.ndim not in (2, 3) or 0 in self.mask.shape):
            raise KeyframeError(f"a timestep keyframe's mask must be (batch, height, width); got shape {tuple(self.mask.shape)}.")
        if self.mask is not None and not bool(torch.isfinite(self.mask).all()):
            raise KeyframeError("a timestep keyframe's mask holds NaN or infinite values; a mask must be finite, 0 to 1.")


@dataclass(frozen=True)
class KeyframeState:
    """What the schedule says for one sampler call: multiply by `strength`, weigh sites by `block_weights` (None: the
    mode's), multiply by `mask` (None: no keyframe mask). `index` is the keyframe in effect (-1: before the first)."""

    strength: float = 1.0
    block_weights: Optional[tuple[float, ...]] = None
    mask: Optional[torch.Tensor] = None
    index: int = -1


@dataclass(frozen=True)
class TimestepKeyframes:
    """Keyframes sorted by start_percent. Chaining adds to a copy; a keyframe at the percent of an existing one replaces
    it (the one added later wins)."""

    keyframes: tuple[TimestepKeyframe, ...] = ()

    def add(self, keyframe: TimestepKeyframe) -> "TimestepKeyframes":
        kept = [k for k in self.keyframes if k.start_percent != keyframe.start_percent]
        return TimestepKeyframes(tuple(sorted([*kept, keyframe], key=lambda k: k.start_percent)))

    def __len__(self) -> int:
        return len(self.keyframes)

    def states(self) -> list[KeyframeState]:
        """Each keyframe's own state, with missing weights and masks inherited as `inherit_missing` says."""
        out, weights, mask = [], None, None
        for i, k in enumerate(self.keyframes):
            if k.block_weights is not None or not k.inherit_missing:
                weights = k.block_weights
            if k.mask is not None or not k.inherit_missing:
                mask = k.mask
            out.append(KeyframeState(k.strength, weights, mask, i))
        return out

    def bind(self, percent_to_sigma: Callable[[float], float]) -> "TimestepSchedule":
        return TimestepSchedule(self, percent_to_sigma)


class TimestepSchedule:
    """Keyframes bound to one sampling run's percent <-> sigma mapping (the host's `percent_to_sigma`)."""

    BISECTION_STEPS = 40  # the percent to ~1e-12 of a segment: far below any visible change of strength

    def __init__(self, keyframes: TimestepKeyframes, percent_to_sigma: Callable[[float], float]):
        self.keyframes = keyframes.keyframes
        self.percent_to_sigma = percent_to_sigma
        self.sigmas = [float(percent_to_sigma(k.start_percent)) for k in self.keyframes]
        self._states = keyframes.states()
        self._cache: dict[float, KeyframeState] = {}

    def percent_of(self, sigma: float, lo: float = 0.0, hi: float = 1.0) -> float:
        """The percent whose sigma is `sigma`, within [lo, hi] (percent_to_sigma falls as the percent grows)."""
        for _ in range(self.BISECTION_STEPS):
            mid = (lo + hi) / 2.0
            if float(self.percent_to_sigma(mid)) > sigma:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2.0

    def at(self, sigma: float) -> KeyframeState:
        """The state for a call at `sigma`: the last keyframe whose start sigma is >= sigma is in effect (the host's
        start comparison), moving towards the next one by its interpolation."""
        sigma = float(sigma)
        if sigma in self._cache:
            return self._cache[sigma]
        i = -1
        for j, s in enumerate(self.sigmas):
            if sigma <= s:
                i = j
        if i < 0:
            state = KeyframeState()
        else:
            state = self._states[i]
            k = self.keyframes[i]
            if k.interpolation != HOLD and i + 1 < len(self.keyframes):
                nxt = self.keyframes[i + 1]
                span = nxt.start_percent - k.start_percent
                fraction = 0.0  # exactly at its start (and an empty span): its own strength, unrounded by the search
                if span > 0 and sigma < self.sigmas[i]:
                    fraction = (self.percent_of(sigma, k.start_percent, nxt.start_percent) - k.start_percent) / span
                state = replace(state, strength=_between(k.strength, nxt.strength, fraction, k.interpolation))
        self._cache[sigma] = state
        return state


# -- latent (per-frame) keyframes --


def parse_frames(text: str) -> tuple[object, ...]:
    """'0', '-1', '2:6', '::2', '0, -1, 4:' -> a tuple of ints and slices (Python indexing, resolved per batch)."""
    specs: list[object] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                bits = [b.strip() for b in part.split(":")]
                if len(bits) > 3:
                    raise ValueError
                spec = slice(*[int(b) if b else None for b in bits])
            else:
                spec = int(part)
        except ValueError:
            raise KeyframeError(f"frames: {part!r} is not a frame index or range; use Python-style indices and ranges, "
                                "comma-separated: '0', '-1' (the last frame), '2:6' (frames 2 to 5), '4:' , '::2'.") from None
        if isinstance(spec, slice) and spec.step == 0:
            raise KeyframeError(f"frames: the range {part!r} has step 0; a step must not be 0.")
        specs.append(spec)
    if not specs:
        raise KeyframeError("frames is empty; name at least one frame (e.g. '0', '-1' or '0:8').")
    return tuple(specs)


def _spec_text(spec: object) -> str:
    if isinstance(spec, slice):
        return ":".join("" if v is None else str(v) for v in (spec.start, spec.stop) + ((spec.step,) if spec.step is not None else ()))
    return str(spec)


@dataclass(frozen=True)
class LatentKeyframe:
    """Strength for some frames of the batch: `strength` at the first frame named, moving to `strength_end` at the last
    one along `interpolation` (`hold`: every frame gets `strength`)."""

    frames: tuple[object, ...]
    strength: float = 1.0
    strength_end: Optional[float] = None
    interpolation: str = HOLD

    def __post_init__(self):
        frames = parse_frames(self.frames) if isinstance(self.frames, str) else tuple(self.frames)
        object.__setattr__(self, "frames", frames)
        object.__setattr__(self, "strength", _check_strength(self.strength, "a latent keyframe's strength"))
        if self.strength_end is not None:
            object.__setattr__(self, "strength_end", _check_strength(self.strength_end, "a latent keyframe's strength_end"))
        _check_interpolation(self.interpolation, "a latent keyframe's interpolation")

    def indices(self, frames: int) -> list[int]:
        """The frames this keyframe names in a batch of `frames`, in the order named, each once."""
        out: list[int] = []
        for spec in self.frames:
            if isinstance(spec, slice):
                chosen = list(range(frames)[spec])
                if not chosen:
                    raise KeyframeError(f"latent keyframe: the range '{_spec_text(spec)}' selects no frame of this batch of {frames}; "
                                        f"indices run from 0 to {frames - 1} (or -{frames} to -1).")
            else:
                if not -frames <= spec < frames:
                    raise KeyframeError(f"latent keyframe: frame {spec} is outside this batch of {frames} frames; valid indices are "
                                        f"0 to {frames - 1}, or -{frames} to -1 counted from the end.")
                chosen = [spec % frames]
            out += [i for i in chosen if i not in out]
        return out

    def values(self, frames: int) -> dict[int, float]:
        idx = self.indices(frames)
        end = self.strength if self.strength_end is None else self.strength_end
        n = len(idx)
        return {i: _between(self.strength, end, j / (n - 1) if n > 1 else 0.0, self.interpolation) for j, i in enumerate(idx)}


@dataclass(frozen=True)
class LatentKeyframes:
    """Per-frame strengths. Later keyframes override earlier ones on the frames they share; `default_strength` is for
    frames no keyframe names (0: only named frames are controlled, as ComfyUI-Advanced-ControlNet's default)."""

    keyframes: tuple[LatentKeyframe, ...] = ()
    default_strength: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "default_strength", _check_strength(self.default_strength, "default_strength"))

    def add(self, keyframe: LatentKeyframe, default_strength: Optional[float] = None) -> "LatentKeyframes":
        default = self.default_strength if default_strength is None else default_strength
        return LatentKeyframes((*self.keyframes, keyframe), default)

    def strengths(self, frames: int) -> list[float]:
        """One strength per frame of a batch of `frames`."""
        if frames < 1:
            raise KeyframeError(f"latent keyframes need a batch of at least one frame; got {frames}.")
        out = [self.default_strength] * frames
        for k in self.keyframes:
            for i, v in k.values(frames).items():
                out[i] = v
        return out

    def multipliers(self, batch: int, batched_number: int = 1, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """(batch,) multipliers for a sampler call whose batch is `batched_number` equal chunks (cond, uncond ...) of the
        frame batch: each chunk gets the per-frame strengths."""
        if batched_number < 1 or batch % batched_number:
            raise KeyframeError(f"latent keyframes: a batch of {batch} is not {batched_number} equal chunks of frames.")
        per = self.strengths(batch // batched_number)
        return torch.tensor(per * batched_number, device=device, dtype=dtype)


def weigh_frames(res: ControlResiduals, multipliers: torch.Tensor) -> ControlResiduals:
    """Multiply batch item b of every residual by multipliers[b] (image maps and token sequences alike; a tensor shared
    by several sites stays shared)."""

    def mul(t: torch.Tensor) -> torch.Tensor:
        return t * multipliers.to(device=t.device, dtype=t.dtype).view(-1, *([1] * (t.ndim - 1)))

    return res.map(mul)


__all__ = ["INTERPOLATIONS", "KeyframeError", "KeyframeState", "LatentKeyframe", "LatentKeyframes", "TimestepKeyframe",
           "TimestepKeyframes", "TimestepSchedule", "curve", "parse_block_weights", "parse_frames", "weigh_frames"]
