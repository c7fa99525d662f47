"""Every error `controlnet_core` raises on bad input derives from `ControlNetError`.

Messages name the file (or object), what was found, what was expected and what to do, because
users meet them in a ComfyUI dialog, far from the code that raised them.
"""
from __future__ import annotations


class ControlNetError(ValueError):
    """Base class: catch this to handle any bad-input error of the library."""


class NotACheckpointError(ControlNetError):
    """The file is not a weight file at all (HTML page, Git-LFS pointer, empty, truncated, corrupt)."""


class UnknownLayoutError(ControlNetError):
    """The file holds tensors, but in no layout this library knows."""


class UnsafeCheckpointError(ControlNetError):
    """A pickle that needs more than tensors to load; refused because unpickling can run code."""


class CheckpointError(ControlNetError):
    """The layout was recognised but keys or shapes do not fit it (missing, unexpected, wrong shape)."""


class BaseModelRequiredError(ControlNetError):
    """Diff ControlNets and control-LoRAs store deltas: they need the base UNet's weights."""


class IncompatibleModelError(ControlNetError):
    """A ControlNet whose family (context width, channels, label embedding) does not fit the base model."""


class LimitExceededError(ControlNetError):
    """Work above a memory bound (megapixels), refused before anything is allocated."""


class NonFiniteResidualsError(ControlNetError):
    """A control model's residuals turned NaN or infinite during sampling: stopped instead of returning black."""


class NonFiniteWeightsError(ControlNetError):
    """A weight file holding NaN or infinite values: refused at load, as such a model only ever gives black images."""


class OutputPathError(ControlNetError):
    """An output that cannot be written where asked: the path exists (and overwriting was not asked for), is a
    folder where a file goes, or the system refused the write."""
