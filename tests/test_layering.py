"""The layering the README promises, read from the source: `controlnet_core` imports neither the host (`comfy`,
`folder_paths`) nor this project's `annotators` or `nodes` (not even through importlib), and no two of its
subpackages import each other in a circle (a cycle makes import order matter and hides in lazy imports)."""
import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "controlnet_core"
FORBIDDEN = ("comfy", "comfy_extras", "folder_paths", "annotators", "nodes")


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(absolute dotted module, line) for every import in the file, lazy ones inside functions included."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1] if path.name != "__init__.py" else path.relative_to(ROOT).parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append((arg.value.lstrip("."), node.lineno))
    return out


def core_files():
    return sorted(CORE.rglob("*.py"))


def test_the_library_imports_no_host_and_nothing_above_it():
    found = [f"{p.relative_to(ROOT)}:{line} imports {m}" for p in core_files() for m, line in imports_of(p)
             if m.split(".")[0] in FORBIDDEN or ".annotators" in m or m.startswith("controlnet_core.nodes")]
    assert found == []


def test_no_cycles_between_the_library_subpackages():
    """Subpackage = the first name below controlnet_core (`train`, `base_models`, `formats`, `flux`, ...; a top-level
    module counts as its own)."""
    def unit(module: str):
        parts = module.split(".")
        return parts[1] if parts[0] == "controlnet_core" and len(parts) > 1 else None

    graph = defaultdict(set)
    for p in core_files():
        src = unit(".".join(p.relative_to(ROOT).with_suffix("").parts))
        for m, _ in imports_of(p):
            dst = unit(m)
            if src and dst and dst != src and (CORE / dst).is_dir() and (CORE / src).is_dir():
                graph[src].add(dst)

    cycles = []
    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt == path[0]:
                cycles.append(" -> ".join(path + [nxt]))
            elif nxt not in path and nxt > path[0]:
                visit(nxt, path + [nxt])
    for start in sorted(graph):
        visit(start, [start])
    assert cycles == []
