"""Compile check of the CUDA sources on a machine without a GPU (``make compile-cuda``).

    python -m fastmlm.tools.compile_cuda --arch 80 90a [--jobs N] [--csrc DIR] [--no-bindings]

Compiles every ``csrc/*.cu`` with ``nvcc -c`` once per architecture (sm_80 mma.sync,
sm_90a), in parallel, into a temporary folder, with the same flags as setup.py; and
syntax-checks ``csrc/bindings.cpp`` (the only file that includes torch) with the host
compiler against the installed torch headers, which a CPU build of torch ships too.
First it checks the source layout (:func:`layout_problems`: one ``attention_hd<N>.cu`` per
head-dim bucket of ``csrc/head_dims.h``, no other). Exits non-zero with the compiler's message
on the first kind of failure it sees; nothing is linked and no GPU is needed. Imports nothing but the standard library at the top, so
setup.py can read NVCC_FLAGS from here without importing fastmlm.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Shared with setup.py: one set of flags for the compile check and the real build.
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
CXX_FLAGS = ["-O3", "-std=c++20"]  # recent torch headers need C++20 (concepts, <compare>)
# What torch.utils.cpp_extension adds to every nvcc call of the real build: the check mirrors it.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
CSRC = Path(__file__).resolve().parents[2] / "csrc"


def head_dims(csrc: Path = CSRC) -> tuple[int, ...]:
    """The attention kernels' head-dim buckets, ascending: ``FASTMLM_FOR_EACH_HEAD_DIM`` of csrc/head_dims.h.

    The one list of the CUDA side (launchers.h, bindings.cpp, the attention_hd<N>.cu files and
    the emulator expand that macro); the built extension carries it as ``fastmlm._C.HEAD_DIMS``.
    """
    text = (csrc / "head_dims.h").read_text()
    found = re.search(r"#define\s+FASTMLM_FOR_EACH_HEAD_DIM\(X\)((?:\s*X\(\d+\))+)", text)
    if found is None:
        raise ValueError(f"{csrc / 'head_dims.h'}: no FASTMLM_FOR_EACH_HEAD_DIM(X) X(..) ... definition")
    return tuple(int(n) for n in re.findall(r"X\((\d+)\)", found.group(1)))


def layout_problems(csrc: Path = CSRC) -> list[str]:
    """What is wrong with csrc/'s per-bucket instantiation files (empty: nothing).

    Every bucket of :func:`head_dims` needs ``attention_hd<N>.cu`` expanding
    ``FASTMLM_INSTANTIATE_ATTENTION(N)`` (a missing one is a link error of the real build only),
    and no such file may name a bucket head_dims.h lacks.
    """
    buckets = head_dims(csrc)
    problems = []
    files = {int(m.group(1)): path for path in sorted(csrc.glob("attention_hd*.cu"))
             if (m := re.fullmatch(r"attention_hd(\d+)\.cu", path.name))}
    for hd in buckets:
        if hd not in files:
            problems.append(f"head dim {hd} (head_dims.h) has no attention_hd{hd}.cu")
        elif f"FASTMLM_INSTANTIATE_ATTENTION({hd})" not in files[hd].read_text():
            problems.append(f"{files[hd].name} does not expand FASTMLM_INSTANTIATE_ATTENTION({hd})")
    for hd, path in files.items():
        if hd not in buckets:
            problems.append(f"{path.name} names head dim {hd}, which head_dims.h does not list {buckets}")
    return problems


def find_nvcc() -> str | None:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and Path(c).exists()), None)


def cuda_include_dir(nvcc: str | None = None) -> str | None:
    """The CUDA toolkit's include folder (cuda_runtime.h, cuda_fp16.h), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = nvcc or find_nvcc()
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parents[1]))
    roots.append("/usr/local/cuda")
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime.h").exists():
            return str(Path(root) / "include")
    return None


def gencode(arch: str) -> list[str]:
    """'80' -> sm_80, '90a' -> sm_90a (architecture-specific features such as wgmma)."""
    if not arch.rstrip("a").isdigit():
        raise ValueError(f"arch must look like 80 or 90a, got {arch!r}")
    return ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]


def run(cmd: list[str], what: str) -> tuple[str, bool, str, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    return what, done.returncode == 0, (done.stdout + done.stderr).strip(), time.perf_counter() - start


def bindings_command(csrc: Path, nvcc: str, scratch: Path) -> list[str] | None:
    """g++ -fsyntax-only for bindings.cpp against the installed torch headers, or None without torch."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    includes = include_paths() + [sysconfig.get_paths()["include"]]
    cuda_include = cuda_include_dir(nvcc)
    if cuda_include is None or not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return None
    includes.append(cuda_include)
    # A CPU build of torch ships c10/cuda/ headers but not the configured cuda_cmake_macros.h.
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        stub = scratch / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(scratch / "stub"))
    cxx = os.environ.get("CXX", "g++")
    return [cxx, "-fsyntax-only", *CXX_FLAGS, f"-I{csrc}", *(f"-I{p}" for p in includes), str(csrc / "bindings.cpp")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90a"], help="compute capabilities, e.g. 80 90a")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    parser.add_argument("--csrc", type=Path, default=CSRC, help="the sources (default: this checkout's csrc/)")
    parser.add_argument("--no-bindings", action="store_true", help="skip the torch binding syntax check")
    args = parser.parse_args(argv)

    if (args.csrc / "head_dims.h").exists():
        problems = layout_problems(args.csrc)
        for problem in problems:
            print(f"compile_cuda: FAIL layout: {problem}")
        if problems:
            return 1
    nvcc = find_nvcc()
    if nvcc is None:
        print("compile_cuda: nvcc not found (set NVCC or CUDA_HOME), nothing checked", file=sys.stderr)
        return 2
    sources = sorted(args.csrc.glob("*.cu"))
    if not sources:
        print(f"compile_cuda: no .cu files in {args.csrc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fastmlm-nvcc-") as tmp:
        scratch = Path(tmp)
        jobs = [([nvcc, "-c", *NVCC_FLAGS, *TORCH_NVCC_DEFINES, *gencode(arch), f"-I{args.csrc}", str(src),
                  "-o", str(scratch / f"{src.stem}.sm_{arch}.o")], f"{src.name} sm_{arch}")
                for src in sources for arch in args.arch]
        bindings = args.csrc / "bindings.cpp"
        if bindings.exists() and not args.no_bindings:
            cmd = bindings_command(args.csrc, nvcc, scratch)
            if cmd is None:
                print("compile_cuda: torch, the CUDA headers or Python.h are missing: "
                      "skipping the bindings.cpp syntax check")
            else:
                jobs.insert(0, (cmd, "bindings.cpp (syntax, torch headers)"))  # the slowest: start it first
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda job: run(*job), jobs))
    failed = [r for r in results if not r[1]]
    for what, ok, output, seconds in results:
        print(f"compile_cuda: {'ok  ' if ok else 'FAIL'} {what} ({seconds:.1f} s)")
        if output and (not ok or "warning" in output):
            print(output if not ok else "\n".join(l for l in output.splitlines() if "warning" in l))
    print(f"compile_cuda: {len(results) - len(failed)}/{len(results)} compiled in "
          f"{time.perf_counter() - start:.1f} s with {args.jobs} jobs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
