"""Is this ControlNet made for this base model? Checked from shapes, before any sampling starts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .config import ControlNetConfig
from .errors import IncompatibleModelError
from .flux.config import FluxControlNetConfig
from .formats import patches
from .loader import StateDictLike, as_source
from .mmdit import SD3ControlNetConfig
from .mmdit.sd35_stability import SD35ControlNetConfig
from .qwen.config import QwenControlNetConfig
from .t2i_adapter import T2IAdapterConfig


@dataclass(frozen=True)
class BaseModelInfo:
    """What a control needs to know about the UNet it will steer."""

    model_channels: int
    in_channels: int
    context_dim: Optional[int]
    adm_in_channels: Optional[int] = None
    name: str = "base model"

    @classmethod
    def from_unet(cls, unet: StateDictLike, name: Optional[str] = None) -> "BaseModelInfo":
        src = as_source(unet, "base UNet")
        p = patches.unet_prefix(src)
        mc, cin = src.shape(p + "input_blocks.0.0.weight")[:2]
        ctx = next((src.shape(k)[1] for k in src.keys() if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
        adm = src.shape(p + "label_emb.0.0.weight")[1] if p + "label_emb.0.0.weight" in src else None
        return cls(mc, cin, ctx, adm, name or src.name)

    def describe(self) -> str:
        s = f"{self.name} (channels {self.model_channels}, context {self.context_dim}"
        return s + (f", label_emb {self.adm_in_channels})" if self.adm_in_channels else ", no label_emb)")


@dataclass(frozen=True)
class TransformerModelInfo:
    """A base model without a UNet. `family` "sd3" (MMDiT: SD3 / SD3.5) carries the numbers an SD3 ControlNet must
    match; any other family ("flux", ...) is known by name only, which is enough to refuse a UNet ControlNet."""

    family: str
    name: str = "base model"
    hidden_size: Optional[int] = None
    in_channels: Optional[int] = None
    context_dim: Optional[int] = None  # width of the text tokens the model's context embedder takes
    patch_size: Optional[int] = None

    def describe(self) -> str:
        if self.family in ("sd3", "flux", "qwen_image") and self.hidden_size:
            what = {"sd3": "an SD3-family MMDiT", "flux": "a Flux.1 transformer", "qwen_image": "a Qwen-Image transformer"}[self.family]
            return (f"{self.name} ({what} of width {self.hidden_size}, {self.in_channels} latent channels, "
                    f"text width {self.context_dim}, patch {self.patch_size})")
        return f"{self.name} (a {self.family} transformer, no UNet)"


AnyBaseInfo = Union[BaseModelInfo, TransformerModelInfo]
AnyControlConfig = Union[ControlNetConfig, T2IAdapterConfig, SD3ControlNetConfig, SD35ControlNetConfig, FluxControlNetConfig, QwenControlNetConfig]

# the transformer family each DiT ControlNet config steers, and its name in messages
_DIT_FAMILY = {FluxControlNetConfig: ("flux", "Flux.1"), QwenControlNetConfig: ("qwen_image", "Qwen-Image")}


def _check_dit(config: Union[FluxControlNetConfig, QwenControlNetConfig], base: "AnyBaseInfo", control_name: str) -> None:
    """Flux and Qwen-Image ControlNets: the right family, then width, latent channels and text width where known."""
    family, title = _DIT_FAMILY[type(config)]
    if not isinstance(base, TransformerModelInfo) or base.family != family:
        raise IncompatibleModelError(
            f"{control_name} is a {title.split('.')[0]} ControlNet ({config.summary()}), but {base.describe()}. It steers {title} "
            "models only: load such a model, or pick a ControlNet made for this model's family.")
    problems = []
    if base.hidden_size is not None and config.hidden_size != base.hidden_size:
        problems.append(f"width {config.hidden_size} vs {base.hidden_size}")
    if base.in_channels is not None and config.latent_channels != base.in_channels:
        problems.append(f"latent channels {config.latent_channels} vs {base.in_channels}")
    if base.context_dim is not None and config.joint_attention_dim != base.context_dim:
        problems.append(f"text width {config.joint_attention_dim} vs {base.context_dim}")
    if problems:
        raise IncompatibleModelError(f"{control_name} ({config.summary()}) does not fit {base.describe()}: {'; '.join(problems)}.")


def _check_sd3(config: Union[SD3ControlNetConfig, SD35ControlNetConfig], base: AnyBaseInfo, control_name: str) -> None:
    if not isinstance(base, TransformerModelInfo) or base.family != "sd3":
        raise IncompatibleModelError(
            f"{control_name} is an SD3-family ControlNet ({config.summary()}), but {base.describe()}. It steers SD3 / SD3.5 "
            "models only: load an SD3 or SD3.5 checkpoint, or pick a ControlNet made for this model's family.")
    problems = []
    if config.hidden_size != base.hidden_size:
        problems.append(f"width {config.hidden_size} vs {base.hidden_size}")
    if config.in_channels != base.in_channels:
        problems.append(f"latent channels {config.in_channels} vs {base.in_channels}")
    if base.patch_size is not None and config.patch_size != base.patch_size:
        problems.append(f"patch {config.patch_size} vs {base.patch_size}")
    text_width = getattr(config, "joint_attention_dim", None)  # Stability's SD3.5 ControlNets read no text tokens
    if base.context_dim is not None and text_width is not None and text_width != base.context_dim:
        problems.append(f"text width {config.joint_attention_dim} vs {base.context_dim}")
    if problems:
        raise IncompatibleModelError(
            f"{control_name} ({config.summary()}) does not fit {base.describe()}: {'; '.join(problems)}. "
            "SD3 medium, SD3.5 medium and SD3.5 large have different widths: pick the ControlNet made for this model.")


def check_compatible(config: AnyControlConfig, base: AnyBaseInfo, control_name: str = "ControlNet") -> None:
    """Raise `IncompatibleModelError` naming both models when the control cannot steer `base`."""
    if isinstance(config, (SD3ControlNetConfig, SD35ControlNetConfig)):
        return _check_sd3(config, base, control_name)
    if isinstance(config, (FluxControlNetConfig, QwenControlNetConfig)):
        return _check_dit(config, base, control_name)
    if isinstance(base, TransformerModelInfo):
        what = "T2I-Adapter" if isinstance(config, T2IAdapterConfig) else f"{config.family()} ControlNet"
        raise IncompatibleModelError(
            f"{control_name} is a {what} for UNet models (SD1.x / SD2.x / SDXL), but {base.describe()}. It cannot steer "
            "this model: pick a ControlNet made for its family.")
    if isinstance(config, T2IAdapterConfig):
        if config.channels[0] != base.model_channels:
            raise IncompatibleModelError(
                f"{control_name} is a T2I-Adapter for {config.channels[0]}-channel UNets, but {base.describe()}. Use an adapter made for this model family."
            )
        return
    problems = []
    if config.context_dim != base.context_dim:
        problems.append(f"cross-attention width {config.context_dim} vs {base.context_dim}")
    if config.model_channels != base.model_channels:
        problems.append(f"channels {config.model_channels} vs {base.model_channels}")
    if config.in_channels != base.in_channels:
        problems.append(f"latent channels {config.in_channels} vs {base.in_channels}")
    if (config.adm_in_channels or None) != (base.adm_in_channels or None):
        problems.append(f"label_emb input {config.adm_in_channels} vs {base.adm_in_channels}")
    if problems:
        raise IncompatibleModelError(
            f"{control_name} is a {config.family()} ControlNet and does not fit {base.describe()}: {'; '.join(problems)}. "
            "Pick a ControlNet trained for this base model family (SD1.x, SD2.x and SDXL ControlNets are not interchangeable)."
        )
