"""Save a loaded control model: in the layout it came from (`save_native`), or a UNet-family ControlNet as v1.1-layout
safetensors (`save_ldm`) or as a diffusers folder (`save_diffusers`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import check_output_file, save_safetensors, write_atomically
from .errors import ControlNetError, OutputPathError
from .formats import diffusers as diffusers_fmt
from .formats import get_format
from .formats import ldm as ldm_fmt
from .formats import t2i as t2i_fmt
from .loader import METADATA_CONFIG, METADATA_GAP, LoadedControl
from .model import ControlNet
from .t2i_adapter import T2IAdapter

PathLike = Union[str, os.PathLike]


def _model(obj) -> torch.nn.Module:
    return obj.model if isinstance(obj, LoadedControl) else obj


def _state(model: torch.nn.Module, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None else v).detach().cpu() for k, v in model.state_dict().items()}


def check_output(path: PathLike, *, folder: bool, overwrite: bool) -> None:
    """Refuse an output before any work: a file where a folder is, or an existing result unless `overwrite`.

    folder: the output is a diffusers folder (`save_diffusers`), else one file (`save_ldm`)."""
    path = Path(path)
    if not folder:
        check_output_file(path, overwrite)
    elif path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: is a file; a diffusers model is saved as a folder (config.json + diffusion_pytorch_model.safetensors).")
    elif path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputPathError(f"{path}: is a folder that is not empty; choose another folder, or overwrite its model (--overwrite).")


def save_ldm(control, path: PathLike, *, prefix: str = ldm_fmt.CONTROL_PREFIX, dtype: Optional[torch.dtype] = None,
             overwrite: bool = False) -> Path:
    """v1.1 layout (`control_model.*`), readable by this library, ComfyUI and sd-webui-controlnet.

    T2I-Adapters are saved in their original layout (no prefix). An existing folder at `path` is always refused, and
    an existing file too (`OutputPathError`, before any work) unless `overwrite=True`. The file is written to
    `<path>.part` and renamed into place, so a failed save leaves the old file as it was and no `.part`.
    """
    check_output(path, folder=False, overwrite=overwrite)
    model = _model(control)
    sd = _state(model, dtype)
    meta = {"format": "pt"}
    if isinstance(model, ControlNet):
        sd = {prefix + k: v for k, v in sd.items()}
        meta[METADATA_CONFIG] = model.config.to_json()
        meta[METADATA_GAP] = str(model.config.global_average_pooling).lower()
    elif not isinstance(model, T2IAdapter):
        raise ControlNetError(f"cannot export a {type(model).__name__}; expected a ControlNet or T2IAdapter.")
    path = Path(path)
    save_safetensors(sd, path, meta, overwrite=overwrite)
    return path


def save_diffusers(control, directory: PathLike, *, dtype: Optional[torch.dtype] = None, addition_time_embed_dim: int = 256,
                   overwrite: bool = False) -> Path:
    """A diffusers folder: `diffusion_pytorch_model.safetensors` + `config.json`, each written atomically.

    addition_time_embed_dim: SDXL only, the width of each size embedding inside `y` (256 for SDXL).
    overwrite: a folder that is not empty is refused (`OutputPathError`, before any work) unless this is True; then
        its two model files are replaced, each through a `.part` file and a rename.
    """
    check_output(directory, folder=True, overwrite=overwrite)
    model = _model(control)
    directory = Path(directory)
    sd = _state(model, dtype)
    if isinstance(model, ControlNet):
        names = diffusers_fmt.from_canonical_map(model.config, sd.keys())
        cfg = diffusers_fmt.config_json(model.config, addition_time_embed_dim)
    elif isinstance(model, T2IAdapter):
        names = t2i_fmt.to_diffusers_map(sd.keys(), model.config.light)
        c = model.config
        cfg = {"_class_name": "T2IAdapter", "adapter_type": "light_adapter" if c.light else ("full_adapter_xl" if c.xl else "full_adapter"),
               "channels": list(c.channels), "in_channels": c.hint_channels, "num_res_blocks": c.nums_rb, "downscale_factor": c.unshuffle}
    else:
        raise ControlNetError(f"cannot export a {type(model).__name__}; expected a ControlNet or T2IAdapter.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{directory}: the folder could not be made ({e.strerror or e}).") from None
    save_safetensors({names[k]: v for k, v in sd.items()}, directory / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    text = json.dumps(cfg, indent=2, sort_keys=True)
    write_atomically(directory / "config.json", lambda tmp: tmp.write_text(text))
    return directory


def save_native(control: LoadedControl, path: PathLike, *, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> Path:
    """Write `control` back in the layout it was loaded from (its format record's `save`), so a round trip gives the
    same keys and values. Refuses an existing output unless `overwrite=True`, like the other savers."""
    fmt = get_format(control.format)
    if fmt.save is None:
        raise ControlNetError(
            f"{control.source}: '{fmt.name}' files ({fmt.description}) are read only here; save the loaded model with "
            "save_ldm (v1.1 layout) or save_diffusers instead.")
    return fmt.save(control.model, Path(path), dtype, overwrite)
