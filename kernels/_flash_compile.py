"""Compile the attention kernels of ``_flash.py`` for sm_90 (H100) on any machine, no GPU needed.

The Triton interpreter accepts code the GPU compiler rejects (and the reverse), so the CPU
tier also compiles the kernels the way a launch on an H100 would, and reports the shared
memory each configuration needs. Run it without TRITON_INTERPRET=1:

    python -c "from fastmlm.ops.kernels_path import import_module; import_module('fastmlm_kernels._flash_compile').main()"
    ... main(every_config=True)   # every autotune config, fp32 and head dim 128 too (minutes)
    ... side_check()              # every kernel (attention and masked CE) for sm_90a and sm_80 (make compile-triton)

``make compile-triton`` runs :func:`side_check` under the GPU machine's triton (3.6), installed
beside .venv with ``pip install --no-deps --target``, so a kernel the older compiler rejects
fails on the CPU tier, not on the GPU.

Pointers and token strides are marked 16-divisible, as Triton specialises them at launch
for (tokens, H, D) tensors with H * D a multiple of 16.
"""
from __future__ import annotations

from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmlm.ops.kernels_path import triton_interpret

from . import _flash, attention

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100
SHARED_LIMITS = {90: 227 * 1024, 80: 163 * 1024}  # per compute capability (H100, A100)
KERNELS = {"fwd": _flash._fwd_kernel, "dkdv": _flash._dkdv_kernel, "dq": _flash._dq_kernel}
INT_POINTERS = {"CuSeqlens": "*i32", "KeyBounds": "*i32", "KvIndex": "*i32", "KvCount": "*i32", "QIndex": "*i32",
                "QCount": "*i32", "KeyMask": "*u8", "TokenMask": "*u8", "TileState": "*i8", "Blocks": "*i8"}
FP32_POINTERS = ("Lse", "Delta")
DIVISIBLE = ("stride_q_tok", "stride_k_tok", "stride_v_tok", "stride_o_tok")


def compile_kernel(name, dtype, head_dim, config, *, packed=False, key_mask=False, sparse=False,
                   token_mask=False, target=GPUTarget("cuda", 90, 32)):
    """Compile one kernel ("fwd", "dkdv", "dq") for ``target``; dtype is "bf16", "fp16" or "fp32";
    config is (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    fn = KERNELS[name]
    block_m, block_n, warps, stages = config
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m,
                BLOCK_N=block_n, IS_PACKED=packed, HAS_KEY_MASK=key_mask, SPARSE=sparse,
                HAS_TOKEN_MASK=token_mask, LAYOUT_BLOCK=block_m if sparse else 1,
                PRECISION="ieee" if dtype == "fp32" else "tf32")
    signature, attrs = {}, {}
    for i, param in enumerate(fn.arg_names):
        if param in meta:
            signature[param] = "constexpr"
            continue
        if param in INT_POINTERS:
            signature[param] = INT_POINTERS[param]
        elif param in FP32_POINTERS:
            signature[param] = "*fp32"
        elif param[0].isupper():  # Q, K, V, Out, DOut, DK, DV, DQ
            signature[param] = f"*{dtype}"
        else:
            signature[param] = "fp32" if param in ("scale", "qk_scale") else "i32"
        if signature[param].startswith("*") or param in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(p),): v for p, v in meta.items()}, attrs=attrs)
    return triton.compile(source, target=target, options=dict(num_warps=warps, num_stages=stages))


def cases(every_config: bool = False):
    """(name, dtype, head_dim, config, flags) to compile: by default the first tuned config of the
    dense path (bf16, head dim 64, padding mask) and the block-sparse path (fp16, packed, token mask)."""
    for name in KERNELS:
        for dtype, head_dim in ([("bf16", 64), ("bf16", 128), ("fp32", 64)] if every_config else [("bf16", 64)]):
            tiles = attention.dense_tiles(name, head_dim)
            for config in (tiles if every_config else tiles[:1]):
                yield name, dtype, head_dim, config, dict(key_mask=True)
        yield name, "fp16", 64, (64, 64, 8, 3), dict(packed=True, sparse=True, token_mask=True)


def compile_delta(dtype: str = "bf16", head_dim: int = 64, target=GPUTarget("cuda", 90, 32)):
    """The backward's preprocessing kernel (delta = rowsum(dO * O)), as the launcher configures it."""
    fn = _flash._delta_kernel
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_T=64)
    signature, attrs = {}, {}
    for i, param in enumerate(fn.arg_names):
        if param in meta:
            signature[param] = "constexpr"
            continue
        signature[param] = "*fp32" if param == "Delta" else f"*{dtype}" if param[0].isupper() else "i32"
        if signature[param].startswith("*") or param == "stride_o_tok":
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(p),): v for p, v in meta.items()}, attrs=attrs)
    return triton.compile(source, target=target, options=dict(num_warps=4))


def ptx_target(compiled) -> str:
    """The ``.target`` line of a compiled kernel's PTX (sm_90a, sm_80), as the report shows it."""
    for line in compiled.asm.get("ptx", "").splitlines():
        if line.startswith(".target"):
            return line.split()[1].rstrip(",")
    return "?"


def side_cases():
    """What :func:`side_check` compiles per kernel: the first tuned tile of the dense path in bf16 at head
    dims 64 and 128, fp16 at an odd multiple of 8 (40), fp32 (IEEE dots), and the block-sparse path."""
    for name in KERNELS:
        for dtype, head_dim in (("bf16", 64), ("bf16", 128), ("fp16", 40), ("fp32", 64)):
            yield name, dtype, head_dim, attention.dense_tiles(name, head_dim)[0], dict(key_mask=True)
        yield name, "fp16", 64, (64, 64, 8, 3), dict(packed=True, sparse=True, token_mask=True)


def side_check(capabilities=(90, 80)) -> int:
    """Compile every Triton kernel (attention: fwd, delta, dK/dV, dQ, dense and block-sparse; masked CE:
    its four) for each compute capability with the triton on sys.path; print one line each; return the
    number of failures (a kernel that does not compile, or that no configuration fits)."""
    from . import _masked_ce_compile

    import torch

    if triton_interpret():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels it would compile")
    print(f"triton {triton.__version__} from {Path(triton.__file__).parent}", flush=True)
    failures = 0
    for cap in capabilities:
        target = GPUTarget("cuda", cap, 32)
        jobs = [(f"{name} {'sparse' if flags.get('sparse') else 'dense'} {dtype} d={hd}",
                 lambda name=name, dtype=dtype, hd=hd, config=config, flags=flags:
                 compile_kernel(name, dtype, hd, config, target=target, **flags))
                for name, dtype, hd, config, flags in side_cases()]
        jobs.append(("delta bf16 d=64", lambda: compile_delta(target=target)))
        jobs += [(f"masked_ce {name} {str(dt).replace('torch.', '')}",
                  lambda name=name, dt=dt: _masked_ce_compile.compile_kernel(name, dt, target=target))
                 for dt in (torch.bfloat16, torch.float32) for name in _masked_ce_compile.UNIT_STRIDES]
        for label, job in jobs:
            try:
                compiled = job()
            except Exception as exc:  # noqa: BLE001 - every failure is listed, then counted
                failures += 1
                print(f"sm_{cap}  {label:32s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                      flush=True)
                continue
            shared = compiled.metadata.shared
            fits = shared <= SHARED_LIMITS[cap]
            failures += not fits
            print(f"sm_{cap}  {label:32s} {ptx_target(compiled):7s} shared {shared:7d} B  "
                  f"{'ok' if fits else 'TOO MUCH SHARED MEMORY'}", flush=True)
    print(f"{failures} failed", flush=True)
    return failures


def main(every_config: bool = False) -> None:
    if triton_interpret():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels it would compile")
    for name, dtype, head_dim, config, flags in cases(every_config):
        shared = compile_kernel(name, dtype, head_dim, config, **flags).metadata.shared
        verdict = "ok" if shared <= SHARED_LIMIT else "TOO MUCH SHARED MEMORY (the autotuner will skip it)"
        kind = "sparse" if flags.get("sparse") else "dense"
        print(f"{name:5s} {kind:6s} {dtype:5s} d={head_dim:<3d} tile={config} shared {shared:7d} B  {verdict}",
              flush=True)


if __name__ == "__main__":
    main()
