"""Build script: the Python packages, the C helpers ``fastmlm.ops._boundary``, plus the CUDA
extension ``fastmlm._C`` when it can be built.

FASTMLM_BUILD_CUDA=1 forces the extension (and fails loudly if it cannot be
built), =0 skips it; unset, it is built when torch is a CUDA build and nvcc is
found. TORCH_CUDA_ARCH_LIST (default "8.0;9.0a") and MAX_JOBS are honoured.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import Extension, find_packages, setup


def compile_flags():
    """The nvcc / C++ flags, shared with the CPU compile check (fastmlm/tools/compile_cuda.py).

    Loaded by path: that module imports only the standard library, and importing the
    fastmlm package here would need its dependencies at build time.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastmlm", "tools", "compile_cuda.py")
    spec = importlib.util.spec_from_file_location("_fastmlm_compile_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension():
    """Return ([extension], cmdclass) or ([], {}) with one line saying why not."""
    wanted = os.environ.get("FASTMLM_BUILD_CUDA", "auto")
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension, CUDA_HOME
    except ImportError:
        torch, reason = None, "torch is not installed in the build environment"
    if reason is None and wanted == "0":
        reason = "FASTMLM_BUILD_CUDA=0"
    elif reason is None and not torch.version.cuda:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif reason is None and not (CUDA_HOME or shutil.which("nvcc")):
        reason = "nvcc was not found"
    elif reason is None and not sources:
        reason = "csrc/ has no sources"
    if reason is not None:
        if wanted == "1":
            sys.exit(f"FASTMLM_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"fastmlm: building without the CUDA extension ({reason})", file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    flags = compile_flags()
    # A head-dim bucket without its attention_hd<N>.cu would link (a shared library may leave
    # symbols undefined) and fail only at import: refuse to build it.
    problems = flags.layout_problems(flags.CSRC)
    if problems:
        sys.exit("fastmlm: csrc/ is inconsistent: " + "; ".join(problems))
    extra_include = [p for p in glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "cu1*", "include"))]
    ext = CUDAExtension(
        "fastmlm._C",
        sources,
        include_dirs=[os.path.abspath("csrc")] + extra_include,
        extra_compile_args={"cxx": flags.CXX_FLAGS, "nvcc": flags.NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
# The C helpers of the ops' boundary (fastmlm.ops.dispatch.call_key, checks.check_ids; plain C,
# the Python API only): optional, so that an install without a C compiler still works, on the
# Python versions of the same functions.
ext_modules.append(Extension("fastmlm.ops._boundary", ["fastmlm/ops/_boundary.c"], optional=True))
setup(
    packages=find_packages(include=["fastmlm", "fastmlm.*"]) + ["fastmlm_kernels"],
    package_dir={"fastmlm_kernels": "kernels"},
    package_data={"fastmlm": ["corpus/*", "tasks/data/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
