"""Base models for training (SD1.x / SD2.x / SDXL single files and diffusers folders) against independent code.

Oracles, on the same random weights with the published key names (see base_factories.py):
- tokenizer: transformers' CLIPTokenizer and ComfyUI's SD1/SD2/SDXL tokenizers on the vocabulary ComfyUI ships;
- text encoders: transformers' CLIPTextModel(WithProjection) and ComfyUI's SDClipModel, set up as ComfyUI's
  SD1/SD2/SDXL classes set it up (layer, final norm, pad token), after ComfyUI's own open_clip key conversion;
- SDXL's `y`: ComfyUI's `SDXL.encode_adm`; the VAE: ComfyUI's ldm AutoencoderKL and diffusers' AutoencoderKL
  (through diffusers' own ldm->diffusers conversion); the UNet: ComfyUI's checkpoint loader on the whole file;
- diffusers folders: diffusers' UNet2DConditionModel/AutoencoderKL and transformers on the saved folder.
Tolerance: relative error (L2 of the difference / L2 of the reference) <= 1e-5 in fp32 unless stated.
"""
import json
import types

import pytest
import torch
from base_factories import (
    SIZE_EMBED,
    TOKENIZER_DIR,
    UNET_SD15_DETECTABLE,
    clip_config,
    copy_tokenizer,
    hf_clip,
    hf_state,
    hf_to_openclip,
    sd1_checkpoint,
    sd2_checkpoint,
    sdxl_checkpoint,
    unit_inputs,
)
from factories import rel_err, save
from safetensors.torch import load_file

from controlnet_core import CheckpointError
from controlnet_core.base_models import CLIPTokenizer, IncompleteModelError, TokenizerError, UnsupportedModelError, load_base_model, load_unet

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo, of: a CAT!!! 123 4.5 -- it's, they're; don't... 'quoted' [bracket] {brace} <angle> @#$%^&*_+=|~`",
    "naïve café Ünïcödé straße ΟΔΟΣ Ελλάδα 東京タワー 🙂🐱 ﬁ e\u0301 ½ ² Ⅻ ٣",
    "tabs\tand\nnew lines   and  spaces ",
    " ".join(f"word{i}" for i in range(60)),  # 120+ tokens: truncated to 75
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a busy 2-core machine a second one can make these small forwards many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_dir(TOKENIZER_DIR)


def published_key(kind: str) -> str:
    """diffusers' signature key for a single-file family part (its own table of the published names)."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    return CHECKPOINT_KEY_NAMES[kind]


def comfy_tokens(tokenizer_out) -> list[int]:
    """Token ids of ComfyUI's first 77-chunk."""
    return [t[0] for t in tokenizer_out[0]]


# -- tokenizer --

def test_tokenizer_matches_transformers(tok):
    from transformers import CLIPTokenizerFast as HF  # the tokenizers-backed one (4.x's slow one without ftfy splits CJK apart)

    hf = HF.from_pretrained(str(TOKENIZER_DIR))
    for p in PROMPTS:
        assert tok([p], pad_id=tok.end_id)[0].tolist() == hf(p, padding="max_length", max_length=77, truncation=True).input_ids, p
    hf.pad_token = "!"  # how diffusers' SD2 / SDXL tokenizer_2 pad: id 0
    for p in PROMPTS:
        assert tok([p], pad_id=0)[0].tolist() == hf(p, padding="max_length", max_length=77, truncation=True).input_ids, p
    assert tok.encode(PROMPTS[5]) == hf(PROMPTS[5]).input_ids[1:-1]  # untruncated too
    assert len(tok.encode(PROMPTS[5])) > 75 and tok([PROMPTS[5]], pad_id=0)[0, 76].item() == tok.end_id


def test_tokenizer_matches_comfy(comfy, tok):
    import comfy.sd1_clip
    import comfy.sdxl_clip

    try:
        from comfy.text_encoders.sd2_clip import SD2Tokenizer
    except ImportError:
        from comfy.sd2_clip import SD2Tokenizer
    sd1, sd2, sdxl = comfy.sd1_clip.SD1Tokenizer(), SD2Tokenizer(), comfy.sdxl_clip.SDXLTokenizer()
    for p in PROMPTS:
        short = len(tok.encode(p)) <= 75
        if short:  # ComfyUI does not truncate: it splits long prompts into several 77-token chunks
            assert comfy_tokens(sd1.tokenize_with_weights(p)["l"]) == tok.sequence(p, tok.end_id), p
            assert comfy_tokens(sd2.tokenize_with_weights(p)["h"]) == tok.sequence(p, 0), p
            xl = sdxl.tokenize_with_weights(p)
            assert comfy_tokens(xl["l"]) == tok.sequence(p, tok.end_id) and comfy_tokens(xl["g"]) == tok.sequence(p, 0), p
        else:  # the chunks' contents, in order, are our untruncated tokens
            chunks = sd1.tokenize_with_weights(p)["l"]
            assert len(chunks) > 1
            assert [t for c in chunks for t, *_ in c if t not in (tok.start_id, tok.end_id)] == tok.encode(p)


# -- text encoders --

def comfy_clip(tmp_path, hf_sd: dict, width: int, layers: int, act: str, **settings):
    """ComfyUI's SDClipModel with a scaled-down config, loaded with `hf_sd` (strictly: nothing missing but what it may lack)."""
    import comfy.sd1_clip

    cfg_path = tmp_path / f"clip_{width}_{layers}_{act}.json"
    cfg_path.write_text(json.dumps(clip_config(width, layers, act, projection=True)))
    with torch.no_grad():  # ComfyUI builds its models under no_grad (the old host writes an identity into text_projection)
        m = comfy.sd1_clip.SDClipModel(textmodel_json_config=str(cfg_path), dtype=torch.float32, **settings)
    missing, unexpected = m.load_sd(hf_sd)
    assert not unexpected and set(missing) <= {"text_projection.weight", "logit_scale"}, (missing, unexpected)
    return m


def test_openclip_names_are_the_ones_comfy_reads(comfy):
    import comfy.utils

    hf = hf_state(hf_clip(64, layers=3, act="gelu", projection=True))
    oc = {"cond_stage_model.model." + k: v for k, v in hf_to_openclip(hf).items()}
    back = comfy.utils.clip_text_transformers_convert(dict(oc), "cond_stage_model.model.", "")
    back.pop("cond_stage_model.model.logit_scale")
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_sd1_text_encoder_matches_transformers_and_comfy(comfy, tmp_path):
    import comfy.sd1_clip

    parts = sd1_checkpoint(tmp_path / "sd1.safetensors", clip_width=128)
    assert published_key("clip") in load_file(tmp_path / "sd1.safetensors")
    base = load_base_model(tmp_path / "sd1.safetensors", tokenizer=TOKENIZER_DIR)
    prompts = PROMPTS[1:4] + [""]
    ours = base.text(prompts)
    tokens = base.text.tokenizer(prompts, pad_id=base.text.tokenizer.end_id)
    with torch.no_grad():
        assert rel_err(ours, parts["clip"](tokens).last_hidden_state) <= 1e-5
    theirs = comfy_clip(tmp_path, hf_state(parts["clip"]), 128, 2, "quick_gelu", layer="last")  # as ComfyUI's SD1ClipModel
    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    for i, p in enumerate(prompts):
        cond = theirs.encode_token_weights(tokenizer.tokenize_with_weights(p)["l"])[0]
        assert rel_err(ours[i : i + 1], cond) <= 1e-5, p


def test_sd2_text_encoder_matches_comfy_and_transformers(comfy, tmp_path):
    import comfy.utils

    try:
        from comfy.text_encoders.sd2_clip import SD2Tokenizer
    except ImportError:
        from comfy.sd2_clip import SD2Tokenizer
    parts = sd2_checkpoint(tmp_path / "sd2.safetensors", clip_width=128)
    base = load_base_model(tmp_path / "sd2.safetensors", tokenizer=TOKENIZER_DIR)
    prompts = PROMPTS[1:3] + [""]
    ours = base.text(prompts)
    tokens = base.text.tokenizer(prompts, pad_id=0)
    hf = parts["clip"].text_model if hasattr(parts["clip"], "text_model") else parts["clip"]
    with torch.no_grad():  # ldm's FrozenOpenCLIPEmbedder: penultimate layer, then ln_final
        out = parts["clip"](tokens, output_hidden_states=True)
        assert rel_err(ours, hf.final_layer_norm(out.hidden_states[-2])) <= 1e-5
    sd = load_file(tmp_path / "sd2.safetensors")
    assert published_key("open_clip") in sd
    hf_sd = comfy.utils.clip_text_transformers_convert({k: v for k, v in sd.items() if k.startswith("cond_stage_model.model.")},
                                                       "cond_stage_model.model.", "")
    hf_sd.pop("cond_stage_model.model.logit_scale")
    # as ComfyUI's SD2ClipHModel: penultimate ("hidden", -2), final norm on it, pad 0
    theirs = comfy_clip(tmp_path, hf_sd, 128, 3, "gelu", layer="hidden", layer_idx=-2, special_tokens={"start": 49406, "end": 49407, "pad": 0})
    tokenizer = SD2Tokenizer()
    for i, p in enumerate(prompts):
        assert rel_err(ours[i : i + 1], theirs.encode_token_weights(tokenizer.tokenize_with_weights(p)["h"])[0]) <= 1e-5, p


def test_sdxl_conditioning_matches_comfy_and_transformers(comfy, tmp_path):
    import comfy.model_base
    import comfy.sdxl_clip
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    parts = sdxl_checkpoint(tmp_path / "xl.safetensors", l_width=64, g_width=128)
    base = load_base_model(tmp_path / "xl.safetensors", tokenizer=TOKENIZER_DIR, image_size=(96, 128))
    prompts = PROMPTS[1:3] + [""]
    context, y = base.text(prompts)
    assert context.shape == (3, 77, 192) and y.shape == (3, 128 + 6 * SIZE_EMBED)
    sd = load_file(tmp_path / "xl.safetensors")
    assert published_key("clip_sdxl") in sd and published_key("open_clip_sdxl") in sd
    l_sd = {k[len("conditioner.embedders.0.transformer."):]: v for k, v in sd.items() if k.startswith("conditioner.embedders.0.transformer.")}
    g_sd = comfy.utils.clip_text_transformers_convert({k: v for k, v in sd.items() if k.startswith("conditioner.embedders.1.model.")},
                                                      "conditioner.embedders.1.model.", "")
    g_sd.pop("conditioner.embedders.1.model.logit_scale")
    # as ComfyUI's SDXLClipModel: clip_l penultimate without final norm; clip_g likewise, pad 0, projected pooled output
    clip_l = comfy_clip(tmp_path, l_sd, 64, 3, "quick_gelu", layer="hidden", layer_idx=-2, layer_norm_hidden_state=False)
    clip_g = comfy_clip(tmp_path, g_sd, 128, 3, "gelu", layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                        special_tokens={"start": 49406, "end": 49407, "pad": 0})
    tokenizer = comfy.sdxl_clip.SDXLTokenizer()
    fake_sdxl = types.SimpleNamespace(embedder=Timestep(SIZE_EMBED), noise_augmentor=None)
    for i, p in enumerate(prompts):
        t = tokenizer.tokenize_with_weights(p)
        l_out = clip_l.encode_token_weights(t["l"])[0]
        g_out, g_pooled = clip_g.encode_token_weights(t["g"])[:2]
        assert rel_err(context[i : i + 1], torch.cat([l_out, g_out], dim=-1)) <= 1e-5, p
        adm = comfy.model_base.SDXL.encode_adm(fake_sdxl, pooled_output=g_pooled, width=128, height=96)
        assert rel_err(y[i : i + 1], adm) <= 1e-5, p
    with torch.no_grad():  # and transformers' own pooled projection
        emb = parts["clip_g"](base.text.tokenizer(prompts, pad_id=0)).text_embeds
    assert rel_err(y[:, :128], emb) <= 1e-5


# -- VAE --

def test_vae_matches_comfy_and_diffusers(comfy, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    parts = sd1_checkpoint(tmp_path / "sd1.safetensors")
    ours = load_base_model(tmp_path / "sd1.safetensors", tokenizer=TOKENIZER_DIR).vae
    assert ours.config.scale_factor == 0.18215
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = parts["vae"]
    with torch.no_grad():
        mean = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]  # ComfyUI's encoder; the posterior mean
        latents = ours.encode(x)
        assert rel_err(latents, mean * 0.18215) <= 1e-5
        assert rel_err(ours.decode(latents), vae.decode(latents / 0.18215)) <= 1e-5
    # diffusers, through its own conversion of the ldm keys in our file
    ckpt = load_file(tmp_path / "sd1.safetensors")
    cfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64)
    dv = DiffusersVAE(**cfg).eval()
    dv.load_state_dict(convert_ldm_vae_checkpoint(ckpt, cfg), strict=True)
    with torch.no_grad():
        assert rel_err(latents, dv.encode(x).latent_dist.mean * 0.18215) <= 1e-5
        assert rel_err(ours.decode(latents), dv.decode(latents / 0.18215).sample) <= 1e-5


# -- UNet from a whole checkpoint --

def test_unet_from_whole_sd1_checkpoint_matches_comfys_loader(comfy, tmp_path):
    import comfy.sd

    path = tmp_path / "sd15.safetensors"
    sd1_checkpoint(path, unet=UNET_SD15_DETECTABLE, context_dim=768, dtype=torch.float16)  # shapes ComfyUI detects as SD15; CLIP 64 wide
    theirs = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0].model.diffusion_model
    ours = load_unet(path)
    x, t = unit_inputs(latent=8)
    ctx = torch.randn(2, 7, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx), theirs(x, t, ctx)) <= 1e-5
    # the whole base cannot be assembled from it: this file's 64-wide CLIP does not fit the UNet's 768-wide cross-attention
    with pytest.raises(CheckpointError, match="64 channels but the UNet's cross-attention expects 768"):
        load_base_model(path, tokenizer=TOKENIZER_DIR)


def test_pickled_ckpt_is_read_with_weights_only(comfy, tmp_path):
    parts = sd1_checkpoint(tmp_path / "sd1.safetensors")
    torch.save({"state_dict": load_file(tmp_path / "sd1.safetensors"), "global_step": 470000}, tmp_path / "sd1.ckpt")  # the ldm .ckpt wrapper
    base = load_base_model(tmp_path / "sd1.ckpt", tokenizer=TOKENIZER_DIR)
    x, t = unit_inputs()
    ctx = base.text(["a red circle", ""])
    with torch.no_grad():
        assert rel_err(base.unet(x, t, ctx), parts["unet"](x, t, ctx)) <= 1e-5


def test_sdxl_unet_from_whole_checkpoint_matches_comfy(comfy, tmp_path):
    parts = sdxl_checkpoint(tmp_path / "xl.safetensors")
    base = load_base_model(tmp_path / "xl.safetensors", tokenizer=TOKENIZER_DIR, image_size=(64, 64))
    assert base.family.name == "sdxl" and base.vae.config.scale_factor == 0.13025 and base.prediction == "eps"
    context, y = base.text(["a red circle", ""])
    x, t = unit_inputs()
    with torch.no_grad():
        assert rel_err(base.unet(x, t, context, y), parts["unet"](x, t, context, y)) <= 1e-5


# -- diffusers folders --

def diffusers_folder(root, xl: bool):
    """A diffusers pipeline folder saved by diffusers/transformers themselves (tiny), with the real tokenizer files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from factories import randomize_

    if xl:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(64, 128), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128, attention_head_dim=(1, 2),
                                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMBED,
                                    projection_class_embeddings_input_dim=64 + 6 * SIZE_EMBED)
    else:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 64, 64],
                        layers_per_block=1, latent_channels=4, scaling_factor=0.13025 if xl else 0.18215)
    randomize_(unet, 1).eval().save_pretrained(root / "unet", **({} if xl else {"max_shard_size": "2MB"}))  # SD1: sharded weights
    randomize_(vae, 2).eval().save_pretrained(root / "vae")
    encoders = [hf_clip(64, seed=3)]
    encoders[0].save_pretrained(root / "text_encoder")
    copy_tokenizer(root / "tokenizer")
    if xl:
        encoders.append(hf_clip(64, layers=3, act="gelu", projection=True, seed=4))
        encoders[1].save_pretrained(root / "text_encoder_2")
        copy_tokenizer(root / "tokenizer_2", pad_token="!")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"}))
    return unet, vae, encoders


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
def test_diffusers_folder_matches_diffusers(comfy, tmp_path, xl):
    from transformers import CLIPTokenizerFast as HF

    unet, vae, encoders = diffusers_folder(tmp_path, xl)
    assert xl or (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()  # the SD1 one is sharded
    base = load_base_model(tmp_path, image_size=(64, 64))  # tokenizer/ found in the folder
    assert base.family.name == ("sdxl" if xl else "sd1") and base.vae.config.scale_factor == (0.13025 if xl else 0.18215)
    # no "!": diffusers' SDXL tokenizer_2 declares "!" its pad token, so transformers turns a "!" in the prompt into the pad id 0
    # where the BPE (ComfyUI, open_clip, and so SDXL's training) gives "!</w>" = 256; our tokenizer follows the BPE
    prompts = ["a red circle, on blue.", ""]
    out = base.text(prompts)
    with torch.no_grad():  # as diffusers' pipelines encode prompts
        ids = [HF.from_pretrained(str(tmp_path / t))(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
               for t in (["tokenizer", "tokenizer_2"] if xl else ["tokenizer"])]
        if xl:
            context, y = out
            h = [e(i, output_hidden_states=True) for e, i in zip(encoders, ids)]
            ref_ctx = torch.cat([h[0].hidden_states[-2], h[1].hidden_states[-2]], dim=-1)
            assert rel_err(context, ref_ctx) <= 1e-5
            added = {"text_embeds": h[1].text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(2, 1)}
        else:
            context, y = out, None
            ref_ctx = encoders[0](ids[0]).last_hidden_state
            assert rel_err(context, ref_ctx) <= 1e-5
            added = None
        x, t = unit_inputs()
        ref = unet(x, t, encoder_hidden_states=ref_ctx, added_cond_kwargs=added).sample
        assert rel_err(base.unet(x, t, context, y), ref) <= 1e-5
        img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
        latents = base.vae.encode(img)
        assert rel_err(latents, vae.encode(img).latent_dist.mean * vae.config.scaling_factor) <= 1e-5
        assert rel_err(base.vae.decode(latents), vae.decode(latents / vae.config.scaling_factor).sample) <= 1e-5


# -- bad base models get clear errors --

@pytest.fixture(scope="module")
def sd1_tensors(tmp_path_factory, comfy):
    path = tmp_path_factory.mktemp("sd1") / "sd1.safetensors"
    sd1_checkpoint(path)
    return load_file(path)


@pytest.mark.parametrize("case, error, message", [
    ("sd3", UnsupportedModelError, "Stable Diffusion 3"),
    ("flux", UnsupportedModelError, "Flux"),
    ("refiner", UnsupportedModelError, "SDXL refiner"),
    ("controlnet", UnsupportedModelError, "a ControlNet, not a base model"),
    ("inpaint", UnsupportedModelError, "9 input channels"),
    ("bare_unet", IncompleteModelError, "bare UNet"),
    ("no_vae", IncompleteModelError, "missing VAE"),
    ("no_text", IncompleteModelError, "missing text encoder"),
    ("broken_text", CheckpointError, "CLIP ViT-L text encoder.*1 missing"),
])
def test_bad_single_files_get_clear_errors(tmp_path, sd1_tensors, case, error, message):
    sd = dict(sd1_tensors)
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    if case == "sd3":
        sd = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(8), **unet}
    elif case == "flux":
        sd = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(8), "img_in.weight": torch.zeros(8, 8)}
    elif case == "refiner":
        sd = {**unet, **{k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.model."): v for k, v in sd.items() if k.startswith("cond_stage_model.")}}
    elif case == "controlnet":
        sd = {"control_model." + k[len("model.diffusion_model."):]: v for k, v in unet.items() if k.startswith("model.diffusion_model.input_blocks.")}
        sd["control_model.zero_convs.0.0.weight"] = torch.zeros(64, 64, 1, 1)
    elif case == "inpaint":
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(64, 9, 3, 3)
    elif case == "bare_unet":
        sd = {k[len("model.diffusion_model."):]: v for k, v in unet.items()}
    elif case == "no_vae":
        sd = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    elif case == "no_text":
        sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    elif case == "broken_text":
        del sd["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"]
    path = save(tmp_path / f"{case}.safetensors", sd)
    with pytest.raises(error, match=message) as e:
        load_base_model(path, tokenizer=TOKENIZER_DIR)
    assert str(path) in str(e.value)  # every message names the file


def test_missing_tokenizer_says_where_to_get_it(tmp_path, sd1_tensors, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    path = save(tmp_path / "sd1.safetensors", sd1_tensors)
    with pytest.raises(TokenizerError, match=r"no CLIP tokenizer files .*--tokenizer DIR.*comfy/sd1_tokenizer.*openai/clip-vit-large-patch14"):
        load_base_model(path)
    with pytest.raises(TokenizerError, match="no vocab.json"):
        load_base_model(path, tokenizer=tmp_path)
    monkeypatch.setenv("COMFYUI_PATH", str(TOKENIZER_DIR.parent.parent))  # a ComfyUI install is searched
    assert load_base_model(path).text.tokenizer.source == str(TOKENIZER_DIR)


def test_bad_diffusers_folders_get_clear_errors(tmp_path):
    sd3 = tmp_path / "sd3"
    (sd3 / "transformer").mkdir(parents=True)
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UnsupportedModelError, match="StableDiffusion3Pipeline"):
        load_base_model(sd3)
    no_vae = tmp_path / "no_vae"
    for d in ("unet", "text_encoder"):
        (no_vae / d).mkdir(parents=True)
    with pytest.raises(IncompleteModelError, match="missing VAE: no vae/"):
        load_base_model(no_vae)


def test_v_prediction_marker(comfy, tmp_path):
    sd2_checkpoint(tmp_path / "v.safetensors", v_pred=True)
    sd2_checkpoint(tmp_path / "plain.safetensors")
    assert load_base_model(tmp_path / "v.safetensors", tokenizer=TOKENIZER_DIR).prediction == "v"
    assert load_base_model(tmp_path / "plain.safetensors", tokenizer=TOKENIZER_DIR).prediction is None  # SD2 files do not say
