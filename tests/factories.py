"""Random-weight models and checkpoints with the exact real key names, made by the tests themselves."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import save_file

from controlnet_core import ControlNet, ControlNetConfig

# Full-size architectures (the published checkpoints' shapes)
SD15 = ControlNetConfig()
SDXL = ControlNetConfig(
    channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
    context_dim=2048, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64, adm_in_channels=2816,
)
SD21 = ControlNetConfig(context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)

# Scaled-down shapes of the same families
SD15_TINY = ControlNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1), context_dim=64)
SD15_320 = ControlNetConfig(model_channels=320, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1), context_dim=768)
SD21_TINY = ControlNetConfig(
    model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1), context_dim=1024,
    use_linear_in_transformer=True, num_heads=-1, num_head_channels=64,
)
SDXL_TINY = ControlNetConfig(
    model_channels=64, channel_mult=(1, 2), num_res_blocks=(2, 2), transformer_depth=(0, 2), transformer_depth_middle=2,
    context_dim=64, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64, adm_in_channels=96,
)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter (zero convs included) with random values of a sane scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 0:  # scalars such as TAESD's vae_scale keep their defaults
                continue
            if p.ndim == 1:
                base = 1.0 if (".norm" in name or "norm" in name.split(".")[-2] or "in_layers.0" in name or "out_layers.0" in name) and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return module


def random_controlnet(cfg: ControlNetConfig, seed: int = 0, dtype=torch.float32) -> ControlNet:
    return randomize_(ControlNet(cfg), seed).to(dtype).eval()


class Draws:
    """Random tensors of one key's shape, from the generator `random_state_dict` shares between all keys."""

    def __init__(self, shape: Sequence[int], generator: torch.Generator):
        self.shape, self.generator = tuple(shape), generator

    def normal(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator)

    def uniform(self) -> torch.Tensor:
        return torch.rand(self.shape, generator=self.generator)

    def he(self) -> torch.Tensor:
        """N(0, 2 / fan_in), fan_in = prod(shape[1:]): activations keep their scale through ReLU layers."""
        return self.normal() * (2.0 / math.prod(self.shape[1:])) ** 0.5


Rule = Callable[[str, Draws], Optional[torch.Tensor]]


def random_state_dict(shapes: Union[torch.nn.Module, Mapping[str, Sequence[int]]], seed: int = 0, rule: Optional[Rule] = None) -> dict[str, torch.Tensor]:
    """Random tensors for every key of `shapes` (a module's state dict, or {key: shape} as an official file has them),
    drawn in key order from one generator seeded `seed`: the weight files the annotator tests write.

    Each key gets `rule(key, draws)` (what one network needs to stay well conditioned: norms near 1, a scaled-down
    branch, a constant), or, where `rule` gives None, He-scaled values for a tensor of 2 or more dimensions and
    0.1 * N(0, 1) for the others (biases, norms). A key whose rule returns a constant draws nothing.
    """
    if isinstance(shapes, torch.nn.Module):
        shapes = {k: v.shape for k, v in shapes.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        draws = Draws(shape, g)
        t = rule(key, draws) if rule is not None else None
        if t is None:
            t = draws.he() if len(draws.shape) >= 2 else draws.normal() * 0.1
        out[key] = t
    return out


CONTROL_ONLY = ("input_hint_block.", "zero_convs.", "middle_block_out.")  # a ControlNet's own layers (no UNet counterpart)


def control_lora_state(controlnet: Mapping[str, torch.Tensor], rank: int, seed: int, unpatched: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A control-LoRA file's tensors for the ControlNet weights `controlnet`: its own layers (`CONTROL_ONLY`) and every
    vector stored whole, each other weight as factors `<module>.up` (out, rank[, 1, 1]) and `<module>.down`
    (rank, in[, kh, kw]) of 0.1 * N(0, 1), drawn in key order from a generator seeded `seed`; weights under
    `unpatched` get no factors (the base model's own weight is used). Includes the `lora_controlnet` marker."""
    g = torch.Generator().manual_seed(seed)
    lora = {"lora_controlnet": torch.tensor([])}
    for k, v in controlnet.items():
        if k.startswith(CONTROL_ONLY) or v.ndim == 1:
            lora[k] = v
        elif not k.startswith(unpatched):
            mod = k[: -len(".weight")]
            lora[mod + ".up"] = torch.randn(v.shape[0], rank, *([1, 1] if v.ndim == 4 else []), generator=g) * 0.1
            lora[mod + ".down"] = torch.randn(rank, *v.shape[1:], generator=g) * 0.1
    return lora


def inputs(cfg: ControlNetConfig, batch: int = 2, latent: int = 8, tokens: int = 7, seed: int = 1, dtype=torch.float32):
    """(x, hint, timesteps, context, y) for a forward pass."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g, dtype=dtype)
    hint = torch.rand(batch, cfg.hint_channels, latent * 8, latent * 8, generator=g, dtype=dtype)
    t = torch.tensor([999.0, 10.0, 500.0, 250.0][:batch], dtype=dtype)
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g, dtype=dtype)
    y = torch.randn(batch, cfg.adm_in_channels, generator=g, dtype=dtype) if cfg.adm_in_channels else None
    return x, hint, t, ctx, y


def save(path: Path, sd: dict, metadata: Optional[dict] = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def comfy_unet_kwargs(cfg: ControlNetConfig) -> dict:
    """ComfyUI UNetModel arguments for the UNet whose encoder `cfg` describes."""
    depth = [d for level, d in enumerate(cfg.transformer_depth) for _ in range(cfg.num_res_blocks[level])]
    depth_out = [d for level, d in enumerate(cfg.transformer_depth) for _ in range(cfg.num_res_blocks[level] + 1)]
    return dict(
        image_size=32, in_channels=cfg.in_channels, model_channels=cfg.model_channels, out_channels=cfg.in_channels,
        num_res_blocks=list(cfg.num_res_blocks), channel_mult=list(cfg.channel_mult), transformer_depth=depth,
        transformer_depth_output=depth_out, transformer_depth_middle=cfg.transformer_depth_middle, context_dim=cfg.context_dim,
        num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels, use_linear_in_transformer=cfg.use_linear_in_transformer,
        use_spatial_transformer=True, legacy=False, adm_in_channels=cfg.adm_in_channels,
        num_classes="sequential" if cfg.adm_in_channels else None,
    )


def comfy_unet(cfg: ControlNetConfig, seed: int = 0, dtype=torch.float32):
    """A random-weight ComfyUI UNet (the real host's class) of the family `cfg` describes."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**comfy_unet_kwargs(cfg), dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init)
    return randomize_(unet, seed).eval()


def comfy_cldm(cfg: ControlNetConfig, dtype=torch.float32, **extra):
    """ComfyUI's own `comfy.cldm.cldm.ControlNet` with the same architecture."""
    import comfy.ops
    from comfy.cldm.cldm import ControlNet as ComfyControlNet

    kw = comfy_unet_kwargs(cfg)
    for k in ("out_channels", "transformer_depth_output"):
        kw.pop(k)
    return ComfyControlNet(hint_channels=cfg.hint_channels, **kw, **extra, dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init).eval()


def comfy_control_outputs(model, x, hint, t, ctx, y):
    """(down list, mid) from ComfyUI's cldm forward in either host version (flat list or dict)."""
    out = model(x, hint, t, ctx, y)
    if isinstance(out, dict):
        return list(out["output"]), out["middle"][0]
    return list(out[:-1]), out[-1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def comfy_control_dict(res):
    """ControlResiduals -> the dict ComfyUI's UNet pops from (fresh lists; 'input' reversed)."""
    return {"input": list(reversed(res.input)), "middle": [res.mid], "output": list(res.down)}


def photo(seed: int, h: int, w: int):
    """Smooth random uint8 RGB image (H, W, 3) as a numpy array: structure at several scales, like a photo (the
    annotator tests' input)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    small = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def to_tensor(imgs) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> a (B, 3, H, W) float batch in [0, 1]."""
    return torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in imgs]).float() / 255.0
