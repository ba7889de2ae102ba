"""The CUDA kernels on the CPU: csrc/emulate/ built with the host compiler, called through ctypes.

Used by the CPU test tier (tests/test_cuda_kernels.py) through
``fastmlm.ops.cuda_impl.emulation()``. :class:`EmulatedOps` has the same methods, with
the same signatures, as the registered ops ``torch.ops.fastmlm_C``, but takes CPU tensors.
The library is compiled once per source version (about 20 s) into a cache folder
(``$FASTMLM_EMULATOR_CACHE``, default: the temp dir). Needs g++ and the CUDA headers
(``cuda_fp16.h`` and friends; no GPU and no CUDA runtime library).

The seams with the real extension are tested without a GPU or a compiler
(tests/test_cuda_emulator_schema.py): :data:`OP_FUNCTIONS` names the C function behind each op,
:data:`C_SIGNATURES` gives the ctypes argument types of each, in the order of the C prototypes
in csrc/emulate/emulated_kernels.cpp, and every :class:`EmulatedOps` method takes the arguments
of its ``TORCH_LIBRARY`` schema in csrc/bindings.cpp, by name and in order. What the emulator
cannot check (wgmma/TMA, timing, real memory ordering, ...) is listed in csrc/README.md.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ...tools.compile_cuda import cuda_include_dir

CSRC = Path(__file__).resolve().parents[3] / "csrc"
_LIB = None

# The dtype codes of the C interface: fastmlm::DType (csrc/launchers.h) as an integer.
_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float

# The C function behind each op of torch.ops.fastmlm_C (one serves the dense and block-sparse attention ops).
OP_FUNCTIONS = {
    "attention_fwd": "fastmlm_emu_attention",
    "attention_bwd": "fastmlm_emu_attention",
    "block_sparse_fwd": "fastmlm_emu_attention",
    "block_sparse_bwd": "fastmlm_emu_attention",
    "gather_rows": "fastmlm_emu_gather_rows",
    "masked_ce_chunk_stats": "fastmlm_emu_chunk_stats",
    "masked_ce_finish": "fastmlm_emu_finish",
    "masked_ce_chunk_grad": "fastmlm_emu_chunk_grad",
}
# The ctypes argument types of each exported C function, in the order of its prototype
# (pointer, int, int64_t, float); every one returns a cudaError_t code as an int.
C_SIGNATURES = {
    "fastmlm_emu_attention": [_I, _I] + [_P] * 13 + [_I, _I, _I, _I, _L, _F] + [_P] * 6 + [_I] * 7,
    "fastmlm_emu_gather_rows": [_I, _P, _P, _P, _L, _L, _L],
    "fastmlm_emu_chunk_stats": [_I, _P, _P, _P, _L, _P, _P, _P, _L, _L],
    "fastmlm_emu_finish": [_P, _P, _P, _L, _F, _F, _P, _P, _P, _L],
    "fastmlm_emu_chunk_grad": [_I, _P, _P, _P, _P, _P, _L, _L, _F, _F, _P, _L, _L],
}


def unavailable() -> str | None:
    """Why the emulator cannot be built here (None: it can)."""
    if not CSRC.joinpath("emulate", "emulated_kernels.cpp").exists():
        return "csrc/ is not beside this checkout"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++)"
    if cuda_include_dir() is None:
        return "no CUDA headers (cuda_fp16.h) found"
    return None


def library() -> ctypes.CDLL:
    """Build (once per source version) and load the emulated kernels."""
    global _LIB
    if _LIB is not None:
        return _LIB
    why = unavailable()
    if why:
        raise RuntimeError(f"the kernel emulator cannot be built: {why}")
    # Everything the emulator's translation unit may include (it takes masked_ce.cu whole).
    sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))
    sources += sorted(CSRC.glob("emulate/*"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    cache = Path(os.environ.get("FASTMLM_EMULATOR_CACHE", tempfile.gettempdir()))
    target = cache / f"libfastmlm_emulated_{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O1", "-shared", "-fPIC", "-DFASTMLM_EMULATE",
               f"-I{CSRC}", f"-I{cuda_include_dir()}", str(CSRC / "emulate" / "emulated_kernels.cpp"),
               "-o", str(partial)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the kernel emulator failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
        partial.replace(target)  # atomic: parallel test workers never load half a file
    lib = ctypes.CDLL(str(target))
    for name, argtypes in C_SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    _LIB = lib
    return lib


def _ptr(t):
    if t is None:
        return None
    assert t.device.type == "cpu" and t.is_contiguous(), "the emulator takes contiguous CPU tensors"
    return t.data_ptr()


def _check(code: int, what: str):
    if code != 0:
        raise RuntimeError(f"emulated {what} returned CUDA error code {code}")


class EmulatedOps:
    """Drop-in for ``torch.ops.fastmlm_C`` on CPU tensors (no input checks beyond the kernels' own)."""

    def __init__(self):
        self.lib = library()

    def _attention(self, backward, q, k, v, out, lse, key_mask, key_len, cu_seqlens, dout, delta, dq, dk, dv,
                   max_seqlen, scale, sparse=None):
        """sparse: (blocks, kv_index, kv_count, q_index, q_count, token_mask, block_size, window, num_global)
        of a block-sparse call, as the schema orders them; None for dense attention."""
        batch = q.shape[0] if q.dim() == 4 else cu_seqlens.numel() - 1
        if sparse is None:
            layout = [None] * 6 + [0, 0, 0, 0, 0, -1, 0]
        else:
            blocks, kv_index, kv_count, q_index, q_count, token_mask, block_size, window, num_global = sparse
            mask_heads, layout_len = (0, 0) if token_mask is None else token_mask.shape[:2]
            layout = [_ptr(t) for t in (blocks, kv_index, kv_count, q_index, q_count, token_mask)]
            layout += [blocks.shape[0], mask_heads, blocks.shape[1], layout_len, block_size, window, num_global]
        code = self.lib.fastmlm_emu_attention(
            int(backward), _DTYPES[q.dtype], _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), _ptr(key_mask),
            _ptr(key_len), _ptr(cu_seqlens), _ptr(dout), _ptr(delta), _ptr(dq), _ptr(dk), _ptr(dv), batch, q.shape[-2],
            max_seqlen, q.shape[-1], q.numel() // q.shape[-1], scale, *layout)
        _check(code, "attention")

    def attention_fwd(self, q, k, v, key_mask, key_len, cu_seqlens, max_seqlen, scale, out, lse):
        self._attention(False, q, k, v, out, lse, key_mask, key_len, cu_seqlens, None, None, None, None, None,
                        max_seqlen, scale)

    def attention_bwd(self, dout, q, k, v, out, lse, key_mask, key_len, cu_seqlens, max_seqlen, scale, delta, dq, dk,
                      dv):
        self._attention(True, q, k, v, out, lse, key_mask, key_len, cu_seqlens, dout, delta, dq, dk, dv, max_seqlen,
                        scale)

    def block_sparse_fwd(self, q, k, v, key_mask, key_len, cu_seqlens, max_seqlen, scale, blocks, kv_index, kv_count,
                         q_index, q_count, token_mask, block_size, window, num_global, out, lse):
        self._attention(False, q, k, v, out, lse, key_mask, key_len, cu_seqlens, None, None, None, None, None,
                        max_seqlen, scale,
                        (blocks, kv_index, kv_count, q_index, q_count, token_mask, block_size, window, num_global))

    def block_sparse_bwd(self, dout, q, k, v, out, lse, key_mask, key_len, cu_seqlens, max_seqlen, scale, blocks,
                         kv_index, kv_count, q_index, q_count, token_mask, block_size, window, num_global, delta, dq,
                         dk, dv):
        self._attention(True, q, k, v, out, lse, key_mask, key_len, cu_seqlens, dout, delta, dq, dk, dv, max_seqlen,
                        scale,
                        (blocks, kv_index, kv_count, q_index, q_count, token_mask, block_size, window, num_global))

    def gather_rows(self, hidden, positions, rows):
        _check(self.lib.fastmlm_emu_gather_rows(_DTYPES[hidden.dtype], _ptr(hidden), _ptr(positions), _ptr(rows),
                                                positions.numel(), hidden.shape[0], hidden.shape[1]), "gather_rows")

    def masked_ce_chunk_stats(self, logits, bias, targets, v0, stats, best, best_logit):
        _check(self.lib.fastmlm_emu_chunk_stats(_DTYPES[logits.dtype], _ptr(logits), _ptr(bias), _ptr(targets), v0,
                                                _ptr(stats), _ptr(best), _ptr(best_logit), logits.shape[0],
                                                logits.shape[1]), "masked_ce_chunk_stats")

    def masked_ce_finish(self, stats, best, targets, vocab, label_smoothing, z_loss, loss, lse, correct):
        _check(self.lib.fastmlm_emu_finish(_ptr(stats), _ptr(best), _ptr(targets), vocab, label_smoothing, z_loss,
                                           _ptr(loss), _ptr(lse), _ptr(correct), targets.numel()), "masked_ce_finish")

    def masked_ce_chunk_grad(self, logits, bias, targets, lse, grad, v0, vocab, label_smoothing, z_loss, dlogits):
        _check(self.lib.fastmlm_emu_chunk_grad(_DTYPES[logits.dtype], _ptr(logits), _ptr(bias), _ptr(targets),
                                               _ptr(lse), _ptr(grad), v0, vocab, label_smoothing, z_loss,
                                               _ptr(dlogits), logits.shape[0], logits.shape[1]),
               "masked_ce_chunk_grad")
