"""The frontend in a real browser: headless Chromium (selenium) on `make run`'s server, the way a user meets us.

One server and one page for the module. The page loads without console errors of ours; our nodes are in the node
library under their categories; every workflow in workflows/ opens through the frontend's own `app.loadGraphData`
with its nodes, links and widget values intact and fitted to a 1280x800 window, and runs to success when queued from
the page (`app.queuePrompt`) with the tests' tiny models swapped in through the graph's widgets; from ComfyUI 0.3.75
on, the template browser lists them under this extension, with their thumbnails. Screenshots go to
test-artifacts/browser/ (or $CNS_ARTIFACTS/browser/); CNS_UPDATE_DOCS=1 also rewrites the README's screenshot
(docs/images/workflow_canny.png) and the thumbnails (workflows/NAME.jpg):

    CNS_UPDATE_DOCS=1 make test PYTEST_ARGS="tests/test_browser.py -k pictures"

Without Chromium and chromedriver the module is skipped with the command that installs them
(`apt-get install chromium chromium-driver`), and fails instead when CNS_REQUIRE_BROWSER=1 (CI).
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from browser import Page, artifacts_dir, require_chromium
from comfy_host import is_oldest_host
from comfy_server import ComfyServer
from host import TINY_UNION_FILE, tiny_union_file
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
MODULE = "controlnet_suite"  # the name run_comfyui.sh links us under: the template browser's module name
VIEW = (1280, 800)  # the window the workflows' saved view (extra.ds, scripts/build_workflows.py) is fitted to
TINY = 64  # latent and image size of the test runs (px)
DOCS_IMAGE = ROOT / "docs" / "images" / "workflow_canny.png"
OLDEST = "ComfyUI a28a9dc's 2024 frontend"


def ids(paths):
    return [p.stem for p in paths]


# The DiT workflows need host nodes and widgets that the oldest host predates (EmptySD3LatentImage, UNETLoader's
# weight_dtype, CLIPLoader's newer types), so the compatibility subset leaves them out. Their bases (SD3.5, Flux,
# Qwen-Image, Z-Image) exist here only as tiny models the tests build in-process, because the host's loaders detect these
# families only at full width; the page's server is another process, with nothing built. tests/test_workflows.py runs
# each of them through the host's own executor with those tiny models instead.
IN_PROCESS_BASES = {"sd35_large_canny", "flux_union_depth_region", "qwen_image_instantx_canny", "qwen_image_diffsynth_canny_patch",
                    "zimage_fun_canny_patch"}


def compat_where(path: Path):
    """The workflows that also load on the oldest host's 2024 frontend (loadGraphData and queuePrompt exist there, with
    the same LiteGraph): every UNet-family one, marked so the compat subset includes them."""
    if path.stem in IN_PROCESS_BASES:
        return pytest.param(path)
    return pytest.param(path, marks=pytest.mark.compat)


# -- fixtures --

@pytest.fixture(scope="module")
def chromium():
    return require_chromium()  # first: a machine without Chromium skips before any server starts


@pytest.fixture(scope="module")
def server(chromium, host, tmp_path_factory):
    """`make run` with the tiny models (and the CLIP-carrying one the training workflow needs), its LoadImage files
    and the training workflow's dataset in the input folder."""
    from clip_checkpoint import tiny_checkpoint_with_clip

    from controlnet_core.train.toy import make_fill50k

    run = tmp_path_factory.mktemp("browser_run")
    ckpts, cns = host.dirs["checkpoints"], host.dirs["controlnet"]
    clip_ckpt = tiny_checkpoint_with_clip(host)
    (run / "models" / "checkpoints").mkdir(parents=True)
    (run / "models" / "checkpoints" / clip_ckpt).symlink_to(ckpts / clip_ckpt)  # 250 MB: linked, not copied
    srv = ComfyServer(run, models={"checkpoints": [ckpts / host.checkpoint],
                                   "controlnet": [cns / "cn_a.safetensors", cns / "cn_b.safetensors", tiny_union_file(cns)]})
    make_fill50k(run / "input" / "controlnet_dataset", n=2, size=TINY)
    with srv.start():
        # the server placed the shipped example images, if there are any; any image a workflow names and that is
        # still missing gets a synthetic one (before the page opens, so LoadImage previews load without a 404)
        for name in sorted({n["widgets_values"][0] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"] if n["type"] == "LoadImage"}):
            if not (run / "input" / name).exists():
                rng = np.random.default_rng(len(name))
                Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(run / "input" / name)
        srv.clip_checkpoint = clip_ckpt
        yield srv
        shutil.copy(srv.log_path, artifacts_dir() / "server.log")


@pytest.fixture(scope="module")
def page(server, chromium):
    p = Page(server.base, *chromium, width=VIEW[0], height=VIEW[1])
    try:
        p.open()
        if p.js("return !!window.comfyAPI"):  # 1.x: a new user's first page opens the template browser; close it
            p.wait("return __cns.dialogs().length", timeout=15, what="the first-run template browser")
            assert p.dismiss_dialogs() == ["global-workflow-template-selector"]
        time.sleep(1)  # the frontend's late start-up requests (release notes, settings) log their errors too
        yield p
    finally:
        (artifacts_dir() / "console.log").write_text(p.console_text() + "\n")
        p.close()


@pytest.fixture(scope="module")
def ours(server) -> dict[str, dict]:
    """Our nodes as the server declares them (object_info): by python_module, the custom node folder's name; the
    oldest host reports no python_module, and there our class-name prefix tells them apart."""
    info = server.object_info
    if any("python_module" in v for v in info.values()):
        found = {k: v for k, v in info.items() if v.get("python_module", "").split(".")[-1] == MODULE}
    else:
        found = {k: v for k, v in info.items() if k.startswith("ControlNetSuite")}
    assert {"ControlNetSuiteLoader", "ControlNetSuiteApply", "ControlNetSuiteStack", "ControlNetSuiteApplyStack"} <= found.keys(), sorted(found)
    return found


def load(page: Page, wf: dict) -> dict:
    """app.loadGraphData(file), then the graph read back from app.graph's serialisation."""
    page.js_async("return await __cns.load(args[0])", wf)
    return page.js("return __cns.serialize()")


def assert_no_new_console_errors(page: Page, when: str) -> None:
    errors = page.new_errors()
    assert not errors, f"console errors {when}:\n" + "\n".join(e.message for e in errors)


# -- the page --

@pytest.mark.compat
def test_the_page_loads_without_console_errors(page, ours):
    """No console error on load but the frontend's own known ones (browser.COMFY_OWN_ERRORS, each with its reason),
    and no console message of any level that names one of our nodes or our module."""
    page.read_console()
    errors = page.new_errors()
    assert not errors, "console errors on load:\n" + "\n".join(e.message for e in errors)
    ours_mentioned = [e for e in page.console if any(name in e.message for name in [*ours, MODULE]) and not e.comfy_own_reason()]
    assert not ours_mentioned, "console messages about our nodes:\n" + "\n".join(f"{e.level}: {e.message}" for e in ours_mentioned)


@pytest.mark.compat
def test_our_nodes_are_in_the_node_library_under_their_categories(page, ours):
    report = page.js("return __cns.library(arguments[0])", list(ours))
    wrong = {}
    for name, info in ours.items():
        got = report["nodes"][name]
        want = {"litegraph": info["category"]}
        if report["frontend"] == "1.x":  # the node definitions store and the node library's tree built from it
            want.update(store=info["category"], visible=True, tree=info["category"])
        if {k: got.get(k) for k in want} != want:
            wrong[name] = (want, got)
    assert not wrong, wrong
    categories = {info["category"] for info in ours.values()}
    assert {"loaders", "conditioning/controlnet"} <= categories, categories


# -- pictures: the README's screenshot and the template browser's thumbnails --

THUMBNAIL_WIDTH = 480  # px; the template browser's cards show about 300 px
CANVAS = (60, 100, 1280, 800)  # CSS px of a 1280x800 window: right of the sidebar, below the tabs and the Run toolbar


def settle(page: Page) -> None:
    """The one-off "Introducing Nodes 2.0" banner of a new user closed, and the canvas redrawn."""
    page.js("const b = [...document.querySelectorAll('button')].find(b => b.closest('div')?.textContent.includes('Introducing Nodes 2.0')"
            " && b.querySelector('i, svg') && !b.textContent.trim()); if (b) b.click()")
    time.sleep(0.3)
    page.js("app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true)")
    time.sleep(0.5)


@pytest.mark.skipif(is_oldest_host(), reason=f"the pictures show the current frontend, not {OLDEST}")
def test_pictures_of_every_workflow(server, chromium):
    """Each workflow as a user opens it (real model names, the default settings but the minimap and the canvas
    statistics hidden), on a HiDPI screen (2 device pixels per CSS pixel) in a 1280x800 window: canny.json whole for
    the README (docs/images/workflow_canny.png, 1280x800, 256 colours), and every workflow's canvas as the template
    browser's card thumbnail (workflows/NAME.jpg). To the artifacts folder; with CNS_UPDATE_DOCS=1 also to their
    places in the repository, which the next test then checks."""
    out = artifacts_dir() / "pictures"
    out.mkdir(exist_ok=True)
    page = Page(server.base, *chromium, width=VIEW[0], height=VIEW[1], pixel_ratio=2)
    try:
        page.open()
        time.sleep(2)  # a first visit opens the template browser (the module's page was first; this one may not be)
        page.dismiss_dialogs()
        for key, value in (("Comfy.Minimap.Visible", False), ("Comfy.Graph.CanvasInfo", False)):
            page.js_async("await app.extensionManager.setting.set(args[0], args[1]); return true", key, value)
        for path in sorted(WORKFLOWS, key=lambda p: p.stem != "canny"):  # canny first, in a tab of its name; the rest unnamed
            page.js_async("return await __cns.load(args[0], args[1])", json.loads(path.read_text()), "canny" if path.stem == "canny" else None)
            settle(page)
            shot = Image.open(io.BytesIO(page.driver.get_screenshot_as_png())).convert("RGB")
            assert shot.size == (2 * VIEW[0], 2 * VIEW[1])
            canvas = shot.crop(tuple(2 * v for v in CANVAS))
            thumb = canvas.resize((THUMBNAIL_WIDTH, round(THUMBNAIL_WIDTH * canvas.height / canvas.width)), Image.Resampling.LANCZOS)
            thumb.save(out / f"{path.stem}.jpg", quality=85, optimize=True)
            if path.stem == "canny":
                small = shot.resize(VIEW, Image.Resampling.LANCZOS).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
                small.save(out / "workflow_canny.png", optimize=True)
        assert_no_new_console_errors(page, "taking the pictures")
    finally:
        try:  # the settings live in the server's user folder, which the module's other page shares: back to defaults
            for key, value in (("Comfy.Minimap.Visible", True), ("Comfy.Graph.CanvasInfo", True)):
                page.js_async("await app.extensionManager.setting.set(args[0], args[1]); return true", key, value)
        finally:
            page.close()
    if os.environ.get("CNS_UPDATE_DOCS") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "workflow_canny.png", DOCS_IMAGE)
        for path in WORKFLOWS:
            shutil.copy(out / f"{path.stem}.jpg", path.with_suffix(".jpg"))


def test_the_pictures_are_shipped(server):
    """The README's screenshot, and a thumbnail per workflow that the server hands to the template browser
    (GET /api/workflow_templates/MODULE/NAME.jpg), each small."""
    with Image.open(DOCS_IMAGE) as im:
        assert (im.format, im.size) == ("PNG", VIEW)
    assert DOCS_IMAGE.stat().st_size < 300_000
    assert sorted(p.stem for p in (ROOT / "workflows").glob("*.jpg")) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.width == THUMBNAIL_WIDTH, thumb.name
        assert thumb.stat().st_size < 80_000, thumb.name
        if not is_oldest_host():
            assert server.get(f"/api/workflow_templates/{MODULE}/{thumb.name}") == thumb.read_bytes()


# -- every workflow --

def graph_differences(file: dict, loaded: dict) -> list[str]:
    """What the graph read back from the page lost or changed against the workflow file: nodes (type, position,
    title, mode, properties), links (as the 6-element LiteGraph 0.4 arrays, and each slot's link ids) and widget values."""
    out = []
    got = {n["id"]: n for n in loaded["nodes"]}
    if set(got) != {n["id"] for n in file["nodes"]}:
        out.append(f"node ids {sorted(got)} != {sorted(n['id'] for n in file['nodes'])}")
    for n in file["nodes"]:
        m = got.get(n["id"])
        if m is None:
            continue
        where = f"node {n['id']} ({n['type']})"
        for key in ("type", "mode", "title"):
            if key in n and m.get(key) != n[key]:
                out.append(f"{where}: {key} {m.get(key)!r} != {n[key]!r}")
        if not np.allclose(m["pos"], n["pos"]):
            out.append(f"{where}: pos {m['pos']} != {n['pos']}")
        if any(m["properties"].get(k) != v for k, v in n["properties"].items()):
            out.append(f"{where}: properties {m['properties']} lack {n['properties']}")
        want, have = n.get("widgets_values") or [], m.get("widgets_values") or []
        same = len(want) == len(have) and all(
            math.isclose(a, b, rel_tol=1e-9, abs_tol=0) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) else a == b
            for a, b in zip(want, have))
        if not same:
            out.append(f"{where}: widgets_values {have} != {want}")
        if {i["name"]: i.get("link") for i in n.get("inputs", [])} != {i["name"]: i.get("link") for i in m.get("inputs", []) if i["name"] in {j["name"] for j in n.get("inputs", [])}}:
            out.append(f"{where}: inputs {m.get('inputs')} != {n.get('inputs')}")
        if [sorted(o["links"] or []) for o in n.get("outputs", [])] != [sorted(o.get("links") or []) for o in m.get("outputs", [])]:
            out.append(f"{where}: outputs {m.get('outputs')} != {n.get('outputs')}")
    if sorted(map(list, file["links"])) != sorted(map(list, loaded["links"])):
        out.append(f"links {loaded['links']} != {file['links']}")
    return out


@pytest.mark.parametrize("path", [compat_where(p) for p in WORKFLOWS], ids=ids(WORKFLOWS))
def test_workflow_loads_intact(page, ours, path):
    """Opened through app.loadGraphData, read back from app.graph: the file's nodes, links and widget values, with our
    node types registered (not placeholders for missing nodes); a screenshot of it to the artifacts folder."""
    wf = json.loads(path.read_text())
    loaded = load(page, wf)
    page.screenshot(artifacts_dir() / f"{path.stem}.png")
    assert graph_differences(wf, loaded) == []
    types = {n["type"] for n in wf["nodes"]}
    assert types & set(ours), f"{path.name} uses none of our nodes"
    registered = page.js("return arguments[0].filter(t => !(t in LiteGraph.registered_node_types))", sorted(types))
    assert registered == [], f"node types the frontend does not know: {registered}"
    assert_no_new_console_errors(page, f"loading {path.name}")


@pytest.mark.skipif(is_oldest_host(), reason=f"{OLDEST} never restores a workflow's view (no extra.ds handling, no fit on load)")
@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_workflow_opens_fitted_to_the_view(page, path):
    """In a 1280x800 window, every node's whole box is on the canvas and under no part of the frontend's UI (sidebar,
    tabs, toolbars, minimap): the frontend restores the file's extra.ds (Comfy.EnableWorkflowViewRestore, on by
    default), which scripts/build_workflows.py computes to fit."""
    wf = json.loads(path.read_text())
    load(page, wf)
    seen = page.js("return __cns.visibility()")
    assert seen["window"] == list(VIEW), seen["window"]
    assert seen["view"]["scale"] == pytest.approx(wf["extra"]["ds"]["scale"]) and seen["view"]["offset"] == pytest.approx(wf["extra"]["ds"]["offset"]), seen["view"]
    hidden = {f"{n['id']} {n['type']} {n['title']!r}": (n["rect"], n["hiddenCount"], n["hidden"]) for n in seen["nodes"] if n["hiddenCount"]}
    assert not hidden, f"nodes not fully visible at {VIEW[0]}x{VIEW[1]} (box, hidden grid points, first few):\n" + json.dumps(hidden, indent=1)


def queued_where(path: Path):
    if path.stem in IN_PROCESS_BASES:
        return pytest.param(path, marks=pytest.mark.skip(reason="a DiT base built in-process only; run through the host in test_workflows.py"))
    return compat_where(path)


@pytest.mark.parametrize("path", [queued_where(p) for p in WORKFLOWS], ids=ids(WORKFLOWS))
def test_workflow_runs_when_queued_from_the_page(page, server, host, ours, path):
    """Loaded, tiny models and sizes set through the graph's widgets, CLIPTextEncode replaced by test conditioning
    (the tiny checkpoint has no CLIP), queued with app.queuePrompt: the prompt runs to success and saves a 64x64 image."""
    wf = json.loads(path.read_text())
    load(page, wf)
    swapped = page.js("return __cns.swap(arguments[0])", {"checkpoint": host.checkpoint, "trainCheckpoint": server.clip_checkpoint,
                                                         "controlnets": ["cn_a.safetensors", "cn_b.safetensors"], "union": TINY_UNION_FILE,
                                                         "size": TINY, "steps": 2})
    assert len(swapped) == sum(n["type"] == "CLIPTextEncode" for n in wf["nodes"]), swapped
    before = set(server.get("/history"))
    queued = page.js_async("return await __cns.queue()")
    assert queued["nodeErrors"] is None, queued
    deadline = time.time() + 60
    while not (new := set(server.get("/history")) - before) and not server.get("/queue")["queue_running"] + server.get("/queue")["queue_pending"]:
        assert time.time() < deadline, "the page queued nothing:\n" + page.console_text()[-3000:]
        time.sleep(0.2)
    while not (new := set(server.get("/history")) - before):
        assert time.time() < deadline + 240, "the prompt did not finish:\n" + server.log()[-3000:]
        time.sleep(0.3)
    (prompt_id,) = new
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-4000:]
    executed = {n["class_type"] for n in entry["prompt"][2].values()}
    assert {n["type"] for n in wf["nodes"]} & set(ours) <= executed and "CLIPTextEncode" not in executed, executed
    images = [i for out in entry["outputs"].values() for i in out.get("images", []) if i.get("type") == "output"]
    assert len(images) == 1, entry["outputs"]
    with Image.open(server.run_dir / "output" / images[0]["subfolder"] / images[0]["filename"]) as im:
        assert im.size == (TINY, TINY)
    for n in wf["nodes"]:  # a trained model lands in the run folder's models, not in the embedded host inside the venv
        if n["type"] == "ControlNetSuiteTrain":
            assert (server.run_dir / "models" / "controlnet" / f"{n['widgets_values'][8]}.safetensors").is_file(), n["widgets_values"]  # output_name
    assert_no_new_console_errors(page, f"queueing {path.name}")


# -- the template browser --

@pytest.mark.skipif(is_oldest_host(), reason=f"{OLDEST} has no template browser")
def test_our_workflows_are_in_the_template_browser(page, server):
    """The template browser (Comfy.BrowseTemplates) lists every workflow under this extension's entry in its
    Extensions group; clicking one opens that workflow, with the view it was saved with."""
    names = sorted(p.stem for p in WORKFLOWS)
    page.js("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.wait("return __cns.templateCards().open", what="the template browser")
    store = page.wait(f"return __cns.templateStore('{MODULE}')", what="the templates store")
    assert store["navGroup"] == "Extensions" and {"id": f"extension-{MODULE}", "label": MODULE} in store["navItems"], store
    assert sorted(store["names"]) == names
    assert page.js("return __cns.clickText(arguments[0], '[data-testid=\"template-workflows-content\"]') || __cns.clickText(arguments[0])", MODULE)
    cards = page.wait(f"const c = __cns.templateCards(); return c.names.length === {len(names)} && c", what="our template cards")
    assert sorted(cards["names"]) == names
    thumbnails = page.wait("const imgs = [...document.querySelectorAll('[data-testid^=\"template-workflow-\"] img')];"
                           " return imgs.length && imgs.every(i => i.complete) && imgs.map(i => [i.src, i.naturalWidth])", what="the thumbnails")
    # the cards load their pictures lazily (those in view first); each one loaded is our thumbnail, and a missing one
    # would be a 404 among the console errors checked below
    assert thumbnails and all(width == THUMBNAIL_WIDTH for _, width in thumbnails), thumbnails
    page.screenshot(artifacts_dir() / "template_browser.png")

    assert page.js("return __cns.click('[data-testid=\"template-workflow-canny\"]')")
    wf = json.loads((ROOT / "workflows" / "canny.json").read_text())
    page.wait(f"return !__cns.templateCards().open && app.graph._nodes.length === {len(wf['nodes'])}", what="the canny template to open")
    time.sleep(0.5)
    assert graph_differences(wf, page.js("return __cns.serialize()")) == []
    view = page.js("return __cns.view()")
    assert view["scale"] == pytest.approx(wf["extra"]["ds"]["scale"]) and view["offset"] == pytest.approx(wf["extra"]["ds"]["offset"])
    # a template opens with the frontend's missing-models dialog (the test server has only tiny models): close it
    page.dismiss_dialogs()
    errors = page.new_errors()
    assert not errors, "console errors in the template browser:\n" + "\n".join(e.message for e in errors)
