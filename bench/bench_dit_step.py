"""One controlled sampling step of the DiT families through the real host: our ControlNet vs ComfyUI's built-in one.

Families: SD3 (diffusers layout, InstantX-style), Stability's SD3.5 ControlNets, Flux InstantX, Flux XLabs, Qwen-Image
InstantX, Qwen-Image DiffSynth blockwise patches. For each, one base model (ComfyUI's own MMDiT / Flux / Qwen-Image
classes, random weights), one random-weight ControlNet file, and three ways to sample it with ComfyUI's own `KSampler`
node (euler, 3 steps):
- ours: the file through Load ControlNet (Suite) + Apply ControlNet (Suite) (balanced mode, strength 1);
- built-in: ComfyUI's own ControlNet object for the same file + its `ControlNetApplyAdvanced`. SD3 / SD3.5 files go
  through ComfyUI's `ControlNetLoader`; for Flux its loader only accepts Flux.1's full width (3072), so its objects
  are built directly at the bench's width the way its `load_controlnet_flux_*` functions build them (as
  tests/comfy_flux.py does);
- plain: no ControlNet.
Qwen-Image InstantX files are built like Flux's (the host's detection fixes width 3072); the DiffSynth patches are model
patches: ours through Load ControlNet (Suite) + Apply ControlNet Patch (Suite), the built-in through ComfyUI's
`QwenImageDiffsynthControlnet` on its own `QwenImageBlockWiseControlNet` holding the same weights (MODEL in, MODEL out,
so the patch runs inside the base model and "ControlNet = step - base" does not apply).
Timed: every call of ComfyUI's `calc_cond_batch` (one sampling step: the ControlNet's `get_control` plus the base
model, cond and uncond batched) through the host's own wrapper API (`WrappersMP.CALC_COND_BATCH`), and inside it the
base model's `apply_model` (`WrappersMP.APPLY_MODEL`), so "ControlNet" = step - base. The first step of every run also
encodes the hint (VAE, once per run) and is left out. Runs are interleaved ours / built-in / plain; medians.

FLOP floor: a ControlNet adds its own blocks to every step. All blocks here (SD3 joint blocks, Flux double and single
blocks, SD3.5 DiT blocks) cost the same per token they process (12 w^2 multiply-adds, w = width, plus attention), so:
- SD3 diffusers layout, n joint blocks on a base of depth d, both over image + text tokens: (d + n) / d;
- Stability SD3.5, n DiT blocks over the image tokens only: 1 + n * N_img / (d * (N_img + N_txt));
- Flux, base D double + S single blocks, ControlNet n_d + n_s blocks, all over image + text tokens:
  (D + S + n_d + n_s) / (D + S);
- Qwen-Image InstantX, n blocks on a base of D, all over image + text tokens: (D + n) / D;
- Qwen-Image DiffSynth, one small block per base block (two w x w projections, 2 w^2 per image token, against the base
  block's 12 w^2 per image and text token): 1 + N_img / (6 (N_img + N_txt));
- Z-Image Fun (2.1), n control layers plus r refiner-control layers, each a transformer block over the image tokens,
  on a base of D main blocks over image + caption tokens and 2 noise-refiner + 2 context-refiner blocks over their
  own tokens: 1 + (n + r) N_img / (D (N_img + N_txt) + 2 N_img + 2 N_txt).
Z-Image Fun's built-in is ComfyUI's `ZImageFunControlnet` node, which only hosts from 0.8.0 have
(`VENV=.venv-new COMFYUI_PATH=... .venv-new/bin/python bench/bench_dit_step.py --families zimage-fun`); its base and
files are the tests' tiny in-process ones (tests/comfy_zimage.py: width 256, 16 blocks, 2 control layers).
plus the hint embedding (a linear projection of the latent hint; XLabs: a pixel-space conv encoder at 8x the latent's
size) and the ControlNet's own text / time embedders. Printed for the bench's shapes and the published ones, next to
the FLOPs `torch.utils.flop_counter` counts in one step of each kind.

    .venv/bin/python bench/bench_dit_step.py [--families sd3 flux-instantx ...] [--reps 5] [--size 384] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import machine

FAMILIES = ("sd3", "sd35", "flux-instantx", "flux-xlabs", "qwen-instantx", "qwen-diffsynth", "zimage-fun")
SD3_TEXT, FLUX_TEXT = 154, 128  # text tokens: SD3 77 CLIP + 77 T5 (published: 77 + 256); Flux 128 T5 (schnell 256, dev 512)
QWEN_TEXT, QWEN_CONTEXT = 128, 512  # Qwen2.5-VL tokens of a short prompt after the template; text width (published 3584)
QWEN_AXES = (16, 56, 56)


@dataclass
class Case:
    family: str
    model: object  # ComfyUI ModelPatcher (with the timing wrappers)
    vae: object
    pos: list
    neg: list
    latent: dict
    cfg: float
    ours: object  # the SuiteControl our loader node returns
    builtin: object  # ComfyUI's own ControlNet object
    shape: str  # one line: base and ControlNet
    floor: float  # the block-count floor at the bench's shape
    published: str  # the same for a published shape
    models: dict | None = None  # model patches: kind -> the patched MODEL (the conditioning is then the same for all)


# -- base models and files ---------------------------------------------------------------------------------------


def _randomized(module, seed):
    from factories import randomize_

    return randomize_(module, seed).eval()


def sd3_checkpoint(path: Path, depth: int, context: int, grid: int, seed: int = 60) -> Path:
    """ComfyUI's own MMDiT of `depth` joint blocks (width 64 x depth, heads of 64) plus a 16-channel TAESD as VAE,
    saved as a checkpoint CheckpointLoaderSimple detects as SD3 (as tests/host.make_tiny_sd3_checkpoint, any depth)."""
    import comfy.ops
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed
    from factories import save

    width = 64 * depth
    base = OpenAISignatureMMDITWrapper(
        depth=depth, in_channels=16, out_channels=16, patch_size=2, adm_in_channels=2048, pos_embed_max_size=grid, num_patches=grid ** 2,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": context, "out_features": width}},
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    _randomized(base, seed)
    # `pos_embed` is a buffer made with torch.empty, which randomize_ (parameters only) leaves as whatever the memory
    # held: sometimes NaN. SD3's own fixed sin-cos grid instead.
    base.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(width, grid)).float()[None])
    vae = _randomized(comfy.taesd.taesd.TAESD(latent_channels=16), seed + 1)
    sd = {"model.diffusion_model." + k: v for k, v in base.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    return save(path, sd)


def sd3_controlnet_file(path: Path, width: int, blocks: int, context: int, grid: int, seed: int = 62) -> Path:
    from factories import save

    from controlnet_core.mmdit import SD3ControlNet, SD3ControlNetConfig

    cfg = SD3ControlNetConfig(hidden_size=width, num_layers=blocks, pooled_projection_dim=2048, joint_attention_dim=context,
                              pos_embed_max_size=grid, mlp_hidden_dim=4 * width)
    return save(path, _randomized(SD3ControlNet(cfg), seed).state_dict())


def sd35_controlnet_file(path: Path, width: int, blocks: int, control_type: int = 2, seed: int = 63) -> Path:
    """Stability's release layout (no patch embedding: the base's is adopted), as tests/host.tiny_sd35_controlnet."""
    from factories import save

    from controlnet_core.mmdit.sd35_stability import SD35ControlNet, SD35ControlNetConfig

    sd = _randomized(SD35ControlNet(SD35ControlNetConfig(hidden_size=width, num_layers=blocks, mlp_hidden_dim=4 * width)), seed).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("x_embedder.")}
    sd["control_type"] = torch.tensor([float(control_type)])
    return save(path, sd)


def flux_params(width: int, double: int, single: int) -> dict:
    """ComfyUI FluxParams of Flux.1 (heads of 128, its rotary split, T5-XXL and CLIP-L widths) at another width / depth."""
    return dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=width, mlp_ratio=4.0,
                num_heads=width // 128, depth=double, depth_single_blocks=single, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                qkv_bias=True, guidance_embed=True)


def flux_base(width: int, double: int, single: int, seed: int = 64):
    """(ModelPatcher, VAE): ComfyUI's Flux dev-like base (guidance embedded) built in-process, as tests/comfy_flux.tiny_flux."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    with torch.no_grad():
        base = comfy.supported_models.Flux({"image_model": "flux", **flux_params(width, double, single)}).get_model({})
    _randomized(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    vae = comfy.sd.VAE(sd=_randomized(comfy.taesd.taesd.TAESD(latent_channels=16), seed + 1).state_dict())
    return model, vae


def flux_instantx_file(path: Path, width: int, double: int, single: int, seed: int = 65) -> Path:
    from factories import save

    from controlnet_core.flux import FluxControlNetConfig, build_flux_controlnet

    cfg = FluxControlNetConfig(layout="instantx", hidden_size=width, num_layers=double, num_single_layers=single,
                               mlp_hidden_dim=4 * width, guidance_embeds=True)
    return save(path, _randomized(build_flux_controlnet(cfg), seed).state_dict())


def flux_xlabs_file(path: Path, width: int, double: int, seed: int = 66) -> Path:
    """ComfyUI's own XLabs class (random weights) saved under its key names."""
    import comfy.ldm.flux.controlnet
    import comfy.ops
    from factories import save

    net = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu",
                                                  **flux_params(width, double, 0))
    return save(path, _randomized(net, seed).state_dict())


def flux_builtin(path: Path, width: int):
    """ComfyUI's ControlNet object for a Flux file, built as `load_controlnet_flux_instantx` / `_xlabs_mistoline` build
    it but at the file's width (its own loader takes the width from Flux.1 detection: 3072 only)."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.flux.controlnet
    import comfy.model_detection
    import comfy.ops
    from safetensors.torch import load_file

    sd = load_file(str(path))
    kw = dict(operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    if "controlnet_x_embedder.weight" in sd:
        new = comfy.model_detection.convert_diffusers_mmdit(dict(sd), "")
        for k, v in sd.items():
            new.setdefault(k, v)
        double = sum(1 for k in sd if k.startswith("transformer_blocks.") and k.endswith(".norm1.linear.weight"))
        single = sum(1 for k in sd if k.startswith("single_transformer_blocks.") and k.endswith(".norm.linear.weight"))
        channels = new["pos_embed_input.weight"].shape[1] // 4
        net = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, num_union_modes=0, control_latent_channels=channels,
                                                      **kw, **flux_params(width, double, single))
        net.load_state_dict({k: v for k, v in new.items() if k in net.state_dict()}, strict=True)
        return comfy.controlnet.ControlNet(net, compression_ratio=1, latent_format=comfy.latent_formats.Flux(), concat_mask=False,
                                           load_device=torch.device("cpu"), manual_cast_dtype=None, extra_conds=["y", "guidance"])
    double = sum(1 for k in sd if k.startswith("double_blocks.") and k.endswith(".img_attn.qkv.weight"))
    net = comfy.ldm.flux.controlnet.ControlNetFlux(**kw, **flux_params(width, double, 0))
    net.load_state_dict(sd, strict=True)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"), manual_cast_dtype=None, extra_conds=["y", "guidance"])


def qwen_sizes(width: int) -> dict:
    return dict(attention_head_dim=128, num_attention_heads=width // 128, joint_attention_dim=QWEN_CONTEXT, axes_dims_rope=QWEN_AXES)


def qwen_base(width: int, depth: int, seed: int = 67):
    """(ModelPatcher, VAE): ComfyUI's Qwen-Image base built in-process (as tests/comfy_qwen.tiny_qwen) at this width."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from comfy_qwen import tiny_wan21_vae

    with torch.no_grad():
        base = comfy.supported_models.QwenImage({"image_model": "qwen_image", "num_layers": depth, **qwen_sizes(width)}).get_model({})
    _randomized(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    return model, comfy.sd.VAE(sd=tiny_wan21_vae(seed + 1))


def qwen_instantx_file(path: Path, width: int, blocks: int, seed: int = 68) -> Path:
    from factories import save

    from controlnet_core.qwen import QwenControlNetConfig, build_qwen_controlnet

    cfg = QwenControlNetConfig(hidden_size=width, head_dim=128, num_layers=blocks, hint_channels=64, joint_attention_dim=QWEN_CONTEXT,
                               mlp_hidden_dim=4 * width, axes_dims_rope=QWEN_AXES)
    return save(path, _randomized(build_qwen_controlnet(cfg), seed).state_dict())


def qwen_builtin(path: Path, width: int):
    """ComfyUI's ControlNet object for a Qwen-Image InstantX file, as `load_controlnet_qwen_instantx` builds it, at the
    file's width."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.qwen_image.controlnet
    import comfy.ops
    from safetensors.torch import load_file

    sd = load_file(str(path))
    blocks = sum(1 for k in sd if k.startswith("controlnet_blocks.") and k.endswith(".weight"))
    net = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(
        extra_condition_channels=0, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu", num_layers=blocks,
        image_model="qwen_image", **qwen_sizes(width))
    net.load_state_dict(sd, strict=True)
    return comfy.controlnet.ControlNet(net, compression_ratio=1, latent_format=comfy.latent_formats.Wan21(), concat_mask=False,
                                       load_device=torch.device("cpu"), manual_cast_dtype=None, extra_conds=[])


def qwen_diffsynth_patch(width: int, depth: int, seed: int = 69):
    """ComfyUI's own blockwise patch (what its ModelPatchLoader returns for a DiffSynth file), random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    from comfy_extras.nodes_model_patch import QwenImageBlockWiseControlNet

    net = _randomized(QwenImageBlockWiseControlNet(num_layers=depth, dim=width, additional_in_dim=0, operations=comfy.ops.disable_weight_init), seed)
    return comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


# -- the FLOP floor --------------------------------------------------------------------------------------------


def floor_sd3(d: int, n: int) -> float:
    return (d + n) / d


def floor_sd35(d: int, n: int, img: int, txt: int) -> float:
    return 1 + n * img / (d * (img + txt))


def floor_flux(base_double: int, base_single: int, double: int, single: int) -> float:
    return (base_double + base_single + double + single) / (base_double + base_single)


def floor_zimage(depth: int, n: int, img: int, txt: int) -> float:
    return 1 + n * img / (depth * (img + txt) + 2 * img + 2 * txt)


def floor_qwen_instantx(depth: int, n: int) -> float:
    return (depth + n) / depth


def floor_qwen_diffsynth(img: int, txt: int) -> float:
    return 1 + img / (6 * (img + txt))


PUBLISHED = {
    "sd3": f"published: InstantX SD3 canny, 6 blocks on SD3 medium (24): {floor_sd3(24, 6):.3f}x",
    "sd35": f"published: Stability SD3.5 Large ControlNets, 19 DiT blocks on 38, 1024 px (4096 image + 333 text tokens): "
            f"{floor_sd35(38, 19, 4096, 333):.3f}x",
    "flux-instantx": f"published: InstantX canny / depth 5 + 10 on Flux.1 19 + 38: {floor_flux(19, 38, 5, 10):.3f}x; "
                     f"Union Pro 2.0 6 + 0: {floor_flux(19, 38, 6, 0):.3f}x",
    "flux-xlabs": f"published: XLabs v3, 2 double blocks on Flux.1 19 + 38: {floor_flux(19, 38, 2, 0):.3f}x + the pixel hint encoder",
    "qwen-instantx": f"published: InstantX Qwen-Image ControlNets, 5 blocks on 60: {floor_qwen_instantx(60, 5):.3f}x",
    "qwen-diffsynth": f"published: DiffSynth blockwise patches on 60 blocks, 1024 px (4096 image + 128 text tokens): "
                      f"{floor_qwen_diffsynth(4096, 128):.3f}x",
    "zimage-fun": f"published: Z-Image-Turbo Fun union 2.1, 15 + 2 refiner-control layers on 30 blocks, 1024 px (4096 image + "
                  f"128 caption tokens): {floor_zimage(30, 17, 4096, 128):.3f}x",
}


# -- building the cases ----------------------------------------------------------------------------------------


def _image(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, size, size, 3, generator=g)


def _cond(tokens: int, width: int, pooled: int, seed: int, **extra) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g), **extra}]]


def build_sd3_family(family: str, host, M, args) -> Case:
    d, n = args.sd3_depth, (args.sd3_blocks if family == "sd3" else args.sd35_blocks)
    width, grid, latent = 64 * d, max(args.size // 16, 24), args.size // 8
    ckpt = sd3_checkpoint(host.dirs["checkpoints"] / f"bench_sd3_d{d}.safetensors", d, 4096, grid)
    model, _, vae = M["CheckpointLoaderSimple"]().load_checkpoint(ckpt.name)[:3]
    name = f"bench_{family}_{n}.safetensors"
    if family == "sd3":
        sd3_controlnet_file(host.dirs["controlnet"] / name, width, n, 4096, grid)
        img, txt = (latent // 2) ** 2, SD3_TEXT
        floor = floor_sd3(d, n)
        shape = f"MMDiT {d} joint blocks of {width} + SD3 ControlNet {n} joint blocks"
    else:
        sd35_controlnet_file(host.dirs["controlnet"] / name, width, n)
        img, txt = (latent // 2) ** 2, SD3_TEXT
        floor = floor_sd35(d, n, img, txt)
        shape = f"MMDiT {d} joint blocks of {width} + Stability SD3.5 ControlNet {n} DiT blocks (depth type)"
    shape += f", {args.size} px ({img} image + {txt} text tokens), batch 2 (cfg 4)"
    return Case(family, model, vae, _cond(SD3_TEXT, 4096, 2048, 1), _cond(SD3_TEXT, 4096, 2048, 2),
                {"samples": torch.zeros(1, 16, latent, latent)}, 4.0, M["ControlNetSuiteLoader"]().load(name)[0],
                M["ControlNetLoader"]().load_controlnet(name)[0], shape, floor, PUBLISHED[family])


def build_flux_family(family: str, host, M, args, base) -> Case:
    width, D, S = args.flux_width, args.flux_double, args.flux_single
    latent = args.size // 8
    model, vae = base
    folder = host.dirs["controlnet"]
    if family == "flux-instantx":
        nd, ns = args.instantx_double, args.instantx_single
        path = flux_instantx_file(folder / f"bench_flux_instantx_{nd}_{ns}.safetensors", width, nd, ns)
    else:
        nd, ns = args.xlabs_double, 0
        path = flux_xlabs_file(folder / f"bench_flux_xlabs_{nd}.safetensors", width, nd)
    img = (latent // 2) ** 2
    shape = (f"Flux {D} double + {S} single blocks of {width} ({width // 128} heads of 128) + {family[5:]} ControlNet {nd} double + "
             f"{ns} single, {args.size} px ({img} image + {FLUX_TEXT} text tokens), batch 1 (cfg 1, guidance 3.5)")
    return Case(family, model, vae, _cond(FLUX_TEXT, 4096, 768, 1, guidance=3.5), _cond(FLUX_TEXT, 4096, 768, 2, guidance=3.5),
                {"samples": torch.zeros(1, 16, latent, latent)}, 1.0, M["ControlNetSuiteLoader"]().load(path.name)[0],
                flux_builtin(path, width), shape, floor_flux(D, S, nd, ns), PUBLISHED[family])


def build_qwen_family(family: str, host, M, args, base) -> Case:
    from factories import save

    width, D = args.qwen_width, args.qwen_depth
    latent = args.size // 8
    model, vae = base
    img = (latent // 2) ** 2
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, QWEN_TEXT, QWEN_CONTEXT, generator=g), {}]]
    neg = [[torch.randn(1, QWEN_TEXT, QWEN_CONTEXT, generator=g), {}]]
    empty = {"samples": torch.zeros(1, 16, 1, latent, latent)}  # one-frame Wan 2.1 latent, as the host samples Qwen-Image
    tokens = f"{args.size} px ({img} image + {QWEN_TEXT} text tokens), batch 2 (cfg 2.5)"
    if family == "qwen-instantx":
        n = args.qwen_instantx_blocks
        path = qwen_instantx_file(host.dirs["controlnet"] / f"bench_qwen_instantx_{n}.safetensors", width, n)
        return Case(family, model, vae, pos, neg, empty, 2.5, M["ControlNetSuiteLoader"]().load(path.name)[0], qwen_builtin(path, width),
                    f"Qwen-Image {D} blocks of {width} ({width // 128} heads of 128) + InstantX ControlNet {n} blocks, {tokens}",
                    floor_qwen_instantx(D, n), PUBLISHED[family])
    patch = qwen_diffsynth_patch(width, D)
    name = f"bench_qwen_diffsynth_{D}.safetensors"
    save(host.dirs["controlnet"] / name, patch.model.state_dict())
    image = _image(args.size, 3)
    ours_cn = M["ControlNetSuiteLoader"]().load(name)[0]
    with torch.no_grad():  # as the host's executor runs nodes: the built-in's VAE encode is kept in its patch, which clones copy
        ours = M["ControlNetSuiteApplyPatch"]().apply(model, vae, image, 1.0, 0.0, 1.0, "balanced", "crop and resize", control_net=ours_cn)[0]
        builtin = M["QwenImageDiffsynthControlnet"]().diffsynth_controlnet(model, patch, vae, image, 1.0)[0]
    return Case(family, model, vae, pos, neg, empty, 2.5, None, None,
                f"Qwen-Image {D} blocks of {width} + DiffSynth blockwise patch ({D} blocks), {tokens}",
                floor_qwen_diffsynth(img, QWEN_TEXT), PUBLISHED[family], models={"ours": ours, "built-in": builtin})


def build_zimage_family(family: str, host, M, args) -> Case:
    """The tests' tiny Z-Image base and a 2.1-layout Fun file (tests/comfy_zimage.py); the built-in is the host's own
    ZImageFunControlnet node on its ZImage_Control holding the same weights (hosts from 0.8.0 only)."""
    from comfy_zimage import BLOCKS, CONTEXT, CONTROL_LAYERS, WIDTH, has_host_zimage_control, host_patch, tiny_zimage, zimage_fun_file

    if not has_host_zimage_control():
        raise SystemExit("zimage-fun: this host has no ZImageFunControlnet (it arrived after ComfyUI 0.3.75); run with "
                         "VENV=.venv-new COMFYUI_PATH=/path/to/ComfyUI-0.8.0 .venv-new/bin/python bench/bench_dit_step.py --families zimage-fun")
    parts = tiny_zimage()
    model, vae = parts["model"], parts["vae"]
    path = zimage_fun_file(host.dirs["controlnet"] / "bench_zimage_fun_2.1.safetensors", "2.1")
    latent = args.size // 8
    img, txt = (latent // 2) ** 2, QWEN_TEXT
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, txt, CONTEXT, generator=g), {}]]
    neg = [[torch.randn(1, txt, CONTEXT, generator=g), {}]]
    image = _image(args.size, 3)
    with torch.no_grad():  # as the host's executor runs nodes
        ours_cn = M["ControlNetSuiteLoader"]().load(path.name)[0]
        ours = M["ControlNetSuiteApplyPatch"]().apply(model, vae, image, 1.0, 0.0, 1.0, "balanced", "crop and resize", control_net=ours_cn)[0]
        builtin = M["ZImageFunControlnet"]().diffsynth_controlnet(model, host_patch(path), vae, image, 1.0)[0]
    n = CONTROL_LAYERS + 2  # control layers + the 2 refiner-control layers of 2.x
    return Case(family, model, vae, pos, neg, {"samples": torch.zeros(1, 16, latent, latent)}, 2.5, None, None,
                f"Z-Image {BLOCKS} blocks of {WIDTH} + Fun union 2.1 ({CONTROL_LAYERS} control + 2 refiner-control layers), "
                f"{args.size} px ({img} image + {txt} caption tokens), batch 2 (cfg 2.5)",
                floor_zimage(BLOCKS, n, img, txt), PUBLISHED[family], models={"ours": ours, "built-in": builtin})


# -- timing through the host's wrappers ----------------------------------------------------------------------------


def count_cpu_attention() -> None:
    """Make torch's FLOP counter count CPU `scaled_dot_product_attention` (our models' attention): it knows the CUDA
    kernels' ops but not `_scaled_dot_product_flash_attention_for_cpu`, which it would count as 0 FLOPs. ComfyUI's own
    CPU attention (sub-quadratic, batched matmuls) is counted either way."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


class StepTimer:
    """ComfyUI wrappers around `calc_cond_batch` (the step) and `apply_model` (the base model inside it)."""

    def __init__(self):
        self.record: list | None = None  # (step s, base s) per timed step of the current run
        self._step = 0
        self._base = 0.0
        self.count_flops = False
        self.flops: float | None = None

    def start_run(self, record: list, count_flops: bool = False):
        self.record, self._step, self.count_flops, self.flops = record, 0, count_flops, None

    def step(self, executor, *args, **kwargs):
        i, self._step = self._step, self._step + 1
        if i == 0 or self.record is None:  # the first step of a run also encodes the hint
            return executor(*args, **kwargs)
        if self.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            if i == 1:
                with FlopCounterMode(display=False) as fc:
                    out = executor(*args, **kwargs)
                self.flops = fc.get_total_flops()
                return out
            return executor(*args, **kwargs)
        self._base = 0.0
        t0 = time.perf_counter()
        out = executor(*args, **kwargs)
        self.record.append((time.perf_counter() - t0, self._base))
        return out

    def apply_model(self, executor, *args, **kwargs):
        t0 = time.perf_counter()
        out = executor(*args, **kwargs)
        self._base += time.perf_counter() - t0
        return out


def instrument(model, timer: StepTimer):
    import comfy.patcher_extension as pe

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "bench_dit_step", timer.step)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "bench_dit_step", timer.apply_model)
    return m


def run_family(case: Case, M, args) -> None:
    timer = StepTimer()
    if case.models is None:
        image = _image(args.size, 3)
        apply_ours = M["ControlNetSuiteApply"]().apply(case.pos, case.neg, case.ours, image, 1.0, 0.0, 1.0, "balanced", "crop and resize", vae=case.vae)
        apply_builtin = M["ControlNetApplyAdvanced"]().apply_controlnet(case.pos, case.neg, case.builtin, image, 1.0, 0.0, 1.0, vae=case.vae)
        conds = {"ours": apply_ours[:2], "built-in": apply_builtin[:2], "plain": (case.pos, case.neg)}
        models = dict.fromkeys(conds, instrument(case.model, timer))
    else:  # model patches: the same conditioning, three models
        conds = dict.fromkeys(("ours", "built-in", "plain"), (case.pos, case.neg))
        models = {k: instrument(case.models.get(k, case.model), timer) for k in conds}

    def sample(kind: str, steps: int):
        p, n = conds[kind]
        return M["KSampler"]().sample(models[kind], 7, steps, case.cfg, "euler", "simple", p, n, case.latent, denoise=1.0)[0]["samples"]

    print(f"\n## {case.family}: {case.shape}")
    # same result (balanced mode reproduces the built-in), and the warm-up
    outs = {}
    for kind in conds:
        timer.start_run([])
        outs[kind] = sample(kind, args.steps)
    ref = outs["built-in"]
    print(f"final latents after {args.steps} steps, ours vs built-in: max abs diff {(outs['ours'] - ref).abs().max().item():.2e} "
          f"(latent std {ref.std().item():.3f}; vs plain: {(outs['plain'] - ref).abs().max().item():.2e})")

    samples = {k: [] for k in conds}
    for _ in range(args.reps):
        for kind in conds:
            timer.start_run(samples[kind])
            sample(kind, args.steps)
    step = {k: statistics.median(s for s, _ in v) for k, v in samples.items()}
    best = {k: min(s for s, _ in v) for k, v in samples.items()}
    control = {k: statistics.median(s - b for s, b in v) for k, v in samples.items()}
    for k in conds:
        print(f"{k:9} step median {step[k] * 1000:8.1f} ms  best {best[k] * 1000:8.1f} ms  ControlNet (step - base) median "
              f"{control[k] * 1000:7.1f} ms  ({len(samples[k])} steps)")
    # each ours step against the built-in step timed next to it (same run position): slow spells of a shared machine
    # then hit both sides of a pair
    paired = statistics.median(a / b for (a, _), (b, _) in zip(samples["ours"], samples["built-in"]))
    print(f"step ratio ours / built-in: **{step['ours'] / step['built-in']:.3f}x** median, {paired:.3f}x median of adjacent pairs, "
          f"{best['ours'] / best['built-in']:.3f}x best" + ("" if case.models else
          f"; ControlNet alone ours / built-in: {control['ours'] / max(control['built-in'], 1e-9):.3f}x"))
    print(f"controlled / plain step: ours {step['ours'] / step['plain']:.3f}x, built-in {step['built-in'] / step['plain']:.3f}x")

    flops = {}
    if not args.no_flops:
        count_cpu_attention()
        for kind in conds:
            timer.start_run([], count_flops=True)
            sample(kind, 2)
            flops[kind] = timer.flops
    floor = f"FLOP floor (blocks x tokens): {case.floor:.3f}x at this shape; {case.published}"
    if flops.get("plain"):
        floor += (f"\ncounted FLOPs per step: plain {flops['plain'] / 1e9:.1f} G; ours {flops['ours'] / 1e9:.1f} G "
                  f"({flops['ours'] / flops['plain']:.3f}x), built-in {flops['built-in'] / 1e9:.1f} G ({flops['built-in'] / flops['plain']:.3f}x)")
    print(floor)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--reps", type=int, default=5, help="interleaved sampling runs per kind (each gives steps - 1 timed steps)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=384, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--sd3-depth", type=int, default=8, help="base joint blocks (width = 64 x depth)")
    ap.add_argument("--sd3-blocks", type=int, default=2)
    ap.add_argument("--sd35-blocks", type=int, default=4)
    ap.add_argument("--flux-width", type=int, default=512)
    ap.add_argument("--flux-double", type=int, default=4)
    ap.add_argument("--flux-single", type=int, default=8)
    ap.add_argument("--instantx-double", type=int, default=1)
    ap.add_argument("--instantx-single", type=int, default=2)
    ap.add_argument("--xlabs-double", type=int, default=1)
    ap.add_argument("--qwen-width", type=int, default=512)
    ap.add_argument("--qwen-depth", type=int, default=8)
    ap.add_argument("--qwen-instantx-blocks", type=int, default=1)
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from comfy_host import import_comfy

    import_comfy(cpu=True)
    import comfy.utils
    from host import Host

    comfy.utils.PROGRESS_BAR_ENABLED = False  # KSampler's progress bars would interleave with the results

    print(f"# controlled sampling step of the DiT families, ours vs ComfyUI built-in, fp32 CPU, {args.reps} interleaved runs x "
          f"{args.steps - 1} timed steps; {machine()}")
    with tempfile.TemporaryDirectory() as d:
        host = Host(Path(d))
        M = host.nodes.NODE_CLASS_MAPPINGS
        flux = qwen = None
        for family in args.families:
            torch.manual_seed(0)
            if family.startswith("flux"):
                flux = flux or flux_base(args.flux_width, args.flux_double, args.flux_single)
                case = build_flux_family(family, host, M, args, flux)
            elif family == "zimage-fun":
                case = build_zimage_family(family, host, M, args)
            elif family.startswith("qwen"):
                qwen = qwen or qwen_base(args.qwen_width, args.qwen_depth)
                case = build_qwen_family(family, host, M, args, qwen)
            else:
                case = build_sd3_family(family, host, M, args)
            run_family(case, M, args)
            del case


if __name__ == "__main__":
    main()
