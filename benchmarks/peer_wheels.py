"""The peers' wheels for a GPU machine that has no package registry.

    python -m benchmarks.peer_wheels [DIR]    # here (make gpu-wheels): download into DIR (default .whl)

Liger Kernel and Cut Cross-Entropy are the masked loss's peers (bench_masked_ce). Both are
pure-Python wheels of Triton kernels whose only needs, torch and triton, every GPU machine
already has, so each travels as one file. The versions are the ones this venv has, pinned in
pyproject.toml's test extras, so the GPU rows come from the code the CPU tests checked.
``gpu_check.py --wheels DIR`` installs them there (:func:`install`) before any step runs.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

PEERS = ("liger-kernel", "cut-cross-entropy")
WHEELS = Path(__file__).resolve().parents[1] / ".whl"  # ignored by git; a device call carries it
TARGET = Path("/tmp/fastmlm-peers")  # where gpu_check installs them: outside the repo, gone with the machine


def _dist_name(name: str) -> str:
    """A distribution's name as wheel files spell it (``cut-cross-entropy`` -> ``cut_cross_entropy``)."""
    return name.replace("-", "_").lower()


def download(dest: Path = WHEELS) -> list[Path]:
    """Fetch each peer's wheel at this venv's version into ``dest``; older versions of it are removed
    (two versions of one package in one folder stop the whole install there)."""
    dest.mkdir(parents=True, exist_ok=True)
    saved = []
    for name in PEERS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"peer_wheels: {name} is not installed here; `make venv` installs the test extras "
                             "that pin it") from None
        for old in dest.glob(f"{_dist_name(name)}-*.whl"):
            if not old.name.startswith(f"{_dist_name(name)}-{version}-"):
                old.unlink()
        # Pure-Python wheels: --python-version/--only-binary only make pip pick the file the machine takes.
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                  "--python-version", "3.12", "-d", str(dest), f"{name}=={version}"])
        if fetched.returncode != 0:  # pip has said why above (no registry, no such version)
            raise SystemExit(f"peer_wheels: pip could not download {name}=={version} into {dest} (exit "
                             f"{fetched.returncode}); this needs a package registry")
        saved += dest.glob(f"{_dist_name(name)}-{version}-*.whl")
    return saved


def install(src: Path = WHEELS, target: Path = TARGET) -> str:
    """Install the wheels in ``src`` into ``target`` (no index, no dependencies) and put ``target`` first on
    this process's path and on PYTHONPATH for the processes it starts. Returns one line for the report."""
    wheels = sorted(src.glob("*.whl")) if src.is_dir() else []
    if not wheels:
        return f"no wheels in {src} (`make gpu-wheels` fetches them; a device call carries .whl)"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"installing {len(wheels)} wheels from {src} failed: {(done.stderr or done.stdout).strip()[-300:]}"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return f"installed {', '.join(w.name for w in wheels)} from {src}"


def versions() -> str:
    """Each peer's installed version, for the report: ``liger-kernel 0.8.5, cut-cross-entropy not installed``."""
    found = []
    for name in PEERS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


if __name__ == "__main__":
    for path in download(Path(sys.argv[1]) if len(sys.argv) > 1 else WHEELS):
        print(path)
