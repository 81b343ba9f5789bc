"""What the package ships and imports: every module imports only the standard library, its declared
dependencies, the optional libraries it patches (inside the functions that patch them) and itself; no
module edits ``sys.path``; the one version string. The built wheel itself is checked by ``.ci/wheel_check``."""

import ast
import sys
from importlib.metadata import version
from pathlib import Path

import perceiver_kernels as pk

PACKAGE = Path(pk.__file__).parent
# Declared in pyproject.toml (torch, triton, matplotlib, tqdm; numpy comes with torch) or patched on demand.
DEPENDENCIES = {"torch", "triton", "matplotlib", "tqdm", "numpy"}
PATCHED_LIBRARIES = {"transformers", "perceiver_pytorch", "perceiver_ar_pytorch", "einops"}


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path):
    """``(top-level name, line, at module level)`` of every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], node.lineno, id(node) in top_level


def test_the_package_imports_nothing_outside_itself():
    allowed = set(sys.stdlib_module_names) | DEPENDENCIES | {"perceiver_kernels"}
    stray = []
    for path in _modules():
        for name, line, module_level in _imports(path):
            if name in allowed or (name in PATCHED_LIBRARIES and not module_level):
                continue
            stray.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not stray, "\n".join(stray)
    assert len(_modules()) > 20  # the walk saw the package


def test_no_module_touches_sys_path():
    offenders = [str(path) for path in _modules() if "sys.path" in path.read_text()]
    assert not offenders


def test_one_version_string():
    assert version("perceiver-kernels") == pk.__version__
