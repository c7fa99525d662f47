"""Random-weight Flux ControlNet files at the full Flux.1 width (3072 = 24 heads of 128), written tensor by tensor.

A 1-block full-width Flux ControlNet is already 0.4-0.5 G parameters and a published one 2-3 G, so these files are
never built as a module: the key names and shapes come from our model built on the `meta` device, and each tensor
is drawn, cast to the stored dtype and written before the next one is drawn (`write_safetensors`), so writing takes
the memory of one tensor. Used by tests/test_flux_fullsize.py and bench/bench_flux_load_memory.py.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, Mapping

import torch

# safetensors' dtype names for what these files store
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}


def full_width_config(layout: str, double: int, single: int = 0, *, guidance: bool = True, modes: int = 0):
    """A `FluxControlNetConfig` of Flux.1's own widths (3072, T5-XXL 4096, CLIP-L 768, MLP 12288)."""
    from controlnet_core.flux import FluxControlNetConfig

    return FluxControlNetConfig(layout=layout, num_layers=double, num_single_layers=single, guidance_embeds=guidance, num_modes=modes)


def shapes_of(config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the checkpoint `config` describes (our classes use the checkpoints' key names)."""
    from controlnet_core.flux import build_flux_controlnet

    with torch.device("meta"):
        model = build_flux_controlnet(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """float32 values of a sane scale (like tests/factories.randomize_): norm scales near 1, biases near 0, weights
    N(0, 1 / fan_in), so activations keep their size through a 3072-wide block."""
    if len(shape) == 1:
        leaf = name.rsplit(".", 2)
        is_norm = name.endswith(".scale") or ("norm" in name and name.endswith("weight") and "linear" not in leaf[-2])
        return (1.0 if is_norm else 0.0) + 0.1 * torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator).div_(math.sqrt(fan_in))


def write_safetensors(path: Path, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype,
                      make: Callable[[str, tuple[int, ...]], torch.Tensor]) -> int:
    """Write a .safetensors file of `shapes`, every tensor `make(name, shape)` cast to `dtype`, one at a time.
    Returns the bytes of tensor data written."""
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * size
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes.items():
            t = make(name, shape).to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), name
            f.write(t.view(torch.uint8).numpy().data)
            del t
    return offset


def write_random_file(path: Path, config, dtype: torch.dtype, seed: int = 0) -> Path:
    """A random-weight file of the config's layout and shapes, stored in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    write_safetensors(path, shapes_of(config), dtype, lambda name, shape: random_tensor(name, shape, g))
    return path


def convert_file(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """The same tensors stored in another dtype (e.g. float8_e4m3fn, as fp8 Flux ControlNets are shipped)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        write_safetensors(dst, shapes, dtype, lambda name, shape: f.get_tensor(name))
    return dst
