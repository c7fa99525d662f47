"""The one place that knows ComfyUI's ControlNet protocol: a `ControlBase` subclass over `controlnet_core`.

ComfyUI calls, per sampling run: `get_models`, `pre_run` (once per cond entry: must be idempotent),
`get_control` once per step, then `cleanup`. `get_control` returns fresh lists every call, since
the UNet pops them: 'output' in input-block order (popped from the end, matching the skip
connections), 'middle' as [residual], 'input' reversed (T2I-Adapters). `t` is sigma.
SD3-family MMDiTs read `output[k]` as tokens added after joint block k (several entries may be one shared tensor).
Works with ComfyUI a28a9dc (4-argument `get_control`) and 0.8.0 (5 arguments).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import comfy.controlnet
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from ..controlnet_core import (
    BaseModelInfo,
    ControlMode,
    ControlNetError,
    ControlResiduals,
    IncompatibleModelError,
    LoadedControl,
    NonFiniteResidualsError,
    ResizeMode,
    TransformerModelInfo,
    all_finite,
    check_compatible,
    check_hint_size,
    flux,
    mask_residuals,
    mode_block_scales,
    prepare_hint,
    qwen,
    scale,
)
from ..controlnet_core.hint import match_batch
from ..controlnet_core.keyframes import KeyframeError, KeyframeState, LatentKeyframes, TimestepKeyframes, weigh_frames
from ..controlnet_core.mmdit import SD3ControlNet, append_keep_mask, hint_latent_from_vae, sd35_stability
from ..controlnet_core.precision import compute_dtype_of
from ..controlnet_core.residuals import add_sites

DIT_KINDS = ("sd3_controlnet", "sd35_controlnet", "flux_controlnet", "qwen_controlnet")
from ..controlnet_core.t2i_adapter import T2IAdapterConfig

ControlBase = comfy.controlnet.ControlBase
log = logging.getLogger(__name__)


def to_comfy(res: ControlResiduals) -> dict:
    """Fresh lists in the order ComfyUI's UNet pops them; DiTs index theirs, so token residuals keep their order."""
    inputs = list(res.input) if res.is_tokens else list(reversed(res.input))
    return {"input": inputs, "middle": [res.mid] if res.mid is not None else [], "output": list(res.down)}


def from_comfy(out: Optional[dict], token_grid: Optional[tuple] = None) -> ControlResiduals:
    """`token_grid`: the control is a DiT's (its lists are indexed by block, not popped)."""
    if not out:
        return ControlResiduals(token_grid=token_grid)
    mid = out.get("middle") or [None]
    inputs = tuple(out.get("input") or ())
    return ControlResiduals(tuple(out.get("output") or ()), mid[0], inputs if token_grid else tuple(reversed(inputs)), token_grid)


def merge_with_previous(out: dict, prev: Optional[dict]) -> dict:
    """Index-aligned sum with the previous control's output (new tensors: the UNet adds in place). Sites that share
    one tensor in both (DiT outputs serving several blocks) share the sum too.

    Not `residuals.add`: `prev` is the host's dict of lists, possibly a foreign control's (ComfyUI's own ControlNet,
    T2I-Adapter, another extension), whose lists cannot be turned back into sites (a DiT's token grid is not in them,
    and UNet 'input' lists are reversed), so the lists are summed index by index, with the same `residuals.add_sites`
    that `add` uses, and shapes left to broadcasting as the host's own merge leaves them."""

    if not prev:
        return out
    for key in ("input", "middle", "output"):
        out[key] = add_sites(out.get(key) or [], prev.get(key) or [], same_shapes=False)
    return out


def base_info(model) -> Optional[Union[BaseModelInfo, TransformerModelInfo]]:
    """What the compatibility check needs, from ComfyUI's BaseModel (None when it cannot tell)."""
    cfg = getattr(getattr(model, "model_config", None), "unet_config", None)
    name = f"the {type(getattr(model, 'model_config', model)).__name__} model"
    if not cfg:
        return None
    if "model_channels" in cfg:
        return BaseModelInfo(cfg["model_channels"], cfg.get("in_channels", 4), cfg.get("context_dim"), cfg.get("adm_in_channels"), name=name)
    net = getattr(model, "diffusion_model", None)
    if net is None:
        return None
    if type(net).__module__.endswith(".mmdit"):  # SD3 / SD3.5: ComfyUI's MMDiT, 64-wide heads, width = 64 x depth
        embedder = (cfg.get("context_embedder_config") or {}).get("params", {})
        return TransformerModelInfo("sd3", name, 64 * cfg["depth"], cfg.get("in_channels"), embedder.get("in_features"), cfg.get("patch_size"))
    if type(net).__module__.endswith(".flux.model") and "hidden_size" in cfg:
        return TransformerModelInfo("flux", name, cfg["hidden_size"], cfg.get("in_channels"), cfg.get("context_in_dim"), cfg.get("patch_size"))
    if type(net).__module__.endswith(".qwen_image.model") and hasattr(net, "img_in") and hasattr(net, "txt_in"):
        return TransformerModelInfo("qwen_image", name, net.img_in.weight.shape[0], net.img_in.weight.shape[1] // 4, net.txt_in.weight.shape[1], 2)
    return TransformerModelInfo(type(net).__module__.rsplit(".", 1)[-1], name)


def needs_vae(control) -> bool:
    """True for a control that reads its condition image through the base model's VAE (SD3 ControlNets, ours or the
    host's; the host only warns when the VAE is missing and then fails inside sampling)."""
    if isinstance(control, SuiteControl):
        return control.is_foreign and needs_vae(control.backend) or (not control.is_foreign and control.backend.takes_latent_hint)
    return getattr(control, "latent_format", None) is not None


def make_patcher(model: torch.nn.Module) -> "comfy.model_patcher.ModelPatcher":
    """Hand our weights to ComfyUI's memory manager, which loads and offloads them like its own."""
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device()
    )


@dataclass(frozen=True)
class UnionConditions:
    """A union ControlNet's conditions for one unit: the apply node's image has `types[0]`; `extra_images[i]` has
    `types[i + 1]`. Images are (B, H, W, C) IMAGE batches, prepared like the main hint."""

    types: tuple[int, ...]
    weights: tuple[float, ...]
    extra_images: tuple[torch.Tensor, ...] = ()


class SuiteControl(ControlBase):
    """One control unit: our loaded model (or ComfyUI's own ControlNet object) + hint, strength, range, mode, mask."""

    def __init__(self, backend: Union[LoadedControl, ControlBase], patcher=None, *, mode=ControlMode.BALANCED,
                 resize_mode=ResizeMode.CROP, mask: Optional[torch.Tensor] = None, name: str = "ControlNet"):
        super().__init__()
        self.backend = backend
        self.patcher = patcher
        self.mode = ControlMode.parse(mode)
        self.resize_mode = ResizeMode.parse(resize_mode)
        self.mask = mask
        self.name = name
        self.model_sampling_current = None
        self._inner: Optional[ControlBase] = None  # configured copy of a foreign backend
        self._prepared: Optional[tuple] = None  # (key, hint tensor) for the current latent size
        self._mask_cache: dict = {}  # resized masks per site, kept across sampling steps
        self._checked_size: Optional[tuple] = None  # the last (height, width, batch) that passed check_hint_size
        self.union: Optional[UnionConditions] = None  # several conditions of a union ControlNet (ControlNet Union (Suite))
        self.timestep_keyframes: Optional[TimestepKeyframes] = None  # strength / weights / mask along the schedule
        self.latent_keyframes: Optional[LatentKeyframes] = None  # strength per frame of the latent batch
        self._schedule = None  # the timestep keyframes bound to this run's percent_to_sigma (pre_run)
        self._keyframe_mask_caches: dict = {}  # per keyframe mask: its resized copies, as _mask_cache
        # an inpainting SD3 ControlNet takes a keep mask after the latent: ComfyUI's inpainting apply node reads this
        # flag and passes the mask as `extra_concat`
        self.concat_mask = not self.is_foreign and getattr(self.backend.config, "extra_conditioning_channels", 0) > 0

    @property
    def is_foreign(self) -> bool:
        return not isinstance(self.backend, LoadedControl)

    # -- configuration (the stock apply nodes call copy().set_cond_hint(...)) --

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None, extra_concat=None):
        self.cond_hint_original = cond_hint
        self.strength = strength
        self.timestep_percent_range = timestep_percent_range
        self.vae = vae
        self.extra_concat_orig = list(extra_concat or [])
        self._prepared = None
        if self.is_foreign:  # the foreign control computes raw residuals; strength, range and mode are ours
            inner = self.backend.copy()
            kwargs = {}
            if vae is not None or extra_concat:
                kwargs = {"vae": vae, "extra_concat": list(extra_concat or [])}
            inner.set_cond_hint(cond_hint, 1.0, (0.0, 1.0), **kwargs)
            inner.set_previous_controlnet(None)
            self._inner = inner
        return self

    def copy(self) -> "SuiteControl":
        c = SuiteControl(self.backend, self.patcher, mode=self.mode, resize_mode=self.resize_mode, mask=self.mask, name=self.name)
        self.copy_to(c)
        c.vae = getattr(self, "vae", None)
        c.union = self.union
        c.timestep_keyframes, c.latent_keyframes = self.timestep_keyframes, self.latent_keyframes
        if self._inner is not None:
            c._inner = self._inner.copy()
        return c

    # -- sampling lifecycle --

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.model_sampling
        # keyframe boundaries compared in sigma with the host's own mapping, as its start/end window
        self._schedule = self.timestep_keyframes.bind(percent_to_timestep_function) if self.timestep_keyframes else None
        if self._inner is not None:
            self._inner.pre_run(model, percent_to_timestep_function)
        elif not self.is_foreign:
            info = base_info(model)
            if info is not None:
                check_compatible(self.backend.config, info, control_name=self.name)
            if isinstance(self.backend.model, sd35_stability.SD35ControlNet):
                self._adopt_base_embedders(model)

    def _adopt_base_embedders(self, model) -> None:
        """Stability's SD3.5 ControlNets use the base model's own patch (or pooled-text) embedding, as the host does."""
        net = model.diffusion_model
        weights = {f"{name}.{k}": v for name in ("x_embedder", "y_embedder") if hasattr(net, name)
                   for k, v in getattr(net, name).state_dict().items()}
        try:
            self.backend.model.adopt_base_embedders(weights)
        except ControlNetError as e:
            raise ControlNetError(f"{self.name}: {e}") from None

    def cleanup(self):
        self.model_sampling_current = None
        self._prepared = None
        self._mask_cache = {}
        self._schedule = None
        self._keyframe_mask_caches = {}
        if self._inner is not None:
            self._inner.cleanup()
        elif not self.is_foreign and hasattr(self.backend.model, "clear_hint_cache"):
            self.backend.model.clear_hint_cache()
        super().cleanup()

    def get_models(self):
        out = super().get_models()
        if self.patcher is not None:
            out.append(self.patcher)
        if self._inner is not None:
            out += self._inner.get_models()
        return out

    # -- the step --

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None):
        prev = None
        if self.previous_controlnet is not None:
            if transformer_options is None:  # ComfyUI a28a9dc passes 4 arguments
                prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number)
            else:
                prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return prev
        if self.strength == 0:
            return prev
        state = self._keyframe_state(t)
        strength = self.strength * state.strength  # x 1.0 (no keyframe in effect) is exact
        frames = self._frame_strengths(x_noisy, batched_number)
        if strength == 0 or (frames is not None and not bool(frames.any())):
            return prev  # off for this call: the same exact no-op as outside start/end
        self._check_size(x_noisy)
        res = self._raw_residuals(x_noisy, t, cond, batched_number, transformer_options)
        if not all_finite(res):
            raise self._non_finite(x_noisy, t)
        res = self._scale(res, strength, state)
        res = mask_residuals(res, self.mask, batched_number, self._mask_cache)
        if state.mask is not None:
            res = mask_residuals(res, state.mask, batched_number, self._keyframe_mask_caches.setdefault(id(state.mask), {}))
        if frames is not None:
            res = weigh_frames(res, frames)
        res = res.to(x_noisy.dtype)
        return merge_with_previous(to_comfy(res), prev)

    # -- keyframes (controlnet_core.keyframes; the nodes are in keyframe_nodes.py) --

    def _keyframe_state(self, t) -> KeyframeState:
        if self._schedule is None:
            return KeyframeState()
        sigma = float(t.flatten()[0])
        state = self._schedule.at(sigma)
        log.debug("%s: timestep keyframe %d in effect at sigma %.6g, strength x %.6g", self.name, state.index, sigma, state.strength)
        return state

    def _frame_strengths(self, x_noisy, batched_number) -> Optional[torch.Tensor]:
        """Per-item multipliers of this call's batch from the latent keyframes; None where every frame gets 1 (nothing to
        multiply, so the result stays bit-identical to a unit without latent keyframes)."""
        if self.latent_keyframes is None:
            return None
        try:
            m = self.latent_keyframes.multipliers(x_noisy.shape[0], batched_number)
        except KeyframeError as e:
            raise KeyframeError(f"{self.name}: {e}") from None
        log.debug("%s: latent keyframe strengths %s", self.name, m.tolist())
        return None if bool((m == 1).all()) else m

    def _scale(self, res: ControlResiduals, strength: float, state: KeyframeState) -> ControlResiduals:
        """Strength and per-site weights: a keyframe's block weights replace the control mode's."""
        if state.block_weights is None:
            return scale(res, strength, mode_block_scales(self.mode, res))
        try:
            return scale(res, strength, state.block_weights)
        except ValueError as e:
            raise KeyframeError(f"{self.name}: the block_weights of Timestep Keyframe (Suite) (keyframe {state.index}) do not fit: {e} "
                                "Give one comma-separated number per site, or leave block_weights empty for the control mode's weights.") from None

    def _check_size(self, x_noisy) -> None:
        """The hint's memory bound, for our models and foreign ones alike (both make the hint at the pixel size)."""
        conditions = 1 + (len(self.union.extra_images) if self.union is not None else 0)
        size = (x_noisy.shape[-2] * 8, x_noisy.shape[-1] * 8, x_noisy.shape[0] * conditions)
        if size != self._checked_size:
            check_hint_size(*size, who=self.name)
            self._checked_size = size

    def _non_finite(self, x_noisy, t) -> NonFiniteResidualsError:
        """Why stop: NaN residuals make an all-black image that the host reports as a success."""
        sigma = float(t.flatten()[0])
        if not bool(torch.isfinite(x_noisy).all()):
            return NonFiniteResidualsError(
                f"{self.name}: the latent it was given at sigma {sigma:.4g} already holds NaN or inf, so its residuals do too. "
                "The base model or an earlier node made it: check the model's precision (try --force-fp32 or bf16) and the "
                "input latent.")
        dtype = compute_dtype_of(self.backend.model) if not self.is_foreign else None
        return NonFiniteResidualsError(
            f"{self.name}: its residuals turned NaN or infinite at sigma {sigma:.4g} from a finite latent"
            f"{f' (weights in {dtype})' if dtype is not None else ''}. The image would come out black, so sampling stopped. "
            "This is a numeric overflow: load the ControlNet in a wider precision (fp32 or bf16 rather than fp16), or lower "
            "strength; if it persists the file's weights are out of range, so download it again.")

    def _hint_for(self, x_noisy, batched_number) -> torch.Tensor:
        cfg = self.backend.config
        h, w = x_noisy.shape[-2] * 8, x_noisy.shape[-1] * 8
        if isinstance(cfg, T2IAdapterConfig):
            u = cfg.unshuffle
            h, w = -(-h // u) * u, -(-w // u) * u
        key = (x_noisy.shape[0], h, w, batched_number)
        if self._prepared is None or self._prepared[0] != key:
            def prepared(image):
                return prepare_hint(image, h, w, cfg.hint_channels, x_noisy.shape[0], self.resize_mode, batched_number).to(x_noisy.device)

            hint = prepared(self.cond_hint_original)
            if self.union is not None and self.union.extra_images:
                hint = [hint] + [prepared(img.movedim(-1, 1)) for img in self.union.extra_images]
            self._prepared = (key, hint)
        return self._prepared[1]

    def _latent_hint_for(self, x_noisy, batched_number) -> torch.Tensor:
        """The condition image through the base model's VAE, once per latent size (not per step): resized to the
        latent's pixel size as `resize_mode` says, encoded, scaled, plus the keep mask of an inpainting ControlNet."""
        cfg = self.backend.config
        h, w = x_noisy.shape[-2:]
        key = ("latent", x_noisy.shape[0], h, w, batched_number)
        if self._prepared is not None and self._prepared[0] == key:
            return self._prepared[1]
        if self.vae is None:
            raise ControlNetError(f"{self.name} is a DiT ControlNet that reads the condition image through the model's VAE, "
                                  "but no VAE was connected. Connect the checkpoint loader's VAE to the apply node's 'vae' input.")
        latent_channels = getattr(cfg, "latent_channels", cfg.in_channels)  # Flux configs count packed channels
        image = self.cond_hint_original
        pixels = prepare_hint(image, h * 8, w * 8, 3, image.shape[0], self.resize_mode)
        stability = isinstance(self.backend.model, sd35_stability.SD35ControlNet)
        if stability:  # how these were trained to see each control type
            pixels = sd35_stability.prepare_pixels(pixels, cfg.control_type)
        loaded = _currently_loaded()
        latent = self.vae.encode(pixels.movedim(1, -1))
        if loaded is not None:  # the VAE may have pushed the sampling models out: bring them back, as the host does
            comfy.model_management.load_models_gpu(loaded)
        if tuple(latent.shape[-2:]) != (h, w) or latent.shape[1] != latent_channels:
            raise ControlNetError(f"{self.name}: the VAE made a latent of shape {list(latent.shape)} from the condition image; this "
                                  f"ControlNet needs [batch, {latent_channels}, {h}, {w}]. Connect the VAE of the model being sampled.")
        if stability:
            hint = sd35_stability.hint_latent_from_vae(latent.float())
        elif self.backend.kind == "flux_controlnet":
            hint = flux.hint_latent_from_vae(latent.float())
        elif self.backend.kind == "qwen_controlnet":  # the Wan 2.1 VAE gives (B, 16, 1, h, w): one frame
            hint = qwen.hint_latent_from_vae(latent.float())
            hint = hint[:, :, 0] if hint.ndim == 5 else hint
        else:
            hint = hint_latent_from_vae(latent.float())
        if getattr(cfg, "extra_conditioning_channels", 0):
            keep = None
            if self.extra_concat_orig:  # ComfyUI's inpainting apply node: 1 - mask, at the image's size
                keep = self.extra_concat_orig[0].float().to(hint.device)
                keep = comfy.utils.common_upscale(keep.reshape(-1, 1, *keep.shape[-2:]), w, h, self.upscale_algorithm, "center")
                keep = match_batch(keep, hint.shape[0], "inpainting mask")
            hint = append_keep_mask(hint, keep)
        hint = match_batch(hint, x_noisy.shape[0], "hint", batched_number)
        dtype = compute_dtype_of(self.backend.model)
        self._prepared = (key, hint.to(device=x_noisy.device, dtype=dtype))
        return self._prepared[1]

    def _raw_residuals(self, x_noisy, t, cond, batched_number, transformer_options) -> ControlResiduals:
        if self._inner is not None:
            if transformer_options is None:
                out = self._inner.get_control(x_noisy, t, cond, batched_number)
            else:
                out = self._inner.get_control(x_noisy, t, cond, batched_number, transformer_options)
            tokens = out and any(r is not None and r.ndim == 3 for v in out.values() for r in v)  # a foreign DiT control
            return from_comfy(out, _token_grid(x_noisy, 2) if tokens else None)
        ms = self.model_sampling_current
        timesteps = ms.timestep(t).float()
        x_in = ms.calculate_input(t, x_noisy)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        if self.backend.kind == "flux_controlnet":
            return self._flux_residuals(x_in, timesteps, context, cond, x_noisy, batched_number)
        if self.backend.kind == "qwen_controlnet":
            return self._qwen_residuals(x_in, timesteps, context, x_noisy, batched_number)
        if self.backend.kind in DIT_KINDS:
            return self._sd3_residuals(x_in, timesteps, context, cond.get("y"), x_noisy, batched_number)
        return self.backend.residuals(x_in, self._hint_for(x_noisy, batched_number), timesteps, context, cond.get("y"), **self._union_args())

    def _sd3_residuals(self, x_in, timesteps, context, y, x_noisy, batched_number) -> ControlResiduals:
        """SD3-family controls: ComfyUI's MMDiT adds `output[k]` to its image tokens after joint block k."""
        model = self.backend.model
        cfg = model.config
        dtype = compute_dtype_of(model)
        hint = self._latent_hint_for(x_noisy, batched_number)
        if isinstance(model, SD3ControlNet):
            sites = model(x_in.to(dtype), hint, timesteps, context.to(device=x_in.device, dtype=dtype)).host_output(cfg.base_depth)
        else:  # Stability SD3.5: reads the pooled text, not the tokens
            if y is None:
                raise ControlNetError(f"{self.name}: the conditioning has no pooled text vector ('y'); SD3.5 ControlNets need the "
                                      "output of the SD3.5 text encoders (CLIPTextEncode with an SD3.5 CLIP).")
            outputs = model(x_in.to(dtype), hint, timesteps, y.to(device=x_in.device, dtype=dtype))
            sites = sd35_stability.host_output_list(outputs, cfg.base_depth)
        return ControlResiduals(tuple(sites), token_grid=_token_grid(x_noisy, cfg.patch_size))

    def _union_args(self) -> dict:
        """The type that ComfyUI's SetUnionControlNetType node stored (`extra_args`), for union files only: the core
        ignores it on other ControlNets, and so do we."""
        if self.union is not None:
            return {"control_types": list(self.union.types), "condition_weights": list(self.union.weights)}
        types = getattr(self, "extra_args", {}).get("control_type")
        if types and getattr(self.backend.config, "union_types", 0):
            return {"control_types": list(types)}
        return {}


    def _pixel_hint_for(self, x_noisy, batched_number) -> torch.Tensor:
        """XLabs / MistoLine Flux ControlNets: the condition image itself at the latent's pixel size, 0..1."""
        h, w = x_noisy.shape[-2] * 8, x_noisy.shape[-1] * 8
        key = ("pixels", x_noisy.shape[0], h, w, batched_number)
        if self._prepared is None or self._prepared[0] != key:
            dtype = compute_dtype_of(self.backend.model)
            hint = prepare_hint(self.cond_hint_original, h, w, 3, x_noisy.shape[0], self.resize_mode, batched_number)
            self._prepared = (key, hint.to(device=x_noisy.device, dtype=dtype))
        return self._prepared[1]

    def _flux_residuals(self, x_in, timesteps, context, cond, x_noisy, batched_number) -> ControlResiduals:
        """ComfyUI's Flux adds `input[k]` after double block k and `output[k]` after single block k (image tokens)."""
        model = self.backend.model
        dtype = compute_dtype_of(model)
        hint = self._latent_hint_for(x_noisy, batched_number) if self.backend.takes_latent_hint else self._pixel_hint_for(x_noisy, batched_number)
        cast = lambda t: None if t is None else t.to(device=x_in.device, dtype=dtype)  # noqa: E731
        types = getattr(self, "extra_args", {}).get("control_type") or []  # ComfyUI's SetUnionControlNetType on a union file
        mode = types[0] if types and model.config.num_modes else None
        union = {"control_mode": mode} if mode is not None else {}  # XLabs / MistoLine take no mode
        out = model(x_in.to(dtype), hint, timesteps, cast(context), cast(cond.get("y")), cast(cond.get("guidance")), **union)
        sites = out.host_control()
        return ControlResiduals(tuple(sites.get("output") or ()), input=tuple(sites.get("input") or ()),
                                token_grid=_token_grid(x_noisy, flux.config.PATCH))


    def _qwen_residuals(self, x_in, timesteps, context, x_noisy, batched_number) -> ControlResiduals:
        """ComfyUI's Qwen-Image adds `input[k]` after transformer block k (60 slots), to the image tokens."""
        model = self.backend.model
        dtype = compute_dtype_of(model)
        hint = self._latent_hint_for(x_noisy, batched_number)
        out = model(x_in.to(dtype), hint, timesteps, context.to(device=x_in.device, dtype=dtype))
        return ControlResiduals(input=tuple(out.host_control()["input"]), token_grid=_token_grid(x_noisy, 2))


def _token_grid(x_noisy: torch.Tensor, patch: int) -> tuple[int, int]:
    """Rows and columns of image tokens a DiT makes of this latent (the host pads odd sizes up to whole patches)."""
    return -(-x_noisy.shape[-2] // patch), -(-x_noisy.shape[-1] // patch)


def _currently_loaded() -> list:
    """The models the sampler has loaded (to reload them after the VAE), without entries whose model was already
    freed: the host's list holds weak references, and one that died reads as None and breaks `load_models_gpu`."""
    if not hasattr(comfy.model_management, "loaded_models"):
        return None
    return [m for m in comfy.model_management.loaded_models(only_currently_used=True) if m is not None]

__all__ = ["SuiteControl", "needs_vae", "UnionConditions", "to_comfy", "from_comfy", "merge_with_previous", "make_patcher", "base_info", "IncompatibleModelError"]
