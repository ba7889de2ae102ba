"""The CUDA build path: setup.py's decision, the compile check, the source layout rules.

The full compile of csrc/ for sm_80 and sm_90a is ``make compile-cuda`` (part of ``make
test``); here only that the checker really fails on a compiler error, on a two-file tree.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlm.tools import compile_cuda

ROOT = Path(__file__).resolve().parents[1]


def test_gencode_names_the_architecture():
    assert compile_cuda.gencode("80") == ["-gencode", "arch=compute_80,code=sm_80"]
    assert compile_cuda.gencode("90a") == ["-gencode", "arch=compute_90a,code=sm_90a"]
    with pytest.raises(ValueError, match="arch"):
        compile_cuda.gencode("sm_80")


@pytest.mark.skipif(compile_cuda.find_nvcc() is None, reason="needs nvcc")
def test_compile_check_fails_with_the_compiler_message(tmp_path, capsys):
    (tmp_path / "good.cu").write_text("__global__ void fill(float* x) { x[threadIdx.x] = 1.f; }\n")
    (tmp_path / "bad.cu").write_text("__global__ void broken(float* x) { x[threadIdx.x] = undeclared_name; }\n")
    assert compile_cuda.main(["--arch", "80", "--csrc", str(tmp_path), "--no-bindings"]) == 1
    out = capsys.readouterr().out
    assert "ok   good.cu sm_80" in out and "FAIL bad.cu sm_80" in out and "undeclared_name" in out


def test_kernel_sources_do_not_include_torch():
    """Kernel translation units stay free of torch headers (fast builds, CPU compile check, emulator)."""
    kernel_files = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cuh", ".h")]
    assert kernel_files
    for path in kernel_files:
        includes = re.findall(r'#include\s*[<"]([^>"]+)', path.read_text())
        assert not [i for i in includes if i.startswith(("torch/", "ATen/", "c10/"))], path.name


def test_one_head_dim_list():
    """csrc/head_dims.h is the only list of head-dim buckets; every bucket has its instantiation file."""
    buckets = compile_cuda.head_dims()
    assert buckets == tuple(sorted(set(buckets))) and all(hd % 16 == 0 for hd in buckets)
    assert compile_cuda.layout_problems() == []
    # The files that dispatch, check or instantiate per bucket spell none out (a case label, a
    # _hd<N> name, a template argument, a limit in a message): they expand the macro.
    spelled = re.compile(r"case\s+({0})\b|_hd({0})\b|,\s*({0})\s*>|at most ({0})\b".format("|".join(map(str, buckets))))
    for name in ("launchers.h", "bindings.cpp", "emulate/emulated_kernels.cpp"):
        text = (ROOT / "csrc" / name).read_text()
        assert "FASTMLM_FOR_EACH_HEAD_DIM" in text or "kMaxHeadDim" in text, name
        assert not spelled.search(text), f"{name}: {spelled.search(text).group(0)}"


def test_layout_check_names_a_missing_or_stray_bucket(tmp_path):
    (tmp_path / "head_dims.h").write_text("#define FASTMLM_FOR_EACH_HEAD_DIM(X) X(32) X(64)\n")
    (tmp_path / "attention_hd32.cu").write_text('#include "attention.cuh"\nFASTMLM_INSTANTIATE_ATTENTION(32)\n')
    (tmp_path / "attention_hd96.cu").write_text('#include "attention.cuh"\nFASTMLM_INSTANTIATE_ATTENTION(96)\n')
    assert compile_cuda.head_dims(tmp_path) == (32, 64)
    problems = compile_cuda.layout_problems(tmp_path)
    assert len(problems) == 2
    assert "head dim 64" in problems[0] and "attention_hd64.cu" in problems[0]
    assert "attention_hd96.cu" in problems[1]
    assert compile_cuda.main(["--csrc", str(tmp_path), "--no-bindings"]) == 1


def _setup(env_value):
    env = dict(os.environ, FASTMLM_BUILD_CUDA=env_value)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)


def test_setup_skips_the_extension_when_told():
    done = _setup("0")
    assert done.returncode == 0
    assert done.stderr.count("building without the CUDA extension (FASTMLM_BUILD_CUDA=0)") == 1


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_setup_refuses_a_forced_build_with_cpu_torch():
    done = _setup("1")
    assert done.returncode != 0
    assert "FASTMLM_BUILD_CUDA=1 but the CUDA extension cannot be built" in done.stderr
    assert "is not a CUDA build" in done.stderr


def test_python_driver_head_dim_limit_is_the_largest_bucket():
    from fastmlm.ops.cuda_impl import attention as cuda_attention

    assert cuda_attention.MAX_HEAD_DIM == max(compile_cuda.head_dims())
