"""Compile the masked-CE Triton kernels for sm_90 (H100) on any machine, no GPU needed.

The Triton interpreter runs code the compiler rejects (and the reverse), so the CPU test tier
also compiles every kernel of kernels/masked_ce.py with its GPU configuration and reports the
shared memory each needs. Run it without TRITON_INTERPRET=1:

    python -c "from fastmlm.ops.kernels_path import import_module; import_module('fastmlm_kernels._masked_ce_compile').main()"

Arguments are typed by name, and integers divisible by 16 and unit strides are specialised as
Triton does at launch for BERT-base shapes (H = 768; the vocabulary 30522 is not a multiple of 16).
"""
from __future__ import annotations

import inspect

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmlm.ops.kernels_path import triton_interpret

from . import masked_ce, masked_ce_launch

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100
TYPES = {"tokens_ptr": "*i64", "targets_ptr": "*i64", "n_rows_ptr": "*i32", "argbest_ptr": "*i32",
         "label_smoothing": "fp32", "z_loss": "fp32"}
FP32_POINTERS = ("max_ptr", "sumexp_ptr", "target_logit_ptr", "logit_sum_ptr", "best_ptr", "lse_ptr", "grad_ptr",
                 "drows_ptr", "logits_ptr")
# The switches of forward_and_grads (store the logits, read them back, accumulate d_weight):
# each kernel is compiled with them off (forward, backward) and on (forward_and_grads).
FUSED_FLAGS = ("STORE_LOGITS", "LOAD_LOGITS", "ACCUMULATE")
NOT_DIVISIBLE = ("V", "stride_logits_row")  # the vocabulary, 30522, and strides equal to it
UNIT_STRIDES = {"forward": ("stride_h_hid", "stride_w_hid"), "dlogits": ("stride_h_hid", "stride_w_hid"),
                "dhidden": ("stride_w_hid",), "dweight": ("stride_h_hid", "stride_dw_hid")}


def compile_kernel(name: str, dtype: torch.dtype, fused: bool = False, target=GPUTarget("cuda", 90, 32)):
    """Compile ``_<name>_kernel`` for ``target`` with the GPU configuration for ``dtype``
    (``fused``: with the switches of forward_and_grads on)."""
    fn = getattr(masked_ce, f"_{name}_kernel")
    configs = masked_ce_launch._configs(dtype)
    meta = dict(configs[name])
    options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    meta["DOT_PRECISION"] = configs["DOT_PRECISION"]
    meta.update({stride: 1 for stride in UNIT_STRIDES[name]})
    params = list(inspect.signature(fn.fn).parameters)
    if "HAS_BIAS" in params:
        meta["HAS_BIAS"] = True
    meta.update({flag: fused for flag in FUSED_FLAGS if flag in params})
    element = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    signature, attrs = {}, {}
    for i, param in enumerate(params):
        if param in meta:
            signature[param] = "constexpr"
            continue
        signature[param] = TYPES.get(param, "*fp32" if param in FP32_POINTERS else
                                     f"*{element}" if param.endswith("_ptr") else "i32")
        if signature[param] != "fp32" and param not in NOT_DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs={(params.index(p),): v for p, v in meta.items()}, attrs=attrs)
    return triton.compile(source, target=target, options=options)


def main(dtypes=(torch.bfloat16, torch.float32)) -> None:
    """Compile every kernel for each dtype; print one line per kernel, ending in "ok" when it fits."""
    if triton_interpret():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels it would compile")
    for dtype in dtypes:
        for name in UNIT_STRIDES:
            for fused in (False, True):
                if fused and name == "dhidden":  # no switch there
                    continue
                shared = compile_kernel(name, dtype, fused).metadata.shared
                verdict = "ok" if shared <= SHARED_LIMIT else "TOO MUCH SHARED MEMORY"
                print(f"{name + (' fused' if fused else ''):14s} {str(dtype):15s} shared {shared:7d} B  {verdict}")


if __name__ == "__main__":
    main()
