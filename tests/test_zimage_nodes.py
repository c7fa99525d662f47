"""Z-Image Fun ControlNets (alibaba-pai union 1 / 2.0 / 2.1; model patches) through Apply ControlNet Patch (Suite), in
KSampler on the tiny in-process Z-Image base (comfy_zimage.py): strength 0, start/end per model call, the region mask
per token, stacking, soft modes, the inpainting inputs, errors; and, on hosts that have it (0.8.0), the final latent
against ComfyUI's own ZImageFunControlnet node on the same weights.

Both hook mechanisms are exercised: the host's `noise_refiner` / `double_block` patch points where its NextDiT has them
(0.8.0), the DIFFUSION_MODEL wrapper with temporary module hooks elsewhere (0.3.75); `test_the_hook_mechanism` says
which one ran."""
import pytest
import torch
from comfy_qwen import WIDTH as QWEN_WIDTH
from comfy_zimage import CONTEXT, has_host_zimage_control, host_patch, tiny_zimage, zimage_fun_file
from factories import randomize_, save
from host import Graph, PromptFailed, finish
from test_nodes import image

from controlnet_core import load_control

SIZE = 64  # 8 x 8 latent: 4 x 4 image tokens
FILES = {v: f"zimage_fun_{v}_tiny.safetensors" for v in ("1", "2.1", "2.0")}
QWEN_FILE = "qwen_diffsynth_for_zimage_test.safetensors"
_RUNS: dict = {}


@pytest.fixture(scope="module")
def zimage(host):
    nodes = host.test_nodes
    if "zimage" not in nodes.PROVIDED:
        parts = tiny_zimage()
        nodes.PROVIDED["zimage"] = (parts["model"], None, parts["vae"])
    for seed, (version, name) in enumerate(FILES.items(), start=62):
        path = zimage_fun_file(host.dirs["controlnet"] / name, version, seed=seed)
        if has_host_zimage_control():
            nodes.PROVIDED_CONTROL[f"zpatch-{version}"] = host_patch(path)
    from controlnet_core.qwen.blockwise import QwenBlockwiseConfig, QwenBlockwiseControlNet

    save(host.dirs["controlnet"] / QWEN_FILE, randomize_(QwenBlockwiseControlNet(QwenBlockwiseConfig(hidden_size=QWEN_WIDTH, num_layers=2)), 5).state_dict())
    _RUNS.clear()
    return host


def run(host, build=None, key=None):
    """The final latent of a 3-step KSampler run (cfg 2.5) of the tiny base, the MODEL passed through `build`."""
    if key is not None and key in _RUNS:
        return _RUNS[key]
    g = Graph()
    base = g.add("SuiteTestProvided", key="zimage")
    model, vae = (base, 0), (base, 2)
    if build is not None:
        model = build(g, model, vae)
    pos = (g.add("SuiteTestConditioning", seed=1, width=CONTEXT), 0)
    neg = (g.add("SuiteTestConditioning", seed=2, width=CONTEXT), 0)
    latent = (g.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1), 0)
    out = host.run(finish(g, model, pos, neg, latent, steps=3, cfg=2.5))["out"]
    if key is not None:
        _RUNS[key] = out
    return out


def condition(g):
    return image(g, SIZE, SIZE, seed=3)


def ours(version="2.1", strength=1.0, start=0.0, end=1.0, mode="balanced", mask=None, inpaint_mask=None, inpaint_image=None,
         from_file=True, control=condition):
    def b(g, model, base_vae):
        source = ({"control_net": (g.add("ControlNetSuiteLoader", control_net_name=FILES[version]), 0)} if from_file
                  else {"patch": (g.add("SuiteTestProvidedPatch", key=f"zpatch-{version}"), 0)})
        kw = {k: v(g) for k, v in (("mask", mask), ("inpaint_mask", inpaint_mask), ("inpaint_image", inpaint_image), ("image", control)) if v}
        return (g.add("ControlNetSuiteApplyPatch", model=model, vae=base_vae, strength=strength, start_percent=start, end_percent=end,
                      control_mode=mode, resize_mode="crop and resize", **source, **kw), 0)
    return b


def theirs(version="2.1", strength=1.0, mask=None, inpaint_image=None, control=condition):
    def b(g, model, vae):
        kw = {k: v(g) for k, v in (("mask", mask), ("inpaint_image", inpaint_image), ("image", control)) if v}
        return (g.add("ZImageFunControlnet", model=model, model_patch=(g.add("SuiteTestProvidedPatch", key=f"zpatch-{version}"), 0), vae=vae,
                      strength=strength, **kw), 0)
    return b


def solid(value):
    return lambda g: (g.add("SolidMask", value=value, width=SIZE, height=SIZE), 0)


def right_half(g):
    """1 on the right half: token columns 2 and 3 of the 4 x 4 grid."""
    empty = (g.add("SolidMask", value=0.0, width=SIZE, height=SIZE), 0)
    half = (g.add("SolidMask", value=1.0, width=SIZE // 2, height=SIZE), 0)
    return (g.add("MaskComposite", destination=empty, source=half, x=SIZE // 2, y=0, operation="add"), 0)


def paint_image(g):
    return image(g, SIZE, SIZE, seed=9)


def grey_image(g):
    """An image of exactly 0.5 in every channel (what ComfyUI encodes as the control input when there is none)."""
    return (g.add("MaskToImage", mask=solid(0.5)(g)), 0)


def needs_host_node(host):
    if "ZImageFunControlnet" not in host.nodes.NODE_CLASS_MAPPINGS or not has_host_zimage_control():
        pytest.skip("this ComfyUI has no ZImageFunControlnet (added after 0.3.75); run with COMFYUI_PATH=/work/hosts/comfyui-0.8.0")


def test_files_load_as_zimage_patches(zimage):
    for version, name in FILES.items():
        lc = load_control(zimage.dirs["controlnet"] / name)
        assert lc.format == "zimage-fun" and lc.kind == "zimage_patch" and lc.config.num_control_layers == 2
        assert lc.config.inpainting == (version != "1")


def test_the_hook_mechanism(zimage):
    """The host's patch points where its NextDiT calls them, otherwise our DIFFUSION_MODEL wrapper (and the control
    network as an additional model, so the host loads it)."""
    import sys

    import comfy.patcher_extension

    node = zimage.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteApplyPatch"]()
    zp = sys.modules[type(node).__module__.rsplit(".", 1)[0] + ".zimage_patch"]  # the suite as the host imported it
    KEY, ForwardHooks, SuiteZImageGroup = zp.KEY, zp.ForwardHooks, zp.SuiteZImageGroup
    loader = zimage.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteLoader"]()
    model, _, vae = zimage.test_nodes.PROVIDED["zimage"]
    cn = loader.load(FILES["2.1"])[0]
    one = node.apply(model, vae, 0.5, 0.0, 1.0, "balanced", "crop and resize", image=torch.rand(1, SIZE, SIZE, 3), control_net=cn)[0]
    two = node.apply(one, vae, 0.5, 0.0, 1.0, "balanced", "crop and resize", image=torch.rand(1, SIZE, SIZE, 3), control_net=cn)[0]
    assert zp.host_has_patch_points() == ("ZImageFunControlnet" in zimage.nodes.NODE_CLASS_MAPPINGS)  # 0.8.0: patch points
    if zp.host_has_patch_points():
        patches = two.model_options["transformer_options"]["patches"]
        assert patches["noise_refiner"][-1] is patches["double_block"][-1]
        assert isinstance(patches["double_block"][-1], SuiteZImageGroup) and len(patches["double_block"][-1].units) == 2
        assert len(patches["double_block"]) == 1
    else:
        wrappers = two.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY)
        assert len(wrappers) == 1 and isinstance(wrappers[0], ForwardHooks) and len(wrappers[0].group.units) == 2
        assert two.get_additional_models_with_key(KEY) == [cn.patcher, cn.patcher]
        assert len(one.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY)[0].group.units) == 1
    assert not model.model_options["transformer_options"].get("patches") and not model.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL)


@pytest.mark.parametrize("version", ["1", "2.1"])
def test_strength_zero_masks_and_control(zimage, version):
    plain, full = run(zimage, key="plain"), run(zimage, ours(version), key=f"full-{version}")
    assert (full - plain).abs().max() > 1e-3  # the control acts
    torch.testing.assert_close(run(zimage, ours(version, strength=0.0)), plain, rtol=0, atol=0)
    torch.testing.assert_close(run(zimage, ours(version, mask=solid(0.0))), plain, rtol=0, atol=0)
    torch.testing.assert_close(run(zimage, ours(version, mask=solid(1.0))), full, rtol=0, atol=0)


def test_start_end_per_model_call(zimage):
    """Each model call of a run ending at 50% (and one starting there) against the unpatched model on the same input:
    bit-identical outside the range, different inside."""
    node = zimage.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteApplyPatch"]()
    ksampler = zimage.nodes.NODE_CLASS_MAPPINGS["KSampler"]()
    cond = zimage.nodes.NODE_CLASS_MAPPINGS["SuiteTestConditioning"]()
    model, _, vae = zimage.test_nodes.PROVIDED["zimage"]
    img = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(4))
    cn = zimage.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteLoader"]().load(FILES["2.1"])[0]
    latent = {"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}
    for start, end in ((0.0, 0.5), (0.5, 1.0)):
        patched = node.apply(model, vae, 1.0, start, end, "balanced", "crop and resize", image=img, control_net=cn)[0].clone()
        calls = []

        def wrapper(apply_model, args, calls=calls):
            c = args["c"]
            out = apply_model(args["input"], args["timestep"], **c)
            bare = {k: v for k, v in c["transformer_options"].items() if k not in ("patches", "wrappers")}
            calls.append((float(args["timestep"][0]), out, apply_model(args["input"], args["timestep"], **dict(c, transformer_options=bare))))
            return out

        patched.set_model_unet_function_wrapper(wrapper)
        ksampler.sample(patched, 7, 4, 2.5, "euler", "normal", cond.make(1, CONTEXT)[0], cond.make(2, CONTEXT)[0], latent, denoise=1.0)
        sampling = model.get_model_object("model_sampling")
        lo, hi = float(sampling.percent_to_sigma(end)), float(sampling.percent_to_sigma(start))
        assert len(calls) == 4
        inside = [lo <= s <= hi for s, _, _ in calls]
        assert any(inside) and not all(inside), (start, end, [s for s, _, _ in calls])
        for (sigma, out, bare), acts in zip(calls, inside):
            if acts:
                assert (out - bare).abs().max() > 1e-4, (start, end, sigma)
            else:
                torch.testing.assert_close(out, bare, rtol=0, atol=0)


def test_region_mask_is_per_token(zimage):
    """A 2.x unit's first output (after noise-refiner block 0) reaches only the tokens the mask covers: the tokens
    entering refiner block 1 on the first model call are bit-identical to the unpatched run's in the masked-out columns."""
    dm = zimage.test_nodes.PROVIDED["zimage"][0].model.diffusion_model
    seen = []
    handle = dm.noise_refiner[1].register_forward_pre_hook(lambda m, args: seen.append(args[0][:, :16].clone()))
    try:
        run(zimage)
        plain = seen[0]
        seen.clear()
        run(zimage, ours("2.1", mask=right_half))
        masked = seen[0]
    finally:
        handle.remove()
    grid = lambda t: t.reshape(t.shape[0], 4, 4, -1)  # noqa: E731 (rows, columns) of image tokens
    torch.testing.assert_close(grid(masked)[:, :, :2], grid(plain)[:, :, :2], rtol=0, atol=0)
    assert (grid(masked)[:, :, 2:] - grid(plain)[:, :, 2:]).norm(dim=-1).min() > 0  # every covered token moved


def test_a_stack_is_the_sum_of_its_units(zimage):
    """Two chained nodes: 0.3 + 0.4 equals one unit at 0.7 (up to float rounding of 0.3 x + 0.4 x against 0.7 x, which
    the 16 blocks and 3 steps amplify to about 1e-5: hence 1e-4, far below what one unit alone would leave); a v1 + v2.1
    stack differs from either alone."""
    def two(g, model, vae):
        return ours(strength=0.4)(g, ours(strength=0.3)(g, model, vae), vae)

    seven = run(zimage, ours(strength=0.7))
    torch.testing.assert_close(run(zimage, two), seven, rtol=1e-4, atol=1e-4)
    assert (seven - run(zimage, ours(strength=0.4))).abs().max() > 1e-2

    def mixed(g, model, vae):
        return ours("2.1")(g, ours("1")(g, model, vae), vae)

    both = run(zimage, mixed)
    for version in ("1", "2.1"):
        assert (both - run(zimage, ours(version), key=f"full-{version}")).abs().max() > 1e-4


def test_soft_modes_and_inpainting_inputs(zimage):
    full = run(zimage, ours("2.1"), key="full-2.1")
    for mode in ("prompt is more important", "ControlNet is more important"):
        assert (run(zimage, ours("2.1", mode=mode)) - full).abs().max() > 1e-4, mode
    masked = run(zimage, ours("2.1", inpaint_mask=right_half))
    painted = run(zimage, ours("2.1", inpaint_mask=right_half, inpaint_image=paint_image))
    assert (masked - full).abs().max() > 1e-4 and (painted - masked).abs().max() > 1e-4


def test_inpainting_without_a_condition_image(zimage):
    """2.x inpainting with only inpaint_image (+ mask) connected: the control input is a grey image, so the run equals
    one with an all-0.5 condition image; it differs from no patch; v1 and Qwen patches ask for the image."""
    inpaint = dict(inpaint_mask=right_half, inpaint_image=paint_image)
    alone = run(zimage, ours("2.1", control=None, **inpaint))
    torch.testing.assert_close(alone, run(zimage, ours("2.1", control=grey_image, **inpaint)), rtol=0, atol=0)
    assert (alone - run(zimage, key="plain")).abs().max() > 1e-3
    with pytest.raises(PromptFailed, match=r"Apply ControlNet Patch \(Suite\): no 'image' is connected.*only a Z-Image Fun 2.x"):
        run(zimage, ours("1", control=None, **inpaint))
    with pytest.raises(PromptFailed, match=r"no 'image' is connected.*or, to inpaint without control, an 'inpaint_image'"):
        run(zimage, ours("2.1", control=None, inpaint_mask=right_half))


def test_errors_name_the_remedy(zimage):
    def apply_on(g, model, vae, control_name):
        return g.add("ControlNetSuiteApplyPatch", model=model, vae=vae, image=image(g), strength=1.0, start_percent=0.0, end_percent=1.0,
                     control_mode="balanced", resize_mode="crop and resize",
                     control_net=(g.add("ControlNetSuiteLoader", control_net_name=control_name), 0))

    def sample(g, m, width, latent_node="EmptyLatentImage"):
        pos = (g.add("SuiteTestConditioning", seed=1, width=width), 0)
        return finish(g, (m, 0), pos, pos, (g.add(latent_node, width=64, height=64, batch_size=1), 0))

    with pytest.raises(PromptFailed, match=r"Apply ControlNet Patch \(Suite\).*Z-Image Fun ControlNet patch.*connect a Z-Image model"):
        g = Graph()
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name=zimage.checkpoint)
        zimage.run(sample(g, apply_on(g, (ckpt, 0), (ckpt, 2), FILES["2.1"]), 768))
    with pytest.raises(PromptFailed, match=r"Apply ControlNet Patch \(Suite\).*Qwen-Image ControlNet patch.*connect a Qwen-Image model"):
        g = Graph()
        base = g.add("SuiteTestProvided", key="zimage")
        zimage.run(sample(g, apply_on(g, (base, 0), (base, 2), QWEN_FILE), CONTEXT, "EmptySD3LatentImage"))
    with pytest.raises(PromptFailed, match=r"Apply ControlNet Patch \(Suite\).*4-channel 2-D latents.*Flux VAE"):
        g = Graph()
        base, ckpt = g.add("SuiteTestProvided", key="zimage"), g.add("CheckpointLoaderSimple", ckpt_name=zimage.checkpoint)
        zimage.run(sample(g, apply_on(g, (base, 0), (ckpt, 2), FILES["1"]), CONTEXT, "EmptySD3LatentImage"))
    with pytest.raises(PromptFailed, match=r"Apply ControlNet \(Suite\).*model-patch ControlNet.*Apply ControlNet Patch \(Suite\)"):
        g = Graph()
        base = g.add("SuiteTestProvided", key="zimage")
        pos = (g.add("SuiteTestConditioning", seed=1, width=CONTEXT), 0)
        n = g.add("ControlNetSuiteApply", positive=pos, negative=pos, control_net=(g.add("ControlNetSuiteLoader", control_net_name=FILES["2.1"]), 0),
                  image=image(g), strength=1.0, start_percent=0.0, end_percent=1.0, control_mode="balanced", resize_mode="crop and resize",
                  vae=(base, 2))
        zimage.run(finish(g, (base, 0), (n, 0), (n, 1), (g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1), 0)))


@pytest.mark.parametrize("version", ["1", "2.1", "2.0"])
def test_matches_comfys_zimage_fun_node(zimage, version):
    """ComfyUI 0.8.0's ZImageFunControlnet on its own ZImage_Control from the same file (the 2.0 file through its
    `broken` workaround): our node from its MODEL_PATCH and from our loader's file, final latents within 1e-4."""
    needs_host_node(zimage)
    ref = run(zimage, theirs(version, strength=0.8))
    assert (ref - run(zimage, key="plain")).abs().max() > 1e-3
    torch.testing.assert_close(run(zimage, ours(version, strength=0.8, from_file=False)), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(zimage, ours(version, strength=0.8)), ref, rtol=1e-4, atol=1e-4)


def test_inpainting_matches_comfys_node(zimage):
    """2.x inpainting: the same inpaint image and mask (1 = repaint) on both nodes; the mask and image reach the model."""
    needs_host_node(zimage)
    ref = run(zimage, theirs("2.1", mask=right_half, inpaint_image=paint_image))
    torch.testing.assert_close(run(zimage, ours("2.1", inpaint_mask=right_half, inpaint_image=paint_image)), ref, rtol=1e-4, atol=1e-4)
    assert (ref - run(zimage, theirs("2.1"))).abs().max() > 1e-4
    ref = run(zimage, theirs("2.1", mask=right_half, inpaint_image=paint_image, control=None))
    torch.testing.assert_close(run(zimage, ours("2.1", inpaint_mask=right_half, inpaint_image=paint_image, control=None)), ref,
                               rtol=1e-4, atol=1e-4)
