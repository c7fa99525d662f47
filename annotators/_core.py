"""controlnet_core, reached relatively inside ComfyUI (the repo folder is the package) or absolutely when pip-installed."""
try:
    from ..controlnet_core.checkpoint import open_checkpoint
    from ..controlnet_core.errors import ControlNetError, NotACheckpointError
    from ..controlnet_core.loading import strict_fill
except ImportError:  # annotators imported as a top-level package
    from controlnet_core.checkpoint import open_checkpoint
    from controlnet_core.errors import ControlNetError, NotACheckpointError
    from controlnet_core.loading import strict_fill

__all__ = ["open_checkpoint", "ControlNetError", "NotACheckpointError", "strict_fill"]
