"""The Triton kernels resolve as ``fastmlm_kernels`` in both layouts, and never as a bare ``kernels`` package.

PyPI has a ``kernels`` package that Hugging Face transformers looks for, so ``kernels/`` is
installed under our own name (setup.py: ``package_dir={"fastmlm_kernels": "kernels"}``)
and, from a source checkout, registered under it by fastmlm/ops/kernels_path.py. Each
layout is checked in a fresh interpreter that imports fastmlm and runs one triton
backend call under TRITON_INTERPRET=1, then reports what sys.modules holds.
"""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", ".eggs"}
LEAVES = {"fastmlm.ops.kernels_path", "fastmlm.ops.block_layout", "fastmlm.ops.checks", "fastmlm.ops.row_bound"}  # what kernels/ may import from fastmlm
COMPILED = {"_boundary"}  # C extensions beside them (fastmlm/ops/_boundary.c): they import nothing of fastmlm

# Run in the child: resolve, run one triton call, report. Prints one JSON line.
PROBE = r"""
import importlib.util, json, sys
installed = importlib.util.find_spec("fastmlm_kernels") is not None
import torch
import fastmlm
from fastmlm.ops import attention, attention_reference
q, k, v = (torch.randn(2, 5, 2, 16) for _ in range(3))
mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
out = attention(q, k, v, attention_mask=mask, backend="triton")
error = float((out - attention_reference(q, k, v, mask)[0]).abs().max())
import fastmlm_kernels
print(json.dumps({
    "installed_before": installed,
    "package_file": fastmlm_kernels.__file__,
    "backend": sys.modules["fastmlm_kernels.attention"].__name__,
    "bare": sorted(m for m in sys.modules if m == "kernels" or m.startswith("kernels.")),
    "fastmlm_file": fastmlm.__file__,
    "error": error,
}))
"""


def _probe(args, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TRITON_INTERPRET="1", **env_extra)
    done = subprocess.run([sys.executable, *args, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(report):
    assert Path(report["package_file"]).parent.name in ("kernels", "fastmlm_kernels")
    assert report["backend"] == "fastmlm_kernels.attention"
    assert report["bare"] == [], f"a bare kernels package was imported: {report['bare']}"
    assert report["error"] < 1e-5


def test_installed_layout_resolves_fastmlm_kernels(tmp_path):
    """The install (the editable one in .venv maps fastmlm_kernels to kernels/), run away from the repo root."""
    pytest.importorskip("triton")
    report = _probe([], {}, cwd=tmp_path)
    if not report["installed_before"]:
        pytest.skip("fastmlm is not installed in this interpreter (e.g. a GPU machine running from the checkout)")
    _check(report)


def test_source_layout_resolves_fastmlm_kernels(tmp_path):
    """Only the repo root on sys.path, no site processing (so no editable finder): kernels_path registers kernels/."""
    pytest.importorskip("triton")
    # This interpreter's library folders (a venv may sit inside the repo), but no folder of the checkout itself.
    libraries = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != REPO
                 and (REPO not in Path(p).resolve().parents or Path(p).name in ("site-packages", "dist-packages"))]
    report = _probe(["-S"], {"PYTHONPATH": os.pathsep.join([str(REPO), *libraries])}, cwd=tmp_path)
    if report["installed_before"]:
        pytest.skip("fastmlm_kernels is installed into site-packages itself: no source layout to try here")
    _check(report)
    assert Path(report["package_file"]) == REPO / "kernels" / "__init__.py"
    assert Path(report["fastmlm_file"]).parent == REPO / "fastmlm"


def _python_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(".py"):
                yield Path(root) / name


def _absolute_imports(path: Path):
    """(module, line) of every absolute import statement in one file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:  # "from fastmlm.ops import block_layout" imports fastmlm.ops.block_layout
                sub = f"{node.module}.{alias.name}"
                is_module = REPO.joinpath(*sub.split(".")).with_suffix(".py").exists()
                yield (sub if is_module else node.module), node.lineno


def test_nothing_imports_a_bare_kernels_package():
    bare = re.compile(r"^kernels(\.|$)")
    dynamic = re.compile(r"""import_module\(\s*["']kernels(\.|["'])|find_spec\(\s*["']kernels(\.|["'])""")
    found = []
    for path in _python_files():
        found += [f"{path.relative_to(REPO)}:{line}: import {mod}" for mod, line in _absolute_imports(path)
                  if bare.match(mod)]
        found += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in dynamic.finditer(path.read_text())]
    assert not found, "\n".join(found)
    setup = (REPO / "setup.py").read_text()
    assert re.search(r"""package_dir\s*=\s*\{\s*["']fastmlm_kernels["']\s*:\s*["']kernels["']""", setup)


def test_kernels_import_only_leaf_modules_of_fastmlm():
    """kernels/ may import kernels_path, block_layout, checks and row_bound from fastmlm, and those import no fastmlm
    module but the C helpers beside them: no cycle through the op modules whose registries name fastmlm_kernels."""
    for path in sorted((REPO / "kernels").glob("*.py")):
        used = {mod for mod, _ in _absolute_imports(path) if mod == "fastmlm" or mod.startswith("fastmlm.")}
        assert used <= LEAVES, f"kernels/{path.name} imports {sorted(used - LEAVES)}"
    for leaf in LEAVES:
        path = REPO.joinpath(*leaf.split(".")).with_suffix(".py")
        tree = ast.parse(path.read_text())
        relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0
                    and not (n.level == 1 and n.module is None and {a.name for a in n.names} <= COMPILED)]
        absolute = [mod for mod, _ in _absolute_imports(path) if mod.split(".")[0] in ("fastmlm", "fastmlm_kernels")]
        assert not relative and not absolute, f"{leaf} is not a leaf module"
