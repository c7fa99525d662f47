"""controlnet_core imports three ways: inside ComfyUI (any folder name), from the repo root, and pip-installed; and
the Comfy Registry's own validation accepts pyproject.toml."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from comfy_host import comfy_root

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_python_m_from_repo_root():
    r = subprocess.run([sys.executable, "-m", "controlnet_core", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "convert" in r.stdout


def test_cli_info_on_a_real_file(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from factories import SD15_TINY, random_controlnet, save

    p = save(tmp_path / "cn.safetensors", random_controlnet(SD15_TINY).state_dict())
    r = subprocess.run([sys.executable, "-m", "controlnet_core", "info", str(p)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "format: ldm" in r.stdout
    bad = tmp_path / "bad.safetensors"
    bad.write_text("<html></html>")
    r = subprocess.run([sys.executable, "-m", "controlnet_core", "info", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "HTML" in r.stderr


def test_installed_package_imports_from_anywhere(tmp_path):
    r = run("import controlnet_core, sys; print(controlnet_core.__file__)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == (ROOT / "controlnet_core" / "__init__.py").resolve()


@pytest.mark.compat
def test_comfyui_loads_the_folder_under_any_name(tmp_path):
    nodes_dir = tmp_path / "custom_nodes"
    nodes_dir.mkdir()
    (nodes_dir / "ComfyUI-ControlNet Suite-main").symlink_to(ROOT, target_is_directory=True)
    code = f"""
        import sys, asyncio, logging
        sys.path.insert(0, {str(comfy_root())!r})
        from comfy.cli_args import args
        args.cpu = True
        import folder_paths
        folder_paths.folder_names_and_paths["custom_nodes"] = ([{str(nodes_dir)!r}], set())
        import nodes
        if hasattr(nodes, "init_extra_nodes"):
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        else:
            nodes.init_custom_nodes()
        mods = [m for n, m in sys.modules.items() if getattr(m, "__file__", None) and m.__file__.endswith("ControlNet Suite-main/__init__.py")]
        assert len(mods) == 1, "extension not imported"
        core = [m for n, m in sys.modules.items() if getattr(m, "__file__", None) and m.__file__.endswith("ControlNet Suite-main/controlnet_core/__init__.py")]
        assert len(core) == 1 and core[0].load_control, "controlnet_core not importable from the nodes"
        assert "ControlNetSuiteApply" in nodes.NODE_CLASS_MAPPINGS, "nodes not registered"
        print("OK", mods[0].__name__)
    """
    r = run(code, cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    ours = [l for l in (r.stderr + r.stdout).splitlines() if "ControlNet Suite-main" in l]
    assert not [l for l in ours if "Cannot import" in l or "IMPORT FAILED" in l], ours


# --- the Comfy Registry's own validation (comfy-cli) ---------------------------------------------------------------
# comfy-cli pins and pulls in many packages (typer, uv, ruff, telemetry clients), so scripts/setup_test_env.sh puts it
# in a venv of its own beside the test one ($VENV/comfy-cli), not in the environment ComfyUI and the tests run in.


@pytest.fixture(scope="module")
def comfy_cli_python() -> Path:
    python = Path(sys.prefix) / "comfy-cli" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"comfy-cli is not installed in {python.parent.parent}: run `bash scripts/setup_test_env.sh` (make test does)", pytrace=False)
    return python


def comfy_cli_env(tmp_path: Path) -> dict:
    """No telemetry, no prompts, and its config and ruff cache in a scratch folder (nothing written to the repo)."""
    return dict(os.environ, DO_NOT_TRACK="1", HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / ".config"),
                RUFF_CACHE_DIR=str(tmp_path / "ruff"), COLUMNS="200")


def test_pyproject_passes_comfy_node_validate(comfy_cli_python, tmp_path):
    """`comfy node validate`, the check `comfy node publish` runs before uploading, in the repository root."""
    r = subprocess.run([str(comfy_cli_python), "-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                       env=comfy_cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Validating node configuration" in out, out[-3000:]
    assert "Warning:" not in out and "Error" not in out, out[-3000:]  # licence, classifier and version formats
    # its security check (ruff S102/S307/E702: exec, eval, `a; b`), which the registry says will become an error
    assert not re.findall(r"-->\s+(\S+?):\d+:\d+", out), out[-3000:]


def test_registry_reads_the_metadata_the_specification_requires(comfy_cli_python, tmp_path):
    """The registry's own parser of pyproject.toml (what publishing uploads): the fields the Comfy Registry
    specification requires or we rely on, in the formats it asks for."""
    code = ("import dataclasses, json; from comfy_cli.registry.config_parser import extract_node_configuration as x; "
            "print(json.dumps(dataclasses.asdict(x())))")
    r = subprocess.run([str(comfy_cli_python), "-c", code], cwd=ROOT, env=comfy_cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # anything else printed is one of the parser's warnings
    cfg = json.loads(lines[0])
    project, comfy = cfg["project"], cfg["tool_comfy"]
    # node id: < 100 characters, letters, digits and single - _ . between them, starting with a letter
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"]["text"] == "GPL-3.0-or-later" and (ROOT / "LICENSE").is_file()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", project["urls"]["repository"])
    assert project["supported_os"] == ["OS Independent"] and project["description"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["publisher_id"]) and comfy["display_name"] == "ControlNet Suite"
    assert comfy["icon"] == ""  # none yet; an empty string is what the parser sends when the key is absent


def test_readme_pictures_are_shipped_and_the_demo_one_is_what_make_demo_draws(tmp_path):
    """Every picture the README links is in the repository; the toy demo's is exactly `make demo`'s output."""
    readme = (ROOT / "README.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert {"docs/images/workflow_canny.png", "docs/images/toy_demo.png"} <= set(linked)
    assert [p for p in linked if not (ROOT / p).is_file()] == []
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "demo.py"), "--out", str(tmp_path / "toy_demo.png")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    import numpy as np
    from PIL import Image

    fresh = np.asarray(Image.open(tmp_path / "toy_demo.png").convert("RGB"))
    shipped = np.asarray(Image.open(ROOT / "docs" / "images" / "toy_demo.png").convert("RGB"))
    assert fresh.shape == shipped.shape and np.abs(fresh.astype(int) - shipped.astype(int)).mean() < 0.5, "rerun make demo and copy its PNG"


def test_the_root_imports_as_a_plain_module_too():
    """pytest imports the repository root's __init__.py as a plain module (no package) when the checkout's folder
    name is no Python identifier (a clone into ControlNet-Suite/, say): it must offer no nodes instead of failing."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('__init__', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.NODE_CLASS_MAPPINGS)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "__init__.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "{}", r.stderr[-3000:]
