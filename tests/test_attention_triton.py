"""The Triton attention kernels (kernels/attention.py) beyond the shared backend tests.

Interpreter tier: small fp32/fp16 shapes on the CPU under TRITON_INTERPRET=1 (or on a
GPU). GPU tier: bf16, BERT shapes, long sequences.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlm.ops import BackendUnavailable, attention, attention_reference
from fastmlm.ops.kernels_path import import_module
from helpers import assert_error_ratio, cu_seqlens_of

interpreter = pytest.mark.interpreter
gpu = pytest.mark.gpu


def _random_key_mask(batch, seqlen, generator=None):
    """(B, S) bool: row 0 all real, row 1 right-padded, the rest arbitrary (holes anywhere)."""
    mask = torch.rand(batch, seqlen, generator=generator) > 0.4
    mask[0] = True
    if batch > 1:
        mask[1] = torch.arange(seqlen) < max(1, seqlen // 2)
    return mask


def _check_against_reference(inputs, dtype, device, ratio_floor, **layout):
    """Error-ratio rule for out, lse, dq, dk, dv against fp64 and the same-dtype reference.

    The fp32 floor is ``ratio_floor``; fp16/bf16 get 1e-6, a thousandth of their resolution
    near 1, for degenerate rows where the reference's error is exactly 0 (seqlen 1: dq is 0
    and the reference cancels exactly, the kernel's fp32 delta leaves ~1e-7)."""
    inputs = [t.to(device) for t in inputs]
    exact_in = [t.double().requires_grad_() for t in inputs]
    low_in = [t.to(dtype).requires_grad_() for t in inputs]
    fast_in = [t.to(dtype).requires_grad_() for t in inputs]
    layout = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in layout.items()}
    ref_layout = {k: v for k, v in layout.items() if k != "max_seqlen"}

    exact, exact_lse = attention_reference(*exact_in, **ref_layout)
    lowp, _ = attention_reference(*low_in, **ref_layout, upcast=False)
    fast, fast_lse = attention(*fast_in, **layout, return_lse=True, backend="triton")
    assert fast.dtype == dtype and fast_lse.dtype == torch.float32
    floor = ratio_floor if dtype == torch.float32 else 1e-6
    assert_error_ratio(fast, exact, lowp, 2.0, floor)
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isneginf(fast_lse), ~finite), "lse = -inf exactly for rows without keys"
    assert_error_ratio(fast_lse[finite], exact_lse[finite], exact_lse[finite], 1.0, 1e-3, "lse")

    dout = torch.randn(exact.shape, dtype=torch.float64).to(device)
    fast_grads = torch.autograd.grad(fast, fast_in, dout.to(dtype))
    exact_grads = torch.autograd.grad(exact, exact_in, dout)
    low_grads = torch.autograd.grad(lowp, low_in, dout.to(dtype))
    for name, f, e, l in zip("qkv", fast_grads, exact_grads, low_grads):
        assert_error_ratio(f, e, l, 3.0, floor, f"d{name}")


# --------------------------------------------------------------------------- interpreter tier
@interpreter
@pytest.mark.parametrize(
    "dtype,seqlen,head_dim",
    [
        (torch.float16, 1, 32),
        (torch.float16, 17, 64),
        (torch.float32, 17, 128),
        (torch.float16, 113, 32),
        (torch.float16, 33, 72),  # odd multiple of 8: padded to 128 lanes with masked loads
    ],
)
def test_padded_arbitrary_key_mask(device, dtype, seqlen, head_dim):
    batch, heads = 3, 2
    inputs = [torch.randn(batch, seqlen, heads, head_dim) for _ in range(3)]
    _check_against_reference(inputs, dtype, device, 1e-5, attention_mask=_random_key_mask(batch, seqlen))


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_without_mask(device, dtype):
    inputs = [torch.randn(2, 45, 2, 32) for _ in range(3)]
    _check_against_reference(inputs, dtype, device, 1e-5)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_with_zero_length_sequences(device, dtype):
    lengths = [0, 17, 1, 0, 40, 0]
    inputs = [torch.randn(sum(lengths), 2, 32) for _ in range(3)]
    _check_against_reference(inputs, dtype, device, 1e-5, cu_seqlens=cu_seqlens_of(lengths), max_seqlen=40)


@interpreter
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_strided_inputs_from_a_fused_qkv_projection(device, layout):
    """q, k, v sliced from one (..., 3, H, D) tensor are read in place (token stride 3*H*D)."""
    shape = (2, 21, 3, 2, 16) if layout == "padded" else (30, 3, 2, 16)
    qkv = torch.randn(shape, device=device, requires_grad=True)
    q, k, v = qkv.unbind(-3)
    assert not q.is_contiguous()
    kwargs = (dict(attention_mask=_random_key_mask(2, 21).to(device)) if layout == "padded" else
              dict(cu_seqlens=cu_seqlens_of([9, 0, 21]).to(device), max_seqlen=21))
    out = attention(q, k, v, **kwargs, backend="triton")
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    ref = attention(*(t.contiguous() for t in (q, k, v)), **kwargs, backend="reference")
    (ref_grad,) = torch.autograd.grad(ref, qkv, dout)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=2e-5, rtol=1e-4)


@interpreter
def test_backward_is_deterministic(device):
    lengths = [37, 5, 64]
    q, k, v = (torch.randn(sum(lengths), 2, 32, device=device, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    cu = cu_seqlens_of(lengths).to(device)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = attention(q, k, v, cu_seqlens=cu, max_seqlen=64, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@interpreter
def test_every_output_element_is_written(device, monkeypatch):
    """Poison the kernels' output buffers: an element a kernel forgets stays NaN."""
    real_empty_like, real_empty = torch.empty_like, torch.empty
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: real_empty_like(*a, **kw).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    mask = torch.ones(3, 21, dtype=torch.bool, device=device)
    mask[1, 9:] = False
    mask[2] = False  # an all-padding sequence: zeros, lse = -inf, zero gradients
    q, k, v = (torch.randn(3, 21, 2, 16, device=device, requires_grad=True) for _ in range(3))
    out, lse = attention(q, k, v, attention_mask=mask, return_lse=True, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()
    assert all(not g.isnan().any() for g in grads)
    assert (grads[1][1, 9:] == 0).all() and (grads[2][1, 9:] == 0).all(), "padding keys get zero dk, dv"
    assert all((g[2] == 0).all() for g in grads)


@interpreter
def test_softmax_scale_and_large_logits(device):
    """A large scale makes every row's softmax nearly one-hot: no overflow, matches the reference."""
    q, k, v = (torch.randn(1, 19, 1, 16) for _ in range(3))
    ref = attention_reference(q.double(), k.double(), v.double(), softmax_scale=30.0)[0]
    out = attention(q.to(device), k.to(device), v.to(device), softmax_scale=30.0, backend="triton").cpu()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [12, 136, 256])
def test_unsupported_head_dim_is_a_clear_error(head_dim, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so the CPU itself is not the reason given
    q = torch.randn(1, 4, 1, head_dim, device="cpu")
    with pytest.raises(BackendUnavailable, match=f"head_dim {head_dim} is not supported: use a multiple of 8"):
        attention(q, q, q, backend="triton")


def test_bf16_under_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="bf16 is not supported under the Triton interpreter"):
        attention(q, q, q, backend="triton")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        attention(q, q, q, backend="triton")


@interpreter
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_opcheck_triton_backend(device, layout):
    if layout == "padded":
        q, k, v = (torch.randn(2, 5, 2, 16, device=device, requires_grad=True) for _ in range(3))
        mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool, device=device)
        args = (q, k, v, mask, None, 5, 0.35, "triton")
    else:
        q, k, v = (torch.randn(6, 2, 16, device=device, requires_grad=True) for _ in range(3))
        args = (q, k, v, None, cu_seqlens_of([4, 0, 2]).to(device), 4, 0.35, "triton")
    torch.library.opcheck(torch.ops.fastmlm.attention_fwd.default, args)


@pytest.mark.parametrize("name", ["fwd", "dkdv", "dq"])
def test_autotune_keeps_the_tiles_listed_for_the_head_dim(name):
    flash = import_module("fastmlm_kernels.attention")
    tiles = flash._DENSE_TILES[name]
    configs = [flash._cfg(*t) for t in dict.fromkeys(tiles["small"] + tiles["large"])]
    for head_dim, cls in ((32, "small"), (64, "small"), (72, "large"), (128, "large")):
        kept = flash._prune_for_head_dim(configs, {}, name=name, first_only=False, HEAD_DIM=head_dim)
        assert [flash._as_tuple(c) for c in kept] == [t for t in dict.fromkeys(tiles["small"] + tiles["large"])
                                                      if t in tiles[cls]]
        first = flash._prune_for_head_dim(configs, {}, name=name, first_only=True, HEAD_DIM=head_dim)
        assert [flash._as_tuple(c) for c in first] == tiles[cls][:1]


@interpreter
def test_kernels_compile_for_sm90():
    """The interpreter runs code the GPU compiler may reject: compile the dense and block-sparse
    forward, dK/dV and dQ kernels for an H100, on any machine (in a subprocess, since
    TRITON_INTERPRET=1 replaces @triton.jit), and check their shared memory fits."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from fastmlm.ops.kernels_path import import_module; import_module('fastmlm_kernels._flash_compile').main()"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" ok") == 6, done.stdout  # (fwd, dkdv, dq) x (dense, sparse)


# --------------------------------------------------------------------------- strided views, NaN, padding
# Helpers shared with the cuda backend's tests (test_cuda_kernels.py) and block-sparse attention:
# ``run(q, k, v, **batch) -> out`` is one backend of an attention op.
def noncontiguous(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-contiguous view holding t's values: "every_other" (last-dim stride 2) or
    "transposed" (tokens and heads swapped in memory)."""
    if kind == "every_other":
        wide = t.new_zeros(t.shape[:-1] + (2 * t.shape[-1],))
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.transpose(-3, -2).contiguous().transpose(-3, -2)


def assert_strided_views_match(run, layout, kind, dtype, device):
    """q, k, v as non-contiguous views (with attention_mask / cu_seqlens views too) give the
    outputs and gradients of contiguous copies (to rounding: on a GPU the kernels may be
    specialised differently for other strides; a stride bug is off by O(1))."""
    if layout == "padded":  # views are made on the device: moving one there would copy it
        shape, mask = (2, 37, 2, 16), _random_key_mask(2, 37).to(device)
        batches = [dict(attention_mask=mask), dict(attention_mask=mask.t().contiguous().t())]
    else:
        shape, cu = (37, 2, 16), cu_seqlens_of([9, 0, 28]).to(device)
        batches = [dict(cu_seqlens=cu, max_seqlen=28), dict(cu_seqlens=torch.stack([cu, cu], 1)[:, 0], max_seqlen=28)]
    inputs = [torch.randn(shape, dtype=dtype).to(device) for _ in range(3)]
    views = [noncontiguous(t, kind) for t in inputs]
    bounds = batches[1]["attention_mask" if layout == "padded" else "cu_seqlens"]
    assert not any(t.is_contiguous() for t in views + [bounds])
    dout = torch.randn(shape, dtype=dtype).to(device)
    results = []
    for tensors, batch in ((inputs, batches[0]), (views, batches[1])):
        tensors = [t.detach().requires_grad_() for t in tensors]
        out = run(*tensors, **batch)
        results.append((out, *torch.autograd.grad(out, tensors, dout)))
    for name, contiguous, strided in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(strided, contiguous, msg=lambda m: f"{name}, {kind} views: {m}")


def assert_padding_never_contributes(run, layout, dtype, device):
    """Outputs and gradients are the same, bit for bit, whether padding holds zeros or NaN, and
    no NaN reaches a row that does not see one.

    padded: NaN under the padding keys and values of a sequence with 70 padding keys first
    (whole key tiles: its rows also check that a row which has seen no real key yet rescales by
    0, not by 2^(-inf + inf) = NaN), then holes, then right padding; and of a right-padded one.
    packed: the middle sequence is all NaN: its own rows are NaN (NaN in, NaN out); the
    sequence before it shares key tiles with it and must not notice."""
    if layout == "padded":
        mask = torch.ones(2, 100, dtype=torch.bool)
        mask[0, :70] = False
        mask[0, 80::3] = False
        mask[0, 95:] = False
        mask[1, 45:] = False
        shape, batch, poison = (2, 100, 1, 16), dict(attention_mask=mask.to(device)), ~mask
        clean_rows = torch.ones_like(mask)  # padded query rows too: they attend to the real keys only
    else:
        poison = torch.zeros(100, dtype=torch.bool)
        poison[20:65] = True
        batch = dict(cu_seqlens=cu_seqlens_of([20, 45, 35]).to(device), max_seqlen=45)
        shape, clean_rows = (100, 1, 16), ~poison
    inputs = [torch.randn(shape, dtype=dtype) for _ in range(3)]
    dout = torch.randn(shape, dtype=dtype).to(device)

    def run_with(fill):
        tensors = [t.clone() for t in inputs]
        for t in tensors[1:] if layout == "padded" else tensors:  # padded: keys and values only
            t[poison] = fill
        tensors = [t.to(device).requires_grad_() for t in tensors]
        out = run(*tensors, **batch)
        return [t.cpu() for t in (out, *torch.autograd.grad(out, tensors, dout))]

    poisoned, zeros = run_with(float("nan")), run_with(0.0)
    for name, p, z in zip(("out", "dq", "dk", "dv"), poisoned, zeros):
        assert not p[clean_rows].isnan().any(), f"{name}: NaN at padding reached other rows"
        assert torch.equal(p[clean_rows], z[clean_rows]), f"{name}: the content of padding changed the result"
    if layout == "packed":
        assert poisoned[0][poison].isnan().all(), "NaN in, NaN out"


def assert_nan_in_gives_nan_out(run, dtype, device, all_minus_inf_row=True):
    """Sequence 0: a NaN query (its row NaN) and, unless told otherwise, a query whose every
    score is -inf (an infinite input: NaN, not the zeros of a row without keys). Sequence 1: a
    NaN key (every row NaN). Sequence 2: clean, finite outputs and gradients. lse follows out."""
    q, k, v = (torch.randn(3, 20, 1, 16, dtype=dtype) for _ in range(3))
    q[0, 3, 0, 5] = float("nan")
    nan_rows = torch.zeros(3, 20, dtype=torch.bool)
    nan_rows[0, 3] = nan_rows[1] = True
    if all_minus_inf_row:
        k[0, :, 0, 0] = k[0, :, 0, 0].abs() + 0.5
        q[0, 7, 0] = 0.0
        q[0, 7, 0, 0] = float("-inf")  # q . k = -inf for every key
        nan_rows[0, 7] = True
    k[1, 11, 0, 2] = float("nan")
    tensors = [t.to(device).requires_grad_() for t in (q, k, v)]
    out, lse = run(*tensors, return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    assert out[nan_rows].isnan().all() and lse[nan_rows].isnan().all(), "NaN in must give NaN out"
    assert torch.isfinite(out[~nan_rows]).all() and torch.isfinite(lse[~nan_rows]).all()
    grads = [g.cpu() for g in torch.autograd.grad(out, tensors, torch.randn_like(out).to(device))]
    assert all(torch.isfinite(g[2]).all() for g in grads), "a clean sequence keeps finite gradients"
    assert grads[0][0, 3].isnan().all() and grads[1][1].isnan().any()


@interpreter
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind", ["every_other", "transposed"])
def test_strided_views(device, layout, kind):
    """Last-dim stride 2 and transposed q/k/v, a transposed mask, a strided cu_seqlens (which the
    kernels once read as if contiguous, far out of bounds)."""
    run = lambda q, k, v, **batch: attention(q, k, v, **batch, backend="triton")
    assert_strided_views_match(run, layout, kind, torch.float32, device)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN inputs
@interpreter
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padding_never_contributes(device, layout, dtype):
    run = lambda q, k, v, **batch: attention(q, k, v, **batch, backend="triton")
    assert_padding_never_contributes(run, layout, dtype, device)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_left_padding_longer_than_a_key_tile(device, dtype):
    """70 padding keys then 30 real ones: whole key tiles of padding come first (issue 23)."""
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[1, :70] = False
    inputs = [torch.randn(2, 100, 1, 16) for _ in range(3)]
    _check_against_reference(inputs, dtype, device, 1e-5, attention_mask=mask)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN inputs
@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_in_gives_nan_out(device, dtype):
    run = lambda q, k, v, **kw: attention(q, k, v, **kw, backend="triton")
    assert_nan_in_gives_nan_out(run, dtype, device)


# --------------------------------------------------------------------------- GPU tier
@gpu
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
                                            (torch.float16, 64), (torch.float32, 64)])
def test_gpu_bert_shapes(dtype, head_dim):
    """BERT-base-like batch (8 x 512, 12 heads) with right padding, every supported tuned head dim."""
    batch, seqlen = 8, 512
    inputs = [torch.randn(batch, seqlen, 12, head_dim) for _ in range(3)]
    lengths = torch.randint(1, seqlen + 1, (batch,))
    lengths[0] = seqlen
    mask = torch.arange(seqlen)[None] < lengths[:, None]
    _check_against_reference(inputs, dtype, "cuda", 1e-5, attention_mask=mask)


@gpu
@pytest.mark.parametrize("seqlen", [1023, 4096])
def test_gpu_long_sequences(seqlen):
    inputs = [torch.randn(1, seqlen, 2, 64) for _ in range(3)]
    _check_against_reference(inputs, torch.bfloat16, "cuda", 1e-5, attention_mask=_random_key_mask(1, seqlen))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_packed(dtype):
    lengths = [0, 1023, 17, 512, 0, 113]
    inputs = [torch.randn(sum(lengths), 4, 64) for _ in range(3)]
    _check_against_reference(inputs, dtype, "cuda", 1e-5, cu_seqlens=cu_seqlens_of(lengths), max_seqlen=1023)


@gpu
def test_gpu_backward_is_deterministic():
    q, k, v = (torch.randn(4, 1024, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = torch.arange(1024, device="cuda")[None] < torch.tensor([[1024], [700], [1], [513]], device="cuda")
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = attention(q, k, v, attention_mask=mask, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
