"""``torch`` backend of attention on CUDA tensors: PyTorch's own fused GPU kernels, no O(S²) memory.

Two routes, chosen per call from dtype, head dim and torch version (:func:`route`):

  varlen  fp16/bf16, torch >= 2.10, sm_80+, head_dim <= 256:
          ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2), asked for its
          log-sum-exp, and its own backward op ``torch_attn::_varlen_attn_backward``.
            packed               as it is (``window_size`` gives pure sliding windows, see
                                 block_sparse_cuda.py)
            padded, no mask      the B*S tokens as B sequences of S (cu_seqlens = 0, S, 2S, ...)
            padded with a mask   unpad -> varlen -> repad without a host sync: each row's real
                                 tokens first (a stable sort of the mask), then its padding in
                                 chunks of at most PAD_CHUNK tokens that attend only among
                                 themselves. The number of sequences is static, B * (1 +
                                 ceil(S / PAD_CHUNK)), so no length is read back; any mask pattern
                                 works (dense attention does not depend on positions).
  sdpa    fp32, and fp16/bf16 where varlen cannot run (or under ``prefer("sdpa")``): the
          memory-efficient SDPA kernel (``aten._scaled_dot_product_efficient_attention``, which
          returns the log-sum-exp, and its backward) with the key-padding mask as an additive
          bias; packed batches are padded to (B, max_seqlen) first, and unpadded after.

Whichever is faster for padded fp16/bf16 batches is for a benchmark to say: bench_attention
times ``fastmlm-torch`` (this module's default, varlen) beside ``fastmlm-torch-sdpa``.

The contract's corners, as the CPU path keeps them: K/V at padded positions are zeroed
before any product (0 * NaN is NaN); a row without a real key gives zeros, lse = -inf and
zero gradients; padded keys get zero gradients. Padded *query* rows are meaningless by the
contract: the varlen route returns zeros there, the sdpa route attention over the real keys.
Head dims that are not a multiple of 8 are zero-padded (exact: the scale is passed
explicitly). float64 has no fused CUDA kernel: the backend declines it (see :func:`why_not`).

Kernel calls go through four small functions (:func:`varlen_fwd`, :func:`varlen_bwd`,
:func:`efficient_fwd`, :func:`efficient_bwd`) so the CPU tier can replace them with
reference math (``emulate.py``) and test everything around them without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from packaging.version import Version
from torch import Tensor

from .. import checks, padding
from ..attention import AttentionInputs

LOW_PRECISION = (torch.float16, torch.bfloat16)
SDPA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
VARLEN_MIN_TORCH = (2, 10)
FLASH_MAX_HEAD_DIM = 256  # FlashAttention-2 in PyTorch: head dims up to 256
PAD_CHUNK = 128  # padding tokens per extra sequence in the unpad route (one flash tile)
MAX_SEQUENCES = 65535  # FlashAttention's launch grid indexes sequences on its y axis
LSE_ALIGN = 32  # the memory-efficient kernel pads its lse rows to a multiple of 32
_PREFERRED: Optional[str] = None  # set by prefer(): "varlen" or "sdpa" for padded fp16/bf16 batches


# --------------------------------------------------------------------------- environment (stubbed in tests)
def device_type(t: Tensor) -> str:
    """The device type the backend sees; the CPU tier stubs it to try the CUDA paths on other tensors."""
    return t.device.type


def capability(device) -> tuple[int, int]:
    """(major, minor) compute capability; queried at call time only, never at import."""
    return torch.cuda.get_device_capability(device)


def torch_release() -> tuple[int, ...]:
    """torch's release numbers (2, 11, 0) through packaging.version (pre-releases count as their release)."""
    return Version(torch.__version__).release


@functools.lru_cache(maxsize=None)
def varlen_api() -> Optional[str]:
    """Why ``varlen_attn`` cannot be used with this torch (None: it can, with lse, scale and window_size)."""
    if torch_release()[:2] < VARLEN_MIN_TORCH:
        return f"torch {torch.__version__} has no varlen_attn (torch >= 2.10)"
    if torch.version.hip:
        return "varlen_attn's lse layout differs on ROCm builds"
    try:
        from torch.nn.attention import varlen
    except ImportError as exc:
        return f"torch.nn.attention.varlen cannot be imported ({exc})"
    params = inspect.signature(varlen.varlen_attn).parameters
    missing = [p for p in ("return_aux", "scale", "window_size") if p not in params]
    backward = getattr(torch.ops.torch_attn, "_varlen_attn_backward", None)
    if backward is not None:
        names = {a.name for a in backward.default._schema.arguments}
        missing += [f"backward's {p}" for p in ("scale", "window_size") if p not in names]
    else:
        missing.append("the torch_attn::_varlen_attn_backward op")
    if missing:
        return f"torch {torch.__version__}'s varlen_attn lacks {', '.join(missing)}"
    return None


@contextlib.contextmanager
def prefer(route: Optional[str]):
    """Within the block, padded fp16/bf16 batches take ``route`` ("varlen" or "sdpa") where it can run."""
    global _PREFERRED
    if route not in (None, "varlen", "sdpa"):
        raise ValueError(f"route must be 'varlen', 'sdpa' or None, got {route!r}")
    previous, _PREFERRED = _PREFERRED, route
    try:
        yield
    finally:
        _PREFERRED = previous


# --------------------------------------------------------------------------- choosing a route
def why_not_varlen(q: Tensor) -> Optional[str]:
    """Why the FlashAttention varlen kernels cannot take q's dtype / head dim / device (None: they can)."""
    if q.dtype not in LOW_PRECISION:
        return f"varlen_attn (FlashAttention-2) takes float16/bfloat16, not {q.dtype}"
    if q.shape[-1] > FLASH_MAX_HEAD_DIM:
        return f"varlen_attn (FlashAttention-2) takes head_dim <= {FLASH_MAX_HEAD_DIM}, got {q.shape[-1]}"
    api = varlen_api()
    if api:
        return api
    major, _ = capability(q.device)
    if major < 8:
        return f"varlen_attn (FlashAttention-2) needs an sm_80+ GPU, this one is sm_{major}x"
    return None


def why_not_sdpa(q: Tensor) -> Optional[str]:
    """Why the memory-efficient SDPA kernel cannot take q (None: it can)."""
    if q.dtype not in SDPA_DTYPES:
        return (f"no fused CUDA attention kernel takes {q.dtype} (SDPA's flash / memory-efficient / cuDNN kernels "
                "take float16, bfloat16, float32); use one of those, or backend='reference'")
    return None


def varlen_sequences(inputs: AttentionInputs) -> int:
    """How many sequences the varlen route launches for these inputs (see the module docstring)."""
    if inputs.cu_seqlens is not None or inputs.attention_mask is None:
        return inputs.batch
    return inputs.batch * (1 + -(-inputs.q.shape[1] // PAD_CHUNK))


def route(inputs: AttentionInputs) -> tuple[Optional[str], Optional[str]]:
    """("varlen" | "sdpa", None) for the route these inputs take, or (None, why neither can)."""
    q = inputs.q
    no_varlen = why_not_varlen(q)
    if no_varlen is None and varlen_sequences(inputs) > MAX_SEQUENCES:
        no_varlen = f"varlen_attn takes at most {MAX_SEQUENCES} sequences, these need {varlen_sequences(inputs)}"
    no_sdpa = why_not_sdpa(q)
    if no_varlen is None and not (_PREFERRED == "sdpa" and no_sdpa is None and inputs.cu_seqlens is None):
        return "varlen", None
    if no_sdpa is None:
        return "sdpa", None
    return None, no_sdpa  # a dtype no fused kernel takes (varlen's reason would repeat it)


def why_not(inputs: AttentionInputs) -> Optional[str]:
    """Why these CUDA inputs cannot run here (None: they can)."""
    return route(inputs)[1]


# --------------------------------------------------------------------------- kernel calls (replaced in emulation)
def _rng_state(device) -> Tensor:
    return torch.zeros(2, dtype=torch.uint64, device=device)  # what varlen_attn saves: dropout is always 0


def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int, scale: float,
               window: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """FlashAttention varlen forward on (T, H, D) unit-stride tensors; returns (out (T, H, D), lse (T, H) fp32)."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    out, lse = varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, return_aux=AuxRequest(lse=True), scale=scale,
                           window_size=window)
    # FlashAttention's varlen lse is (H, T), as varlen_attn's fake says (its docstring's (T, H) is not
    # what the kernel returns; ROCm builds differ and are declined in varlen_api).
    return out, lse.t()


def varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Tensor,
               max_seqlen: int, scale: float, window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """varlen_attn's own backward op; lse is (T, H) fp32 as :func:`varlen_fwd` returns it."""
    from torch.nn.attention import varlen  # noqa: F401 - registers torch_attn::_varlen_attn_backward

    return torch.ops.torch_attn._varlen_attn_backward(
        dout, q, k, v, out, lse.t().contiguous(), cu, cu, max_seqlen, max_seqlen, False, _rng_state(q.device),
        scale=scale, window_size=list(window))


def efficient_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Memory-efficient SDPA forward on (B, H, S, D) views; returns (out (B, H, S, D), lse (B, H, S) fp32)."""
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False,
                                                                            scale=scale)
    return out, lse[..., : q.shape[2]]


def efficient_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor, lse: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Its backward; lse (B, H, S) is padded back to the kernel's row alignment."""
    seqlen = q.shape[2]
    lse = F.pad(lse, (0, -(-seqlen // LSE_ALIGN) * LSE_ALIGN - seqlen)).contiguous()
    seed = offset = torch.empty((), dtype=torch.int64)  # unused without dropout
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False], False, scale=scale)
    return dq, dk, dv


# --------------------------------------------------------------------------- shared pieces
def _head_pad(t: Tensor, multiple: int = 8) -> Tensor:
    """Zero-pad the head dim to a multiple the kernels take, with unit stride (a copy only when needed)."""
    extra = -t.shape[-1] % multiple
    if extra:
        return F.pad(t, (0, extra))
    return t if t.stride(-1) == 1 else t.contiguous()


def _flat(t: Tensor) -> Tensor:
    """(B, S, H, D) -> (B*S, H, D)."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


class UnpadPlan:
    """Where each token of a padded (B, S) batch goes in the varlen layout (see the module docstring).

    index: (B*S,) int64, the padded flat position of each varlen slot (real tokens first per row).
    cu_seqlens: (B * (1 + ceil(S / PAD_CHUNK)) + 1,) int32: each row's real tokens, then its padding chunks.
    real: (B*S,) bool, True at varlen slots holding real tokens.
    """

    def __init__(self, mask: Tensor, chunk: int = PAD_CHUNK):
        batch, seqlen = mask.shape
        device = mask.device
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # real tokens first, in order
        row_start = torch.arange(batch, device=device, dtype=torch.int64)[:, None] * seqlen
        self.index = (order + row_start).reshape(-1)
        lengths = mask.sum(dim=1, dtype=torch.int64)[:, None]  # (B, 1)
        chunks = -(-seqlen // chunk)
        steps = torch.arange(chunks, device=device, dtype=torch.int64)[None, :] * chunk  # (1, chunks)
        starts = torch.cat([row_start, row_start + torch.clamp(lengths + steps, max=seqlen)], dim=1)
        self.cu_seqlens = torch.cat([starts.reshape(-1), torch.full((1,), batch * seqlen, device=device,
                                                                    dtype=torch.int64)]).to(torch.int32)
        self.real = torch.arange(seqlen, device=device)[None, :] < lengths  # (B, S): slot j of row b is real
        self.real = self.real.reshape(-1)

    def gather(self, t: Tensor) -> Tensor:
        """(B, S, ...) padded -> (B*S, ...) in varlen order."""
        return _flat(t).index_select(0, self.index)

    def scatter(self, t: Tensor, batch: int) -> Tensor:
        """(B*S, ...) in varlen order -> (B, S, ...) padded."""
        out = torch.empty_like(t).index_copy_(0, self.index, t)
        return out.reshape(batch, -1, *t.shape[1:])


# --------------------------------------------------------------------------- varlen route
def _varlen_layout(inputs: AttentionInputs):
    """(cu_seqlens, max_seqlen, to_varlen, from_varlen, real rows mask in padded layout or None)."""
    q, _, _, mask, cu_seqlens, max_seqlen, _ = inputs
    if cu_seqlens is not None:
        return cu_seqlens, max_seqlen, (lambda t: t), (lambda t: t), None
    batch, seqlen = q.shape[:2]
    if mask is None:
        cu = torch.arange(0, batch * seqlen + 1, seqlen, device=q.device, dtype=torch.int32)
        return cu, seqlen, _flat, (lambda t: t.reshape(batch, seqlen, *t.shape[1:])), None
    plan = UnpadPlan(mask)
    return plan.cu_seqlens, seqlen, plan.gather, (lambda t: plan.scatter(t, batch)), mask


def varlen_forward(inputs: AttentionInputs, window: tuple[int, int] = (-1, -1)) -> tuple[Tensor, Tensor]:
    """The varlen route (``window``: FlashAttention's (left, right) sliding window, (-1, -1) for none)."""
    q, k, v, _, _, _, scale = inputs
    cu, max_seqlen, to_varlen, from_varlen, mask = _varlen_layout(inputs)
    qv, kv, vv = (_head_pad(to_varlen(t)) for t in (q, k, v))
    out, lse = varlen_fwd(qv, kv, vv, cu, max_seqlen, scale, window)
    out, lse = from_varlen(out[..., : q.shape[-1]]), from_varlen(lse.float())
    if mask is not None:  # padded query rows: zeros (meaningless by the contract), lse -inf
        out = torch.where(mask[:, :, None, None], out, 0.0)
        lse = torch.where(mask[:, :, None], lse, float("-inf"))
    return out.contiguous(), lse.contiguous()


def varlen_backward(inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor,
                    window: tuple[int, int] = (-1, -1)) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, _, _, _, scale = inputs
    head_dim = q.shape[-1]
    cu, max_seqlen, to_varlen, from_varlen, mask = _varlen_layout(inputs)
    if mask is not None:  # padded rows: no upstream gradient, a finite lse
        dout = torch.where(mask[:, :, None, None], dout, 0.0)
        lse = torch.where(mask[:, :, None], lse, 0.0)
    tensors = [_head_pad(to_varlen(t)) for t in (dout, q, k, v, out)]
    dq, dk, dv = varlen_bwd(*tensors, to_varlen(lse).float().contiguous(), cu, max_seqlen, scale, window)
    grads = [from_varlen(g[..., :head_dim]) for g in (dq, dk, dv)]
    if mask is not None:  # padded keys (and the meaningless padded rows) get zero gradients
        grads = [torch.where(mask[:, :, None, None], g, 0.0) for g in grads]
    return tuple(g.contiguous() for g in grads)


# --------------------------------------------------------------------------- sdpa route
def _to_padded(tensors, inputs: AttentionInputs, zero_padding: int):
    """The tensors as (B, S, H, D) with the head dim padded, the (B, S) key mask, and the packed coords."""
    _, _, _, mask, cu_seqlens, max_seqlen, _ = inputs
    coords = None
    if cu_seqlens is not None:
        coords = padding.packed_coords(cu_seqlens, tensors[0].shape[0])
        stacked, mask = padding.pad(torch.stack(tensors, dim=1), cu_seqlens, max_seqlen, coords)
        tensors = list(stacked.unbind(2))
    elif mask is not None:  # 0 * NaN is NaN: padded keys and values must hold zeros
        tensors = [torch.where(mask[:, :, None, None], t, 0) if i < zero_padding else t
                   for i, t in enumerate(tensors)]
    return [_head_pad(t).contiguous() for t in tensors], mask, coords


def _from_padded(t: Tensor, inputs: AttentionInputs, coords, head_dim: Optional[int]) -> Tensor:
    if head_dim is not None:
        t = t[..., :head_dim]
    if coords is not None:
        t = padding.unpad(t, inputs.cu_seqlens, coords[0].shape[0], coords)
    return t.contiguous()


def _bias(mask: Optional[Tensor], dtype: torch.dtype, heads: int) -> Optional[Tensor]:
    """(B, H, S, S) additive key-padding bias as an expanded view of a (B, 1, 1, S) row whose storage
    is padded to 8 elements (the alignment the memory-efficient kernel wants); None without a mask."""
    if mask is None:
        return None
    batch, seqlen = mask.shape
    storage = torch.zeros(batch, 1, 1, -(-seqlen // 8) * 8, dtype=dtype, device=mask.device)
    row = storage[..., :seqlen]
    row.masked_fill_(~mask[:, None, None, :], torch.finfo(dtype).min)  # finite: no NaN on an all-padding row
    return row.expand(batch, heads, seqlen, seqlen)


def _has_key(mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if mask is None else mask.any(dim=1)  # (B,)


def sdpa_forward(inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
    q, scale, head_dim = inputs.q, inputs.scale, inputs.q.shape[-1]
    (kp, vp, qp), mask, coords = _to_padded([inputs.k, inputs.v, q], inputs, zero_padding=2)
    bias = _bias(mask, q.dtype, q.shape[-2])
    out, lse = efficient_fwd(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), bias, scale)
    out, lse = out.transpose(1, 2), lse.transpose(1, 2).float()  # (B, S, H, Dp), (B, S, H)
    has_key = _has_key(mask)
    if has_key is not None:
        out = torch.where(has_key[:, None, None, None], out, 0.0)
        lse = torch.where(has_key[:, None, None], lse, float("-inf"))
    return _from_padded(out, inputs, coords, head_dim), _from_padded(lse, inputs, coords, None)


def sdpa_backward(inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, scale, head_dim = inputs.q, inputs.scale, inputs.q.shape[-1]
    (kp, vp, qp, outp, doutp), mask, coords = _to_padded([inputs.k, inputs.v, q, out, dout], inputs, zero_padding=2)
    if coords is not None:
        lse, _ = padding.pad(lse, inputs.cu_seqlens, inputs.max_seqlen, coords)
    has_key = _has_key(mask)
    if has_key is not None:  # rows without keys: no upstream gradient and a finite lse give zeros
        doutp = torch.where(has_key[:, None, None, None], doutp, 0.0)
        lse = torch.where(has_key[:, None, None], lse, 0.0)
    bias = _bias(mask, q.dtype, q.shape[-2])
    dq, dk, dv = efficient_bwd(doutp.transpose(1, 2), qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), bias,
                               outp.transpose(1, 2), lse.transpose(1, 2).float().contiguous(), scale)
    grads = [g.transpose(1, 2) for g in (dq, dk, dv)]
    if mask is not None:  # padded keys get exactly zero
        grads = [grads[0]] + [torch.where(mask[:, :, None, None], g, 0.0) for g in grads[1:]]
    return tuple(_from_padded(g, inputs, coords, head_dim) for g in grads)


# --------------------------------------------------------------------------- backend entry points
def forward(inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
    """Returns (out shaped like q, lse shaped q.shape[:-1] fp32), contiguous."""
    name, why = route(inputs)
    if name is None:
        raise RuntimeError(why)
    out, lse = (varlen_forward if name == "varlen" else sdpa_forward)(inputs)
    return out.to(inputs.q.dtype), lse.to(checks.accum_dtype(inputs.q.dtype))


def backward(inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) shaped like q, contiguous."""
    name, why = route(inputs)
    if name is None:
        raise RuntimeError(why)
    grads = (varlen_backward if name == "varlen" else sdpa_backward)(inputs, out, lse, dout)
    return tuple(g.to(inputs.q.dtype) for g in grads)
