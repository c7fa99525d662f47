"""Is this ControlNet made for this base model? Checked from shapes, before any sampling starts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .config import ControlNetConfig
from .errors import IncompatibleModelError
from .formats import patches
from .loader import StateDictLike, as_source
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


def check_compatible(config: Union[ControlNetConfig, T2IAdapterConfig], base: BaseModelInfo, control_name: str = "ControlNet") -> None:
    """Raise `IncompatibleModelError` naming both models when the control cannot steer `base`."""
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
