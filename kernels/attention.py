"""``triton`` backend of :func:`fastmlm.ops.attention`: launchers, schedule and autotune lists of the fused kernels.

The JIT code lives in ``_flash.py`` (shared with block-sparse attention); dense
attention is the schedule that visits every key block up to each sequence's last
real key. Padded (B, S, H, D) batches take an arbitrary (B, S) key mask (applied
per element; key blocks past the last real key are skipped); packed (T, H, D)
batches take cu_seqlens. Backward is deterministic (no atomics).

Supports fp16, bf16 and fp32 (IEEE dot products), head_dim a multiple of 8 up to
128 (32, 64, 128 are the tuned ones), any sequence length, CUDA tensors, and CPU
tensors under ``TRITON_INTERPRET=1`` except bf16 (the interpreter's bf16 dot is wrong).
The differences from the CUDA kernels are listed in ``_flash.py``.

Launchers check, allocate, launch: the per-sequence bounds (last real key, holes in
the mask) are computed on the device, and nothing is read back to the host.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton

from fastmlm.ops.kernels_path import triton_interpret

from . import _flash

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
MAX_BATCH = 65535  # the launch grid's third axis
LOG2E = 1.4426950408889634


def why_not(inputs) -> Optional[str]:
    """None when the kernels can run ``inputs`` (an AttentionInputs), else a short reason."""
    q = inputs.q
    if q.device.type == "cpu":
        if not triton_interpret():
            return "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
        if q.dtype == torch.bfloat16:
            return "bf16 is not supported under the Triton interpreter (its bf16 dot products are wrong); use a GPU"
    elif q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device.type}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (fp16, bf16, fp32)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not supported: use a multiple of 8 up to {MAX_HEAD_DIM} (e.g. 32, 64, 128)"
    if inputs.batch > MAX_BATCH:
        return f"batch {inputs.batch} exceeds {MAX_BATCH} sequences per launch"
    return None


def forward(inputs):
    """Returns (out shaped like q, lse shaped q.shape[:-1] fp32), contiguous."""
    return launch_forward(inputs, DENSE)


def backward(inputs, out, lse, dout):
    """Returns (dq, dk, dv) shaped like q, contiguous."""
    return launch_backward(inputs, out, lse, dout, DENSE)


# --------------------------------------------------------------------------- autotuning
def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Dense tiles (BLOCK_M, BLOCK_N, warps, stages) per kernel and head-dim class, best guess first.
# Chosen from sm_90 compiles (kernels/_flash_compile.py + cuobjdump --dump-resource-usage): at
# head dim <= 64 none of these spills registers; at 128 every candidate spilled a little, these
# the least. Not yet timed on a GPU: the autotuner picks among them per head dim and power-of-two
# sequence length. Under the interpreter one small fixed tile keeps tests quick.
_DENSE_TILES = {
    "fwd": {"small": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
            "large": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3)]},
    "dkdv": {"small": [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
             "large": [(64, 64, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3)]},
    "dq": {"small": [(128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
           "large": [(64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3)]},
}
INTERPRETER_TILE = 32
_KEY = ["HEAD_DIM", "seqlen_key", "IS_PACKED", "HAS_KEY_MASK", "SPARSE"]


def dense_tiles(name: str, head_dim: int) -> list:
    return _DENSE_TILES[name]["small" if head_dim <= 64 else "large"]


def _as_tuple(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _prune_for_head_dim(configs, named_args, *, name: str, first_only: bool, **kwargs):
    """Keep the tiles listed for this head dim (only the first when not tuning). Constexprs
    passed by keyword, like HEAD_DIM, reach the pruner in kwargs, not in named_args."""
    wanted = dense_tiles(name, kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64)))
    wanted = wanted[:1] if first_only else wanted
    return [c for c in configs if _as_tuple(c) in wanted] or configs[:1]


def autotune_enabled() -> bool:
    """FASTMLM_TRITON_AUTOTUNE=0 runs the first config of each list instead of tuning: every
    new shape/dtype then costs one compile per kernel rather than one per config (test runs)."""
    return os.environ.get("FASTMLM_TRITON_AUTOTUNE", "1") != "0"


def kernel(name: str, sparse_tile: int = 0):
    """The launchable (autotuned) kernel ``name`` in {"fwd", "dkdv", "dq"}.

    Dense (sparse_tile=0): tiles from the lists above. Block-sparse: the tile is fixed
    by the layout (sparse_tile), only warps and stages are tuned. Built on first use,
    so importing this module never touches a GPU.
    """
    return _build_kernel(name, sparse_tile, triton_interpret(), autotune_enabled())


@functools.lru_cache(maxsize=None)
def _build_kernel(name: str, sparse_tile: int, interpret: bool, tune: bool):
    fn = {"fwd": _flash._fwd_kernel, "dkdv": _flash._dkdv_kernel, "dq": _flash._dq_kernel}[name]
    prune = None
    if interpret:
        tile = sparse_tile or INTERPRETER_TILE
        configs = [_cfg(tile, tile, 4, 1)]
    elif sparse_tile:
        warps = (4, 8) if sparse_tile <= 32 else (8, 4)  # 64-wide tiles spilled with 4 warps on sm_90
        configs = [_cfg(sparse_tile, sparse_tile, w, s) for w in warps for s in (3, 2)][: 4 if tune else 1]
    else:
        tiles = dict.fromkeys(_DENSE_TILES[name]["small"] + _DENSE_TILES[name]["large"])  # ordered union
        configs = [_cfg(*t) for t in tiles]
        prune = {"early_config_prune": functools.partial(_prune_for_head_dim, name=name, first_only=not tune)}
    return triton.autotune(configs, key=_KEY, prune_configs_by=prune)(fn)


# --------------------------------------------------------------------------- schedule
@dataclass(frozen=True, eq=False)
class Schedule:
    """Which key blocks each query block visits. Dense: ``Schedule()`` (all of them, up to the last real key).

    Block-sparse (built by block_sparse.sparse_schedule): tile (the kernel tile edge),
    tile_state (Hl, nq, nk) int8, kv_index / kv_count (per query block, ascending),
    q_index / q_count (per key block, the transposed list), plus the layout's fine rule:
    blocks, layout_block, layout_len, window, num_global, token_mask (uint8 view).
    Leading dims of size 1 serve every head.
    """

    tile: int = 0
    tile_state: Optional[torch.Tensor] = None
    kv_index: Optional[torch.Tensor] = None
    kv_count: Optional[torch.Tensor] = None
    q_index: Optional[torch.Tensor] = None
    q_count: Optional[torch.Tensor] = None
    blocks: Optional[torch.Tensor] = None
    layout_block: int = 1
    layout_len: int = 0
    window: int = -1
    num_global: int = 0
    token_mask: Optional[torch.Tensor] = None

    @property
    def sparse(self) -> bool:
        return self.tile > 0

    def kernel_args(self, dummy: torch.Tensor, transpose: bool) -> dict:
        """Pointer, size and stride arguments for a kernel, in kernel order; ``dummy`` stands in
        for the absent pointers (dense kernels never read them)."""
        if not self.sparse:
            return dict(pointers=(dummy,) * 5, sizes=(0, -1, 0), strides=(0,) * 9, token_mask=False)
        index, count = (self.q_index, self.q_count) if transpose else (self.kv_index, self.kv_count)
        tm = self.token_mask
        shared = lambda t: 0 if t.shape[0] == 1 else t.stride(0)  # one layout for every head
        return dict(
            pointers=(self.tile_state, index, count, self.blocks, dummy if tm is None else tm),
            sizes=(self.layout_len, self.window, self.num_global),
            strides=(shared(self.tile_state), self.tile_state.stride(1), shared(index), index.stride(1), shared(count),
                     shared(self.blocks), self.blocks.stride(1),
                     0 if tm is None else shared(tm), 0 if tm is None else tm.stride(1)),
            token_mask=tm is not None,
        )


DENSE = Schedule()


# --------------------------------------------------------------------------- launchers
class Sequences(NamedTuple):
    """The batch as the kernels see it: sizes, and the sequence-bound tensors of either layout."""

    packed: bool
    heads: int
    head_dim: int
    batch: int
    padded_len: int  # S when padded, 0 when packed
    max_seqlen: int
    cu_seqlens: Optional[torch.Tensor]  # (B + 1,) int32, unit stride; packed only
    key_bounds: Optional[torch.Tensor]  # (B, 2) int32: last real key + 1, holes before it; padded with a mask
    key_mask: Optional[torch.Tensor]  # (B, S) uint8 view of the mask

    def pointers(self, dummy: torch.Tensor) -> tuple:
        """CuSeqlens, KeyBounds, KeyMask kernel arguments; ``dummy`` stands in for the absent ones."""
        return tuple(dummy if t is None else t for t in (self.cu_seqlens, self.key_bounds, self.key_mask))


def _sequences(inputs) -> Sequences:
    """Flattened sizes and sequence-bound tensors of either layout, computed on the device."""
    q, mask, cu_seqlens = inputs.q, inputs.attention_mask, inputs.cu_seqlens
    packed = cu_seqlens is not None
    padded_len = 0 if packed else q.shape[1]
    key_bounds = key_mask = None
    if mask is not None and padded_len:
        mask = mask.bool()
        # Keys past the last real one are never visited: kv_len = last True position + 1 (0 if none).
        # "holes": some key before kv_len is padding, so every tile needs the per-element mask.
        kv_len = inputs.key_lengths()
        holes = mask.sum(dim=1, dtype=torch.int32) != kv_len
        key_bounds = torch.stack([kv_len, holes.to(torch.int32)], dim=1).contiguous()  # (B, 2)
        key_mask = mask.contiguous().view(torch.uint8)
    # The kernels read cu_seqlens with unit stride.
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
    return Sequences(packed, q.shape[-2], q.shape[-1], inputs.batch, padded_len, inputs.max_seqlen, cu_seqlens,
                     key_bounds, key_mask)


def _constexprs(seqs: Sequences, schedule: Schedule, dtype: torch.dtype) -> dict:
    """The meta-parameters every kernel takes (the autotuner adds BLOCK_M and BLOCK_N)."""
    return dict(
        HEAD_DIM=seqs.head_dim, BLOCK_D=max(16, triton.next_power_of_2(seqs.head_dim)),
        IS_PACKED=seqs.packed, HAS_KEY_MASK=seqs.key_mask is not None,
        SPARSE=schedule.sparse, LAYOUT_BLOCK=schedule.layout_block,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def _tokens(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(tokens, H, D) view with unit stride along D. Inputs sliced from a fused QKV projection
    keep their token / head strides (no copy); only layouts that cannot be flattened are copied."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, heads, head_dim)


def _input_strides(*tensors):
    """stride_<t>_tok, stride_<t>_head of each (tokens, H, D) tensor, in kernel order."""
    return tuple(stride for t in tensors for stride in (t.stride(0), t.stride(1)))


def launch_forward(inputs, schedule: Schedule):
    """Launch the forward over ``schedule``; returns (out shaped like q, lse shaped q.shape[:-1] fp32)."""
    q = inputs.q
    seqs = _sequences(inputs)
    h, d = seqs.heads, seqs.head_dim
    qf, kf, vf = (_tokens(t, h, d) for t in inputs[:3])
    out = torch.empty(qf.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(qf.shape[:-1], device=q.device, dtype=torch.float32)
    if qf.shape[0] and seqs.max_seqlen and seqs.batch:
        sparse = schedule.kernel_args(lse, transpose=False)
        grid = lambda meta: (triton.cdiv(seqs.max_seqlen, meta["BLOCK_M"]), h, seqs.batch)
        kernel("fwd", schedule.tile)[grid](
            qf, kf, vf, out, lse, *seqs.pointers(lse), *sparse["pointers"],
            seqs.padded_len, h, *sparse["sizes"], triton.next_power_of_2(seqs.max_seqlen),
            *_input_strides(qf, kf, vf), out.stride(0), out.stride(1), *sparse["strides"],
            inputs.scale * LOG2E,
            HAS_TOKEN_MASK=sparse["token_mask"], **_constexprs(seqs, schedule, q.dtype),
        )
    return out.view(q.shape), lse.view(q.shape[:-1])


def launch_backward(inputs, out, lse, dout, schedule: Schedule):
    """Launch delta, dK/dV and dQ kernels over ``schedule``; returns (dq, dk, dv) shaped like q."""
    q, scale = inputs.q, inputs.scale
    seqs = _sequences(inputs)
    h, d = seqs.heads, seqs.head_dim
    qf, kf, vf = (_tokens(t, h, d) for t in inputs[:3])
    of, dof = (t.contiguous().view(-1, h, d) for t in (out, dout))  # one (H * D, D) stride pair for both
    lsef = lse.contiguous().view(-1, h)
    dq, dk, dv = (torch.empty(qf.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    tokens = qf.shape[0]
    if not (tokens and seqs.max_seqlen and seqs.batch):
        return dq.view(q.shape), dk.view(q.shape), dv.view(q.shape)
    constexprs = _constexprs(seqs, schedule, q.dtype)

    # ---- preprocess: delta = rowsum(dO * O)
    delta = torch.empty_like(lsef)
    block_t = 16 if triton_interpret() else 64
    _flash._delta_kernel[(triton.cdiv(tokens, block_t), h)](
        of, dof, delta, tokens, h, of.stride(0), of.stride(1),
        HEAD_DIM=d, BLOCK_D=constexprs["BLOCK_D"], BLOCK_T=block_t,
    )

    bounds = seqs.pointers(lsef)
    seqlen_key = triton.next_power_of_2(seqs.max_seqlen)

    # ---- dK, dV: one program per key block, walking the query blocks that see it
    sparse = schedule.kernel_args(lsef, transpose=True)
    kernel("dkdv", schedule.tile)[lambda m: (triton.cdiv(seqs.max_seqlen, m["BLOCK_N"]), h, seqs.batch)](
        qf, kf, vf, dof, lsef, delta, dk, dv, *bounds, *sparse["pointers"],
        seqs.padded_len, h, *sparse["sizes"], seqlen_key,
        *_input_strides(qf, kf, vf), of.stride(0), of.stride(1), *sparse["strides"],
        scale, scale * LOG2E,
        HAS_TOKEN_MASK=sparse["token_mask"], **constexprs,
    )
    # ---- dQ: one program per query block, walking the same key blocks as the forward
    sparse = schedule.kernel_args(lsef, transpose=False)
    kernel("dq", schedule.tile)[lambda m: (triton.cdiv(seqs.max_seqlen, m["BLOCK_M"]), h, seqs.batch)](
        qf, kf, vf, dof, lsef, delta, dq, *bounds, *sparse["pointers"],
        seqs.padded_len, h, *sparse["sizes"], seqlen_key,
        *_input_strides(qf, kf, vf), of.stride(0), of.stride(1), *sparse["strides"],
        scale, scale * LOG2E,
        HAS_TOKEN_MASK=sparse["token_mask"], **constexprs,
    )
    return dq.view(q.shape), dk.view(q.shape), dv.view(q.shape)
