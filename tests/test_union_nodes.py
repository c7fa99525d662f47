"""ControlNet Union (Suite) in the real host: types, several conditions in one pass, interop with SetUnionControlNetType."""
import pytest
import torch
from factories import random_controlnet, save
from host import TINY_UNION, PromptFailed, base_graph, finish, tiny_union_file
from test_nodes import apply, image, loader, run_plain, spy_calls

from controlnet_core import ControlNetConfig, load_control


@pytest.fixture(scope="module")
def union_files(host):
    folder = host.dirs["controlnet"]
    promax = tiny_union_file(folder).name
    save(folder / "union_v1_tiny.safetensors", random_controlnet(ControlNetConfig(**{**TINY_UNION.__dict__, "union_types": 6}), seed=12).state_dict())
    return promax, "union_v1_tiny.safetensors"


def union(g, cn, type_, weight=1.0, **extra):
    return (g.add("ControlNetSuiteUnion", control_net=cn, type=type_, weight=weight, **extra), 0)


def run(host, make_cn, tag=None, img_seed=0):
    g, model, pos, neg, latent = base_graph(host, spy_tag=tag)
    pos, neg = apply(g, pos, neg, make_cn(g), image(g, seed=img_seed))
    return host.run(finish(g, model, pos, neg, latent))["out"]


def test_a_type_matters_and_equals_the_core_set_union_type_node(host, union_files):
    promax, _ = union_files
    canny = run(host, lambda g: union(g, loader(g, promax), "canny/lineart/anime_lineart/mlsd"))
    core = run(host, lambda g: (g.add("SetUnionControlNetType", control_net=loader(g, promax), type="canny/lineart/anime_lineart/mlsd"), 0))
    depth = run(host, lambda g: union(g, loader(g, promax), "depth"))
    auto = run(host, lambda g: union(g, loader(g, promax), "auto"))
    plain = run(host, lambda g: loader(g, promax))
    assert torch.equal(canny, core)
    assert torch.equal(auto, plain)
    assert not torch.allclose(canny, depth, atol=1e-4) and not torch.allclose(canny, plain, atol=1e-4)
    assert not torch.allclose(plain, run_plain(host), atol=1e-4)


def test_several_conditions_in_one_pass_are_what_the_model_computes(host, union_files, comfy):
    """The residuals the UNet received at the first call equal the library's forward with both hints, types and weights."""
    import comfy.sd

    promax, _ = union_files
    host.spy.clear()
    g, model, pos, neg, latent = base_graph(host, spy_tag="multi")
    cn = union(g, loader(g, promax), "openpose", 0.8, image_2=image(g, seed=5), type_2="depth", weight_2=0.6)
    pos, neg = apply(g, pos, neg, cn, image(g, seed=4))
    host.run(finish(g, model, pos, neg, latent))
    call = spy_calls(host, "multi")[0]

    from comfy_test_nodes import SuiteTestImage
    hints = [SuiteTestImage().make(64, 64, 3, 1, s)[0].movedim(-1, 1) for s in (4, 5)]
    ms = comfy.sd.load_checkpoint_guess_config(str(host.dirs["checkpoints"] / host.checkpoint), output_vae=False, output_clip=False)[0].model.model_sampling
    sigma = torch.full((call["input"].shape[0],), call["sigma"])
    lc = load_control(host.dirs["controlnet"] / promax)
    with torch.no_grad():
        want = lc.residuals(ms.calculate_input(sigma, call["input"]), hints, ms.timestep(sigma).float(), call["context"],
                            control_types=[0, 1], condition_weights=[0.8, 0.6])
    got = call["control"]
    for a, b in zip(got["output"], want.down):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["middle"][0], want.mid, rtol=1e-4, atol=1e-5)


def test_union_errors_name_the_node_and_what_to_do(host, union_files):
    promax, v1 = union_files
    with pytest.raises(PromptFailed, match=r"ControlNet Union \(Suite\).*tile \(6\) is not one of the 6 types.*ProMax"):
        run(host, lambda g: union(g, loader(g, v1), "tile"))
    with pytest.raises(PromptFailed, match=r"cn_a.safetensors is not a union ControlNet"):
        run(host, lambda g: union(g, loader(g, "cn_a.safetensors"), "depth"))
    with pytest.raises(PromptFailed, match=r"type is 'auto' but more images are connected"):
        run(host, lambda g: union(g, loader(g, promax), "auto", image_2=image(g, seed=3), type_2="depth", weight_2=1.0))
    with pytest.raises(PromptFailed, match=r"comes from another loader"):
        run(host, lambda g: union(g, (g.add("ControlNetLoader", control_net_name="cn_a.safetensors"), 0), "depth"))
