"""The package's layers, checked so that they stay true: imports run down, math needs no torch, only the
command line imports click and tqdm.

Layers, top to bottom: cli -> jobs -> report -> output | engine -> plan -> series -> io -> math; ``errors``
is importable from everywhere, and ``ckpt_ema`` itself only for ``__version__``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ckpt_ema"
LAYERS = {"math": 1, "io": 2, "series": 3, "plan": 4, "engine": 5, "output": 5, "report": 6, "jobs": 7, "cli": 8}
TOP_LEVEL = {"__init__", "__main__", "_moved", "demo", "errors"}  # the package's own files, outside the layers


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of ckpt_ema code in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["ckpt_ema", *path.relative_to(PACKAGE).parts[:-1]]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "ckpt_ema":  # from ckpt_ema import X: X may be a subpackage
                found += [(node.lineno, f"ckpt_ema.{alias.name}") for alias in node.names]
            elif module.startswith("ckpt_ema."):
                found.append((node.lineno, module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ckpt_ema")]
    return found


def test_imports_run_down_the_layers():
    wrong = []
    for path in _modules():
        own = _package_of(path)
        if own in TOP_LEVEL:
            continue
        for line, module in _imports(path):
            target = module.split(".")[1]
            if target in ("errors", "__version__") or target == own:
                continue
            if target not in LAYERS or LAYERS[target] >= LAYERS[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {module}")
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(wrong)


def test_every_module_belongs_to_a_layer():
    assert {_package_of(p) for p in _modules()} <= set(LAYERS) | TOP_LEVEL


@pytest.mark.parametrize("library", ["click", "tqdm"])
def test_only_the_command_line_imports_the_ui_libraries(library):
    users = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        if any(name == library or name.startswith(library + ".") for name in names):
            users.append(_package_of(path))
    assert set(users) <= {"cli"}, users


def test_the_math_imports_neither_torch_nor_the_rest_of_the_package():
    code = (
        "import sys, ckpt_ema.math.ema, ckpt_ema.math.reconstruct; "
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('ckpt_ema.') and "
        "not m.startswith(('ckpt_ema.math', 'ckpt_ema.errors', 'ckpt_ema._moved'))); print(loaded)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_public_api_is_importable_from_the_package():
    import ckpt_ema

    for name in ckpt_ema.__all__:
        assert getattr(ckpt_ema, name) is not None, name


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("ckpt_ema.kernels", "ckpt_ema.math.ema", "classic_coefficients"),
        ("ckpt_ema.api", "ckpt_ema.jobs.merge", "MergeJob"),
        ("ckpt_ema.readers", "ckpt_ema.io", "open_checkpoint"),
        ("ckpt_ema.posthoc", "ckpt_ema.plan.posthoc", "plan_reconstruction"),
        ("ckpt_ema.reconstruct", "ckpt_ema.math.reconstruct", "solve_reconstructions"),
    ],
)
def test_the_old_module_paths_still_import_with_a_deprecation_warning(old, new, name):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        f"assert getattr(old, {name!r}) is getattr(new, {name!r})\n"
        f"assert any(w.category is DeprecationWarning and {new!r} in str(w.message) for w in caught), caught\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
