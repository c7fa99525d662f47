"""Run real prompts through ComfyUI's own PromptExecutor, with this repository loaded as a custom node.

Works with ComfyUI a28a9dc (embedded) and 0.8.0 (COMFYUI_PATH); one host per interpreter.
"""
from __future__ import annotations

import asyncio
import itertools
import sys
import uuid
from pathlib import Path

import torch
from comfy_host import import_comfy, is_new_comfy
from factories import ControlNetConfig, comfy_unet, randomize_, save

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = ControlNetConfig(model_channels=320, channel_mult=(1,), num_res_blocks=(1,), transformer_depth=(1,), context_dim=768)
TINY_UNION = ControlNetConfig(**{**TINY_UNET.__dict__, "union_types": 8, "union_type_dim": 256})  # a ProMax-like union for it
TINY_UNION_FILE = "union_promax_tiny.safetensors"


def tiny_union_file(folder: Path) -> Path:
    """The tiny 8-type union ControlNet (random weights, seed 11) that stands in for the SDXL ProMax file."""
    from factories import random_controlnet

    path = folder / TINY_UNION_FILE
    if not path.exists():
        save(path, random_controlnet(TINY_UNION, seed=11).state_dict())
    return path


# A tiny SD3-family base (ComfyUI's MMDiT reads its depth as width / 64: 4 joint blocks of 256) and what its
# ControlNets take: text tokens 96 wide, a pooled vector of 2048 (the real width: ComfyUI fixes it for Stability's SD3.5
# ControlNets), a 24 x 24 grid of positions.
SD3_TINY = dict(width=256, context=96, pooled=2048, grid=24)
TINY_SD3_CHECKPOINT = "tiny_sd3.safetensors"


def make_tiny_sd3_checkpoint(path: Path, seed: int = 20) -> Path:
    """ComfyUI's own MMDiT (random weights) plus a 16-channel TAESD VAE, saved as a checkpoint CheckpointLoaderSimple
    detects as SD3."""
    if path.exists():
        return path
    import comfy.ops
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    t = SD3_TINY
    base = OpenAISignatureMMDITWrapper(
        depth=t["width"] // 64, in_channels=16, out_channels=16, patch_size=2, adm_in_channels=t["pooled"], pos_embed_max_size=t["grid"],
        num_patches=t["grid"] ** 2, context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": t["context"], "out_features": t["width"]}},
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
    )
    randomize_(base, seed)
    with torch.no_grad():  # a buffer ComfyUI makes with torch.empty (randomize_ fills parameters only): never leave garbage
        base.pos_embed.copy_(torch.randn(base.pos_embed.shape, generator=torch.Generator().manual_seed(seed + 2)) * 0.02)
    vae = randomize_(comfy.taesd.taesd.TAESD(latent_channels=16), seed + 1)
    sd = {"model.diffusion_model." + k: v for k, v in base.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    return save(path, sd)


def tiny_sd3_controlnet(path: Path, *, width: int = SD3_TINY["width"], blocks: int = 2, inpaint: bool = False, seed: int = 21) -> Path:
    """A random-weight SD3 ControlNet of the diffusers layout (the keys of diffusers' SD3ControlNetModel) for the tiny base."""
    if path.exists():
        return path
    from controlnet_core.mmdit import SD3ControlNet, SD3ControlNetConfig

    t = SD3_TINY
    cfg = SD3ControlNetConfig(hidden_size=width, num_layers=blocks, control_channels=17 if inpaint else 16, pooled_projection_dim=t["pooled"],
                              joint_attention_dim=t["context"], pos_embed_max_size=t["grid"], mlp_hidden_dim=4 * width)
    return save(path, randomize_(SD3ControlNet(cfg), seed).state_dict())


def tiny_sd35_controlnet(path: Path, control_type: int, *, blocks: int = 2, seed: int = 24) -> Path:
    """A random-weight ControlNet in the layout of Stability's SD3.5 release files (no patch embedding: the base's)."""
    if path.exists():
        return path
    from controlnet_core.mmdit.sd35_stability import SD35ControlNet, SD35ControlNetConfig

    w = SD3_TINY["width"]
    sd = randomize_(SD35ControlNet(SD35ControlNetConfig(hidden_size=w, num_layers=blocks, mlp_hidden_dim=4 * w)), seed).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("x_embedder.")}
    sd["control_type"] = torch.tensor([float(control_type)])
    return save(path, sd)


class Stub:
    """The bits of PromptServer the executor touches when headless."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """SD1.5-shaped (320 channels, one level, context 768) UNet plus a TAESD VAE, random weights."""
    import comfy.taesd.taesd

    unet = comfy_unet(TINY_UNET, seed=seed)
    vae = randomize_(comfy.taesd.taesd.TAESD(), seed + 1)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    return save(path, sd)


class Host:
    def __init__(self, workdir: Path, cpu: bool = True):
        self.root = import_comfy(cpu=cpu)
        self.new = is_new_comfy()
        import folder_paths

        self.dirs = {n: workdir / n for n in ("checkpoints", "controlnet", "annotators", "custom_nodes", "output", "input")}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        (self.dirs["custom_nodes"] / "controlnet-suite").symlink_to(ROOT, target_is_directory=True)
        (self.dirs["custom_nodes"] / "suite_test_nodes").symlink_to(ROOT / "tests" / "comfy_test_nodes", target_is_directory=True)
        exts = folder_paths.supported_pt_extensions
        for name in ("checkpoints", "controlnet", "annotators"):
            folder_paths.folder_names_and_paths[name] = ([str(self.dirs[name])], exts)
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(self.dirs["custom_nodes"])], set())
        folder_paths.set_output_directory(str(self.dirs["output"]))
        folder_paths.set_input_directory(str(self.dirs["input"]))
        import execution

        import nodes

        self.nodes, self.execution = nodes, execution
        if hasattr(nodes, "init_extra_nodes"):
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        else:
            nodes.init_custom_nodes()
        missing = [n for n in ("ControlNetSuiteApply", "SuiteTestCapture") if n not in nodes.NODE_CLASS_MAPPINGS]
        if missing:
            raise RuntimeError(f"custom nodes failed to load: {missing}")
        self.test_nodes = sys.modules[nodes.NODE_CLASS_MAPPINGS["SuiteTestCapture"].__module__]
        self.server = Stub()
        self.checkpoint = make_tiny_checkpoint(self.dirs["checkpoints"] / "tiny_sd15.safetensors").name

    # -- running prompts --

    def validate(self, prompt: dict):
        if self.new:
            return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        return self.execution.validate_prompt(prompt)

    def run(self, prompt: dict) -> dict:
        """Execute; returns the captured latents (SuiteTestCapture). Raises with ComfyUI's error on failure."""
        self.test_nodes.CAPTURED.clear()
        ok, err, outputs, node_errors = self.validate(prompt)
        if not ok:
            raise PromptInvalid(err, node_errors)
        pid = str(uuid.uuid4())
        # a fresh executor per prompt: no outputs cached from an earlier test can stand in for a run
        if self.new:
            self.executor = self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
        else:
            self.executor = self.execution.PromptExecutor(self.server)
        self.executor.execute(prompt, pid, {}, outputs)
        if not self.executor.success:
            msgs = [m for m in self.executor.status_messages if m[0] == "execution_error"]
            raise PromptFailed(msgs[-1][1] if msgs else self.executor.status_messages)
        return dict(self.test_nodes.CAPTURED)

    @property
    def spy(self) -> list:
        return self.test_nodes.SPY


class PromptInvalid(Exception):
    def __init__(self, err, node_errors):
        super().__init__(f"{err} {node_errors}")
        self.err, self.node_errors = err, node_errors


class PromptFailed(Exception):
    def __init__(self, info):
        msg = info.get("exception_message", info) if isinstance(info, dict) else info
        super().__init__(str(msg))
        self.info = info


class Graph:
    """A tiny API-format prompt builder: g.add('KSampler', seed=1, model=(node, 0)) -> node id."""

    def __init__(self):
        self.prompt: dict = {}
        self._ids = itertools.count(1)

    def add(self, class_type: str, **inputs) -> str:
        nid = str(next(self._ids))
        self.prompt[nid] = {"class_type": class_type, "inputs": {k: ([v[0], v[1]] if isinstance(v, tuple) else v) for k, v in inputs.items()}}
        return nid


def base_graph(host: Host, *, seed: int = 7, steps: int = 4, cfg: float = 6.0, size: int = 64, batch: int = 1, spy_tag: str | None = None):
    """Checkpoint -> (spy) -> conditioning -> empty latent; returns (graph, model, pos, neg, latent)."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=host.checkpoint)
    model = (ckpt, 0)
    if spy_tag:
        model = (g.add("SuiteTestSpy", model=model, tag=spy_tag), 0)
    pos = (g.add("SuiteTestConditioning", seed=1, width=768), 0)
    neg = (g.add("SuiteTestConditioning", seed=2, width=768), 0)
    latent = (g.add("EmptyLatentImage", width=size, height=size, batch_size=batch), 0)
    return g, model, pos, neg, latent


def finish(g: Graph, model, pos, neg, latent, *, seed: int = 7, steps: int = 4, cfg: float = 6.0, key: str = "out") -> dict:
    ks = g.add("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal",
               positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    g.add("SuiteTestCapture", samples=(ks, 0), key=key)
    return g.prompt
