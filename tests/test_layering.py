"""The package layering of /work/shared/DESIGN.md: which qwen2ms subpackage may import which, checked on the source."""
import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qwen2ms"

# Lower ranks sit closer to the ground. At module import time a subpackage may import only lower ranks, so the
# graph between subpackages has no cycle. Function-level (lazy) imports may also point up (``from_hf`` loads
# qwen2ms.checkpoint, ``generate`` loads qwen2ms.generation), except from the ground packages in GROUND.
LAYERS = {
    "errors": -1,  # the error base every other module may use
    "hub": 0, "dtypes": 0,  # file resolution and atomic writes; the weight dtype spellings
    "config": 1, "tokenization": 1,
    "ops": 2,
    "modeling": 3,
    "checkpoint": 4, "generation": 4, "data": 4,
    "parallel": 5, "serving": 5,
    "training": 6,
    "demo": 7,
    "cli": 8,
}
GROUND = ("errors", "hub", "dtypes", "config", "tokenization", "ops")
# What importing qwen2ms.ops must not load (DESIGN.md: the model depends on the ops, never the reverse).
ABOVE_OPS = ("modeling", "checkpoint", "parallel", "training", "generation", "cli", "demo", "data")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


@functools.lru_cache(maxsize=None)
def _imports(module: str, path: Path):
    """``(target module, lazy)`` for every qwen2ms import in ``path``; lazy = inside a function body.

    Imports under ``if TYPE_CHECKING:`` never run and are skipped; class bodies run at import time.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names if a.name.split(".")[0] == "qwen2ms")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(base + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                if base.split(".")[0] == "qwen2ms":
                    for a in child.names:  # `from . import x` names a module; `from .m import X` a name in m
                        found.append((f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, inner))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return tuple(found)


def _subpackage(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _edges(lazy: bool):
    """``{(from subpackage, to subpackage): example module pair}`` between different subpackages."""
    edges = {}
    for module, path in MODULES.items():
        for target, is_lazy in _imports(module, path):
            a, b = _subpackage(module), _subpackage(target)
            if is_lazy == lazy and a and a != b:
                edges.setdefault((a, b), f"{module} -> {target}")
    return edges


def test_every_subpackage_has_a_layer():
    assert {_subpackage(m) for m in MODULES if _subpackage(m)} == set(LAYERS)


def test_no_module_imports_the_package_root():
    # The root loads its names lazily from the subpackages; importing from it inside the package hides the layer.
    bad = [f"{m} -> {t}" for m, p in MODULES.items() if m != "qwen2ms" for t, _ in _imports(m, p) if t == "qwen2ms"]
    assert bad == []


def test_import_time_imports_point_down_the_layers():
    up = {k: v for k, v in _edges(lazy=False).items() if LAYERS[k[1]] >= LAYERS[k[0]]}
    assert up == {}, f"imports at module import time that do not point to a lower layer: {up}"


def test_no_import_cycle_between_subpackages_at_import_time():
    graph = {}
    for a, b in _edges(lazy=False):
        graph.setdefault(a, set()).add(b)
    state = {}

    def cycle_from(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path + [nxt]
            if nxt not in state:
                found = cycle_from(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            assert cycle_from(start, [start]) is None


def test_ground_packages_import_nothing_above_them_even_lazily():
    for lazy in (False, True):
        up = {k: v for k, v in _edges(lazy).items() if k[0] in GROUND and LAYERS[k[1]] >= LAYERS[k[0]]}
        assert up == {}, f"{'lazy' if lazy else 'import-time'} imports from a ground package upwards: {up}"


def test_tokenization_imports_only_the_hub_and_the_error_base():
    used = {b for lazy in (False, True) for a, b in _edges(lazy) if a == "tokenization"}
    assert used <= {"hub", "errors"}


def test_importing_the_ops_loads_no_model_code():
    code = ("import sys, qwen2ms.ops, qwen2ms.ops.dispatch, qwen2ms.ops.cpu, qwen2ms.ops.ascend\n"
            "qwen2ms.ops.dispatch.get_ops('reference')\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('qwen2ms.'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, GLOG_v="3"))
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.split()
    assert "qwen2ms.ops.cpu" in loaded
    assert [m for m in loaded if _subpackage(m) in ABOVE_OPS] == []


@pytest.mark.parametrize("module", ["qwen2ms.ops.dispatch", "qwen2ms.modeling.model", "qwen2ms.checkpoint"])
def test_the_import_graph_sees_known_edges(module):
    # Guards the walker itself: a parser that found no imports would pass every test above.
    targets = {t for t, lazy in _imports(module, MODULES[module])}
    want = {"qwen2ms.ops.dispatch": "qwen2ms.ops.reference", "qwen2ms.modeling.model": "qwen2ms.ops.dispatch",
            "qwen2ms.checkpoint": "qwen2ms.checkpoint.gguf"}[module]
    assert want in targets


def test_the_package_root_takes_nothing_from_the_cli():
    # The demo model lives in qwen2ms.demo; the CLI sits on top of everything and the root must not load it.
    tree = ast.parse((SRC / "__init__.py").read_text(encoding="utf-8"))
    sources = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    sources |= {k.value.lstrip(".") for n in ast.walk(tree) if isinstance(n, ast.Dict)
                for k in n.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    assert "demo" in sources and "checkpoint" in sources
    assert "cli" not in sources


def test_every_name_the_root_lists_resolves():
    import qwen2ms

    assert {"Qwen2ForCausalLM", "CheckpointError", "quantize_int8_weights", "demo_model"} <= set(qwen2ms.__all__)
    missing = [n for n in qwen2ms.__all__ if getattr(qwen2ms, n, None) is None]
    assert missing == []
    assert qwen2ms.CheckpointError.__module__ == "qwen2ms.errors"
