"""controlnet_core imports three ways: inside ComfyUI (any folder name), from the repo root, and pip-installed."""
import os
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
