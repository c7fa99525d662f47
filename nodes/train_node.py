"""Train ControlNet (Suite): trains a ControlNet on a dataset folder inside ComfyUI, with `controlnet_core.train`.

Why a node: the base model, text encoder and VAE are already loaded in ComfyUI, and the trained ControlNet
can go straight into an Apply node to be tried. The node runs exactly the library's Trainer (the paper's
recipe: locked base, zero convolutions, 50% empty prompts): it only supplies ComfyUI's CLIP and VAE as the
encoders, ComfyUI's progress bar and its Cancel button (which saves a checkpoint before stopping).

Files: `<output>/controlnet_training/<name>/` holds checkpoint.pt (resume; the one before it is kept as
checkpoint.prev.pt), loss.png, losses.json and the encoder cache; the trained ControlNet goes to
`<first controlnet folder>/<name>.safetensors` (v1.1 layout; under `make run` on an embedded host, the run folder's
`models/controlnet`, never the host's own inside the venv). Neither an earlier run of that name nor a model file
of that name that this run did not write is ever replaced unless `overwrite` is on: the node stops before training.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..annotators.training import annotator_condition, annotator_names, annotator_params
from ..controlnet_core import ControlNetError, LimitExceededError, create_from_unet, load_control
from ..controlnet_core.train import ControlDataset, DatasetError, TrainConfig, Trainer
from ..controlnet_core.train.buckets import Buckets
from ..controlnet_core.train.checkpointing import DEFAULT_SCOPE
from ..controlnet_core.train.dataset_check import BATCH_LIMIT, IMAGE_LIMIT
from ..controlnet_core.train.report import TrainingReport
from ..controlnet_core.train.run_files import CHECKPOINT, check_can_start, resumable
from .comfy_adapter import SuiteControl, make_patcher
from .loader import host_compute_dtype
from .train_adapter import NODE, base_unet, check_trainable, image_encoder, label_channels, node_error, text_encoder

log = logging.getLogger(__name__)

PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
CHECKPOINT_SCOPES = {"ControlNet only": "controlnet", "ControlNet and base UNet": "all"}  # shown name -> TrainConfig value
CHECKPOINT_SCOPE_NAMES = {v: k for k, v in CHECKPOINT_SCOPES.items()}
SAVE_EVERY = 250  # steps between checkpoints (also saved at the end and on Cancel)
OUTPUT_RECORD = "output.json"  # in the run folder: the model file this run last wrote (path, size, mtime)


def record_output(run_dir: Path, out: Path) -> None:
    st = out.stat()
    tmp = run_dir / (OUTPUT_RECORD + ".part")
    tmp.write_text(json.dumps({"path": str(out), "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, run_dir / OUTPUT_RECORD)


def written_by_run(run_dir: Path, out: Path) -> bool:
    """Whether `out` is, unchanged, the file this run folder's training wrote last."""
    try:
        rec = json.loads((run_dir / OUTPUT_RECORD).read_text())
        st = out.stat()
    except (OSError, ValueError):
        return False
    return rec.get("path") == str(out) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns


def controlnet_output_folder() -> Path:
    """Where a trained model is saved: ComfyUI's first controlnet folder, except under `make run` on an embedded host.
    That host's own models folder lives inside the venv, which a re-install replaces, so the run script names the run
    folder's models (CNS_MODELS_DIR) instead, when ComfyUI lists it."""
    folders = [Path(f) for f in folder_paths.get_folder_paths("controlnet")]
    preferred = os.environ.get("CNS_MODELS_DIR")
    if preferred:
        wanted = Path(preferred) / "controlnet"
        for f in folders:
            if f.resolve() == wanted.resolve():
                return f
    return folders[0]


def check_may_write(run_dir: Path, out: Path, *, resume: bool, overwrite: bool) -> None:
    """Stop before anything is replaced that the user did not ask to replace: an earlier run's checkpoints (when
    resume is off), or a model file of the output name that this run did not write (a downloaded model, say)."""
    try:
        check_can_start(run_dir, resume=resume, overwrite=overwrite, outputs=(), resume_hint="resume on",
                        overwrite_hint="overwrite on", other_hint="another output_name")
    except ControlNetError as e:
        raise node_error(str(e)) from None
    if out.exists() and not overwrite and not written_by_run(run_dir, out):
        raise node_error(f"{out} already exists and was not written by this training run; it is never replaced unless you ask. "
                     "Choose another output_name, or turn overwrite on to replace it.")


def resolve_folder(text: str) -> Path:
    """An absolute path, or one relative to ComfyUI's input folder."""
    if not text.strip():
        raise node_error("dataset_folder is empty; give the path of a folder with prompt.json (fill50k layout) or "
                     "images/ + conditions/ (+ captions/).")
    p = Path(text.strip()).expanduser()
    candidates = [p] if p.is_absolute() else [Path(folder_paths.get_input_directory()) / p, p]
    for c in candidates:
        if c.is_dir():
            return c
    raise node_error(f"dataset folder '{text}' does not exist (looked in {', '.join(str(c) for c in candidates)}). "
                 "Give an absolute path or a folder inside ComfyUI's input folder.")


def output_stem(name: str) -> str:
    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or not re.fullmatch(r"[\w.\- ]+", stem) or stem.startswith("."):
        raise node_error(f"output_name '{name}' is not a plain file name; use letters, digits, '-', '_', '.' or spaces (no folders).")
    return stem


class ControlNetSuiteTrain:
    DESCRIPTION = (
        "Trains a ControlNet on a folder of (condition, image, caption) triples, as the ControlNet paper does: the base "
        "model is locked, a trainable copy of its encoder starts from zero convolutions, and a share of the captions is "
        "replaced by the empty prompt. Images of any size are grouped into aspect-ratio buckets of about resolution² "
        "pixels. Cancel saves a checkpoint; queue again with resume on to continue. The result is saved to the "
        "controlnet models folder and returned, ready for the Apply ControlNet nodes."
    )
    CATEGORY = "conditioning/controlnet"
    RETURN_TYPES = ("CONTROL_NET",)
    RETURN_NAMES = ("control_net",)
    OUTPUT_TOOLTIPS = ("The trained ControlNet (also saved as models/controlnet/<output_name>.safetensors).",)
    FUNCTION = "train"
    OUTPUT_NODE = True  # it writes a model file: run even when nothing uses the output

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model (SD1.x, SD2.x or SDXL base). It stays locked; the ControlNet is created from its UNet."}),
                "clip": ("CLIP", {"tooltip": "The base model's text encoder: captions are encoded with it, as CLIPTextEncode does."}),
                "vae": ("VAE", {"tooltip": "The base model's VAE: training images are encoded to latents with it."}),
                "dataset_folder": ("STRING", {"default": "", "tooltip": (
                    "Folder with prompt.json (fill50k layout: one JSON line per pair, source/target/prompt) or images/ + "
                    "conditions/ (+ captions/NAME.txt). images/ alone is enough with an annotator. Absolute, or relative "
                    "to ComfyUI's input folder.")}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 10_000_000, "tooltip": (
                    "Total optimizer steps. A resumed run continues up to this number.")}),
                "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1e-2, "step": 1e-6, "round": False, "tooltip": (
                    "AdamW learning rate. The paper uses 1e-5.")}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 512, "tooltip": (
                    f"Images per step (from one aspect-ratio bucket). A batch may hold up to {BATCH_LIMIT[1]:g} megapixels "
                    f"(e.g. 16 at 1024, 64 at 512; environment variable {BATCH_LIMIT[0]}); above that the node stops before training.")}),
                "empty_prompt_rate": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                    "Share of captions replaced by the empty prompt, so the ControlNet learns to read the condition "
                    "itself. The paper uses 0.5.")}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64, "tooltip": (
                    "Training images are resized and centre-cropped into aspect-ratio buckets of about resolution x "
                    f"resolution pixels (sides multiples of 64). Up to {IMAGE_LIMIT[1]:g} megapixels per image (about 2048; "
                    f"environment variable {IMAGE_LIMIT[0]}); above that the node stops before training.")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": (
                    "Seed of the data order, noise, timesteps and empty-prompt draws: the same seed and data train the same "
                    "model. Keep it fixed (control after generate: fixed): a checkpoint resumes only with the same seed.")}),
                "output_name": ("STRING", {"default": "my_controlnet", "tooltip": (
                    "File name of the result in models/controlnet (.safetensors is added) and of its training folder in output/controlnet_training.")}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": (
                    "Continue from this output_name's last checkpoint (after a Cancel, or to train more steps). Off: start over; "
                    "an earlier run of this output_name is then only replaced with overwrite on.")}),
            },
            "optional": {
                "annotator": (["none"] + annotator_names(), {"default": "none", "tooltip": (
                    "Derive each condition image from its training image with this annotator (for folders with only images "
                    "and captions); its detect resolution follows 'resolution'. none: use the dataset's condition images.")}),
                "precision": (PRECISIONS, {"default": "auto", "tooltip": (
                    "auto: bf16 mixed precision on GPUs that support it (fp16 on older ones), fp32 on the CPU. Mixed "
                    "precision keeps the locked base in half precision and the trained weights in fp32.")}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": (
                    "Recompute activations in the backward pass, for less memory at some more time per step; "
                    "checkpointing_scope says which blocks.")}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": (
                    "Off (default): never replace an earlier training run of this output_name (with resume off) nor a file "
                    "models/controlnet/<output_name>.safetensors that this run did not write, such as a downloaded model; "
                    "the node stops before training and says so. On: replace them.")}),
                "checkpointing_scope": (list(CHECKPOINT_SCOPES), {"default": CHECKPOINT_SCOPE_NAMES[DEFAULT_SCOPE], "tooltip": (
                    "With gradient_checkpointing on. 'ControlNet only' (as diffusers' train_controlnet.py): recompute the "
                    "trainable copy's blocks. 'ControlNet and base UNet': also the hint encoder and the locked UNet's blocks, "
                    "for the least memory at more time per step (bench/RESULTS.md has both at 512 and 1024 px).")}),
            },
        }

    def train(self, model, clip, vae, dataset_folder, steps, learning_rate, batch_size, empty_prompt_rate, resolution, seed,
              output_name, resume, annotator="none", precision="auto", gradient_checkpointing=True, overwrite=False,
              checkpointing_scope=None):
        if gradient_checkpointing:
            scope = CHECKPOINT_SCOPES.get(checkpointing_scope or CHECKPOINT_SCOPE_NAMES[DEFAULT_SCOPE])
            if scope is None:
                raise node_error(f"checkpointing_scope {checkpointing_scope!r} is not one of {', '.join(CHECKPOINT_SCOPES)}.")
            gradient_checkpointing = scope
        # ComfyUI runs nodes under torch.inference_mode(); training needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            return self._train(model, clip, vae, dataset_folder, steps, learning_rate, batch_size, empty_prompt_rate, resolution,
                               seed, output_name, resume, annotator, precision, gradient_checkpointing, overwrite)

    def _train(self, model, clip, vae, dataset_folder, steps, learning_rate, batch_size, empty_prompt_rate, resolution, seed,
               output_name, resume, annotator, precision, gradient_checkpointing, overwrite=False):
        prediction = check_trainable(model)
        if clip is None:
            raise node_error("no CLIP connected (this checkpoint has no text encoder); connect the base model's CLIP, e.g. from a CLIPLoader.")
        if vae is None:
            raise node_error("no VAE connected; connect the base model's VAE.")
        stem = output_stem(output_name)
        folder = resolve_folder(dataset_folder)
        device = comfy.model_management.get_torch_device()
        condition_fn = None
        if annotator and annotator != "none":
            from .annotator_nodes import annotator_dirs

            params = {"resolution": resolution} if "resolution" in annotator_params(annotator) else {}
            condition_fn = annotator_condition(annotator, device=device, dirs=annotator_dirs(), **params)
        try:  # every file, and the memory of a batch of resolution x batch_size, before anything is loaded
            dataset = ControlDataset(folder, buckets=Buckets(resolution=resolution), condition_fn=condition_fn)
            if len(dataset) < batch_size:
                raise node_error(f"{folder} has {len(dataset)} training pairs, fewer than one batch of {batch_size}; add data or lower batch_size.")
            dataset.check_batches(batch_size)
        except (DatasetError, LimitExceededError) as e:
            raise node_error(str(e)) from None

        run_dir = Path(folder_paths.get_output_directory()) / "controlnet_training" / stem
        ckpt = run_dir / CHECKPOINT
        out = controlnet_output_folder() / f"{stem}.safetensors"
        check_may_write(run_dir, out, resume=resume, overwrite=overwrite)  # before minutes of set-up, not after hours of training
        if precision == "auto":
            precision = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        config = TrainConfig(lr=learning_rate, batch_size=batch_size, empty_prompt_rate=empty_prompt_rate, prediction=prediction,
                             seed=seed, mixed_precision={"fp32": "no"}.get(precision, precision),
                             gradient_checkpointing=gradient_checkpointing, cache_dir=str(run_dir / "cache"))
        encode_text = text_encoder(clip, device, size=resolution, label=label_channels(model))
        encode_text([""])  # a CLIP that does not fit the model (SDXL: the pooled width) stops here, before the UNet is copied
        unet, heads = base_unet(model, device)
        controlnet = create_from_unet(unet.state_dict(), seed=seed, device=device, **heads)
        trainer = Trainer(unet, controlnet, encode_text, image_encoder(vae, model, device), dataset, config)
        if resume and resumable(run_dir):
            try:
                trainer.load_checkpoint(ckpt, fresh_hint="start fresh: turn overwrite on (resume off), or choose another output_name")
            except ControlNetError as e:
                raise node_error(f"cannot resume: {e}") from None
            log.info("%s: resumed '%s' at step %d of %d", NODE, stem, trainer.step, steps)
        report = TrainingReport(run_dir, every=max(1, min(100, steps // 20)), keep_history=bool(resume))
        pbar = comfy.utils.ProgressBar(steps)
        pbar.update_absolute(min(trainer.step, steps), steps)

        def on_step(step: int, loss: float) -> None:
            report(step, loss)
            pbar.update_absolute(step, steps)
            if step % SAVE_EVERY == 0:
                trainer.save_checkpoint(ckpt)
            comfy.model_management.throw_exception_if_processing_interrupted()

        try:
            # no checkpoint argument: Trainer.train would install a SIGINT handler, which only the main thread may
            # do (ComfyUI runs prompts in a worker thread); saving happens here instead
            trainer.train(max(0, steps - trainer.step), on_step=on_step)
        except comfy.model_management.InterruptProcessingException:
            trainer.save_checkpoint(ckpt)
            report.finish(trainer.step)
            log.info("%s: cancelled at step %d; checkpoint saved to %s (queue again with resume on to continue)", NODE, trainer.step, ckpt)
            raise
        trainer.save_checkpoint(ckpt)
        report.finish(trainer.step)

        out.parent.mkdir(parents=True, exist_ok=True)
        check_may_write(run_dir, out, resume=True, overwrite=overwrite)  # again: the file may have appeared meanwhile
        replaced = out.exists()
        trainer.save_controlnet(out, overwrite=True)  # check_may_write above decided
        record_output(run_dir, out)
        log.info("%s: %d steps, saved %s%s", NODE, trainer.step, out, " (replacing the earlier file of that name)" if replaced else "")
        trainer = unet = controlnet = None  # freed before the result is loaded for sampling
        comfy.model_management.soft_empty_cache()
        loaded = load_control(out, dtype=host_compute_dtype, device=comfy.model_management.unet_offload_device())
        return (SuiteControl(loaded, make_patcher(loaded.model), name=out.name),)
