"""Test-only ComfyUI nodes: conditioning without CLIP, synthetic images, latent capture, and a UNet spy."""
import torch

CAPTURED: dict = {}
SPY: list = []
PROVIDED: dict = {}  # key -> (MODEL, CLIP, VAE) built by a test in this process (SuiteTestProvided)
PROVIDED_CONTROL: dict = {}  # key -> a CONTROL_NET built by a test in this process (SuiteTestProvidedControlNet)


class SuiteTestConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}), "width": ("INT", {"default": 768, "min": 8, "max": 4096})},
                "optional": {"pooled": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "width of a pooled_output (SD3 needs one); 0: none"})}}

    def make(self, seed, width, pooled=0):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
        return ([[torch.randn(1, 77, width, generator=g), extra]],)


class SuiteTestImage:
    """A smooth synthetic image batch (values in [0, 1]); channels 1, 3 or 4."""

    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 64, "min": 1, "max": 8192}), "height": ("INT", {"default": 64, "min": 1, "max": 8192}),
                             "channels": ("INT", {"default": 3, "min": 1, "max": 4}), "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def make(self, width, height, channels, batch, seed):
        g = torch.Generator().manual_seed(seed)
        img = torch.rand(batch, channels, max(1, height // 8), max(1, width // 8), generator=g)
        img = torch.nn.functional.interpolate(img, size=(height, width), mode="bilinear", align_corners=False)
        return (img.movedim(1, -1).clamp(0, 1),)


class SuiteTestCapture:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "capture"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": "out"})}}

    def capture(self, samples, key):
        CAPTURED[key] = samples["samples"].clone()
        return {}


class SuiteTestCaptureImage:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "capture"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "key": ("STRING", {"default": "image"})}}

    def capture(self, image, key):
        CAPTURED[key] = image.clone()
        return {}


class SuiteTestSpy:
    """Wraps the model so every UNet call's cond/uncond layout, control residuals and output are recorded in SPY."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "run"})}}

    def wrap(self, model, tag):
        m = model.clone()

        def wrapper(apply_model, args):
            c = args["c"]
            ctrl = c.get("control")  # snapshot first: the UNet pops these lists
            ctrl = None if ctrl is None else {k: [None if t is None else t.clone() for t in v] for k, v in ctrl.items()}
            out = apply_model(args["input"], args["timestep"], **c)
            SPY.append({
                "tag": tag,
                "cond_or_uncond": list(args["cond_or_uncond"]),
                "sigma": float(args["timestep"][0]),
                "control": ctrl,
                "input": args["input"].clone(),
                "context": c["c_crossattn"].clone() if c.get("c_crossattn") is not None else None,
                "output": out.clone(),
            })
            return out

        m.set_model_unet_function_wrapper(wrapper)
        return (m,)


class SuiteTestProvided:
    """MODEL, CLIP and VAE objects a test built in-process (e.g. a tiny SDXL that no checkpoint loader detects)."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "base"})}}

    def get(self, key):
        return PROVIDED[key]


class SuiteTestProvidedControlNet:
    """A CONTROL_NET a test built in-process (e.g. ComfyUI's own Flux ControlNet at a width its loader cannot detect)."""

    CATEGORY = "testing"
    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "control"})}}

    def get(self, key):
        return (PROVIDED_CONTROL[key],)


class SuiteTestProvidedPatch:
    """A MODEL_PATCH a test built in-process (ComfyUI's own model-patch classes at a width its loader cannot build)."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL_PATCH",)
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "patch"})}}

    def get(self, key):
        return (PROVIDED_CONTROL[key],)


NODE_CLASS_MAPPINGS = {
    "SuiteTestProvided": SuiteTestProvided,
    "SuiteTestProvidedPatch": SuiteTestProvidedPatch,
    "SuiteTestProvidedControlNet": SuiteTestProvidedControlNet,
    "SuiteTestConditioning": SuiteTestConditioning,
    "SuiteTestImage": SuiteTestImage,
    "SuiteTestCapture": SuiteTestCapture,
    "SuiteTestSpy": SuiteTestSpy,
    "SuiteTestCaptureImage": SuiteTestCaptureImage,
}
