"""fastmlm.ops.attention: reference vs independent math, layouts, backends, bad inputs."""
import math

import pytest
import torch

from backend_params import params, running
from fastmlm.ops import BackendUnavailable, attention, attention_reference
from helpers import (STRIDED_KINDS, assert_backend_matches, assert_error_ratio, cu_seqlens_of, random_mask,
                     strided_view)

# Backends checked against the reference (see backend_params.py): torch-cuda-emulated is the torch
# backend's GPU paths with the kernels replaced by reference math, torch-cuda the real thing.
FAST_BACKENDS = params("torch", "torch-cuda-emulated", "triton", "cuda", "torch-cuda")


def plain_dtype(backend):
    """A dtype every backend takes for the fp32-style tests: the cuda kernels are fp16/bf16 only."""
    return torch.float16 if backend == "cuda" else torch.float32


def naive_attention(q, k, v, mask, scale):
    """Row by row, in Python floats: an oracle that shares no code with the library."""
    b_, s_, h_, d_ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(b_):
        keys = [j for j in range(s_) if mask is None or mask[b, j]]
        for h in range(h_):
            for i in range(s_):
                if not keys:
                    continue
                scores = [float(q[b, i, h].double() @ k[b, j, h].double()) * scale for j in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, j in zip(weights, keys):
                    out[b, i, h] += (w / total) * v[b, j, h].double()
    return out


@pytest.mark.parametrize("seqlen", [1, 5])
def test_reference_matches_naive_math(seqlen):
    q, k, v = (torch.randn(2, seqlen, 2, 8) for _ in range(3))
    mask = random_mask(2, seqlen, min_len=0)
    out = attention(q, k, v, attention_mask=mask, backend="reference")
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, mask, 8**-0.5), atol=1e-5, rtol=1e-5)


def test_reference_lse_matches_logsumexp():
    q, k, v = (torch.randn(1, 7, 3, 16, dtype=torch.float64) for _ in range(3))
    _, lse = attention(q, k, v, softmax_scale=0.3, return_lse=True, backend="reference")
    expected = torch.logsumexp(torch.einsum("bqhd,bkhd->bqhk", q, k) * 0.3, dim=-1)
    torch.testing.assert_close(lse, expected)


def test_packed_equals_padded():
    lengths = [5, 1, 0, 9]
    q, k, v = (torch.randn(sum(lengths), 3, 16, dtype=torch.float64) for _ in range(3))
    cu = cu_seqlens_of(lengths)
    packed, packed_lse = attention(q, k, v, cu_seqlens=cu, max_seqlen=9, return_lse=True, backend="reference")
    for i, n in enumerate(lengths):
        a, b = cu[i].item(), cu[i + 1].item()
        pad = torch.zeros(1, 9, 3, 16, dtype=torch.float64)
        qp, kp, vp = (pad.clone().index_copy_(1, torch.arange(n), t[None, a:b]) for t in (q, k, v))
        mask = torch.arange(9)[None] < n
        out, lse = attention(qp, kp, vp, attention_mask=mask, return_lse=True, backend="reference")
        torch.testing.assert_close(packed[a:b], out[0, :n])
        torch.testing.assert_close(packed_lse[a:b], lse[0, :n])


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen,head_dim", [(1, 32), (17, 64), (113, 40)])
def test_padded_backend_error_ratio(backend, dtype, seqlen, head_dim):
    from fastmlm.ops.torch_impl.attention_cuda import prefer

    # The torch backend's CUDA path has two routes for padded batches (unpad -> varlen -> repad, and SDPA).
    routes = ("varlen", "sdpa") if backend in ("torch-cuda", "torch-cuda-emulated") else (None,)
    for route in routes:
        with running(backend) as (name, device), prefer(route):
            _padded_error_ratio(name, device, dtype, seqlen, head_dim)


def _padded_error_ratio(backend, device, dtype, seqlen, head_dim):
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter's bf16 dot is wrong; bf16 runs on the GPU tier")
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the cuda attention kernels are fp16/bf16 only (tensor cores)")
    batch, heads = 3, 2
    exact_in = [torch.randn(batch, seqlen, heads, head_dim, dtype=torch.float64, device=device, requires_grad=True)
                for _ in range(3)]
    low_in = [t.detach().to(dtype).requires_grad_() for t in exact_in]
    mask = random_mask(batch, seqlen, min_len=1).to(device)
    dout = torch.randn(batch, seqlen, heads, head_dim, dtype=torch.float64, device=device)

    exact, exact_lse = attention_reference(*exact_in, attention_mask=mask)
    lowp, _ = attention_reference(*low_in, attention_mask=mask, upcast=False)
    fast, fast_lse = attention(*low_in, attention_mask=mask, return_lse=True, backend=backend)
    floor = 1e-5 if dtype == torch.float32 else 0.0
    valid = mask[:, :, None, None].expand_as(exact)  # padded query rows are unspecified
    assert_error_ratio(fast[valid], exact[valid], lowp[valid], 2.0, floor)
    assert_error_ratio(fast_lse[valid[..., 0]], exact_lse[valid[..., 0]], exact_lse[valid[..., 0]], 1.0,
                       1e-4 if dtype == torch.float32 else 0.05, "lse")
    dout = dout * valid
    for name, f, e, l in zip("qkv", _grads(fast, low_in, dout.to(dtype)), _grads(exact, exact_in, dout),
                             _grads(lowp, low_in, dout.to(dtype))):
        assert_error_ratio(f, e, l, 3.0, floor, f"d{name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["plain", "fp16"])
def test_packed_backend_matches_reference(backend, dtype):
    with running(backend) as (backend, device):
        _packed_matches_reference(backend, device, dtype or plain_dtype(backend))


def _packed_matches_reference(backend, device, dtype):
    if dtype == torch.float16 and device == "cpu" and backend == "torch":
        pytest.skip("fp16 on the CPU path is not a target (ATen's CPU flash kernel upcasts)")
    lengths = [17, 0, 1, 33]
    exact_in = [torch.randn(sum(lengths), 2, 32, dtype=torch.float64, device=device, requires_grad=True)
                for _ in range(3)]
    low_in = [t.detach().to(dtype).requires_grad_() for t in exact_in]
    cu = cu_seqlens_of(lengths).to(device)
    exact, exact_lse = attention_reference(*exact_in, cu_seqlens=cu)
    lowp, _ = attention_reference(*low_in, cu_seqlens=cu, upcast=False)
    out, lse = attention(*low_in, cu_seqlens=cu, max_seqlen=33, return_lse=True, backend=backend)
    floor = 1e-5 if dtype == torch.float32 else 0.0
    assert_error_ratio(out, exact, lowp, 2.0, floor)
    assert_error_ratio(lse, exact_lse, exact_lse, 1.0, 1e-4 if dtype == torch.float32 else 0.05, "lse")
    dout = torch.randn_like(exact)
    for f, e, l in zip(_grads(out, low_in, dout.to(dtype)), _grads(exact, exact_in, dout),
                       _grads(lowp, low_in, dout.to(dtype))):
        assert_error_ratio(f, e, l, 3.0, floor, "grad")


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_all_padding_row_outputs_zeros_and_zero_grads(backend):
    with running(backend) as (name, device):
        _all_padding_row(name, device, plain_dtype(backend))


def _all_padding_row(backend, device, dtype):
    q, k, v = (torch.randn(2, 6, 2, 16, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[1] = False
    out, lse = attention(q, k, v, attention_mask=mask, return_lse=True, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() and (g[1] == 0).all() for g in grads)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_empty_batch(backend):
    with running(backend) as (name, device):
        _empty_batch(name, device, plain_dtype(backend))


def _empty_batch(backend, device, dtype):
    q = torch.randn(0, 4, 2, 8, device=device, dtype=dtype)
    assert attention(q, q, q, backend=backend).shape == q.shape
    packed = torch.randn(0, 2, 8, device=device, dtype=dtype)
    out = attention(packed, packed, packed, cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device), max_seqlen=0,
                    backend=backend)
    assert out.shape == packed.shape


def test_softmax_scale_is_used():
    q, k, v = (torch.randn(1, 4, 1, 8) for _ in range(3))
    a = attention(q, k, v, softmax_scale=0.1, backend="reference")
    b = attention(q * 0.1 / 8**-0.5, k, v, backend="reference")
    torch.testing.assert_close(a, b)


def _call(q=None, k=None, v=None, **kwargs):
    q = torch.randn(1, 4, 2, 8) if q is None else q
    return attention(q, q.clone() if k is None else k, q.clone() if v is None else v, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.randn(2, 3, 4)), "packed .* need cu_seqlens"),
        (dict(q=torch.randn(2, 3)), "dimensions"),
        (dict(q=torch.randint(0, 3, (1, 4, 2, 8))), "dtype"),
        (dict(k=torch.randn(1, 4, 2, 8, dtype=torch.float64)), "dtype"),
        (dict(k=torch.randn(1, 5, 2, 8)), "shape"),
        (dict(attention_mask=torch.ones(1, 5, dtype=torch.bool)), "attention_mask shape"),
        (dict(attention_mask=torch.zeros(1, 4)), "not a float"),
        (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)), "cu_seqlens is for the packed"),
        (dict(softmax_scale=-1.0), "softmax_scale"),
        (dict(backend="fast"), "backend must be"),
        (dict(q=torch.randn(1, 4, 2, 8).to_sparse()), r"q must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
        (dict(attention_mask=torch.ones(1, 4, dtype=torch.bool).to_sparse()), "attention_mask must be a dense"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_inputs_have_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_bad_cu_seqlens_is_caught():
    q = torch.randn(5, 2, 8)
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), max_seqlen=3)


def test_explicit_backend_that_cannot_run_lists_reasons():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(BackendUnavailable, match="cuda: "):
        attention(q, q, q, backend="cuda")
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run these inputs"):
        attention(q, q, q, backend="cuda")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_opcheck_torch_backend(layout):
    if layout == "padded":
        q, k, v = (torch.randn(2, 5, 2, 8, requires_grad=True) for _ in range(3))
        args = (q, k, v, random_mask(2, 5, 1), None, 5, 0.35, "torch")
    else:
        q, k, v = (torch.randn(6, 2, 8, requires_grad=True) for _ in range(3))
        args = (q, k, v, None, cu_seqlens_of([4, 2]), 4, 0.35, "torch")
    torch.library.opcheck(torch.ops.fastmlm.attention_fwd.default, args)


@pytest.mark.parametrize("kind", ["first_two_dims_swapped", "last_two_dims_swapped"])
def test_opcheck_torch_backend_strided(kind):
    """The fake kernels promise contiguous outputs and gradients, as the backends return, for any input strides."""
    q, k, v = (strided_view(torch.randn(2, 5, 2, 8), kind).detach().requires_grad_() for _ in range(3))
    args = (q, k, v, random_mask(2, 5, 1), None, 5, 0.35, "torch")
    torch.library.opcheck(torch.ops.fastmlm.attention_fwd.default, args)


def test_torch_backend_fp64_gradients():
    q, k, v = (torch.randn(7, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = cu_seqlens_of([4, 3])
    dout = torch.randn(7, 2, 8, dtype=torch.float64)
    fast = _grads(attention(q, k, v, cu_seqlens=cu, max_seqlen=4, backend="torch"), (q, k, v), dout)
    ref = _grads(attention(q, k, v, cu_seqlens=cu, max_seqlen=4, backend="reference"), (q, k, v), dout)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r)


# --------------------------------------------------------------------------- strides, NaN and padding
# The reference and the torch backend's paths (CPU, emulated CUDA, real CUDA in fp32 and fp16: the
# sdpa and varlen routes); the kernel backends have the same checks in their own test files.
CPU_BACKENDS = ["reference"] + params("torch", "torch-cuda-emulated", "torch-cuda")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def _on(device, kw):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _skip_fp16_on_cpu(param, dtype):
    if dtype == torch.float16 and param in ("reference", "torch"):
        pytest.skip("fp16 checks the torch backend's CUDA (varlen) route; the CPU paths are checked in fp32")


def _batch(layout):
    """Shape and layout arguments of a small padded or packed batch with padding or empty sequences."""
    if layout == "padded":
        return (2, 9, 2, 16), dict(attention_mask=torch.tensor([[True] * 9, [True] * 4 + [False] * 5])), 9
    return (10, 2, 16), dict(cu_seqlens=cu_seqlens_of([7, 0, 3])), 7


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind", STRIDED_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(backend, layout, kind, dtype):
    """Sliced, interleaved, fused-QKV and transposed views give the right outputs and gradients."""
    _skip_fp16_on_cpu(backend, dtype)
    with running(backend) as (backend, device):
        shape, kw, max_seqlen = _batch(layout)
        kw = _on(device, kw)
        valid = kw["attention_mask"][:, :, None, None] if layout == "padded" else None
        assert_backend_matches(
            lambda q, k, v: attention(*(strided_view(t, kind) for t in (q, k, v)), **kw, max_seqlen=max_seqlen,
                                      backend=backend),
            lambda q, k, v, upcast: attention_reference(q, k, v, **kw, upcast=upcast)[0],
            [torch.randn(shape, device=device) for _ in range(3)], valid, dtype=dtype,
            floor=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seqlen,masked", [(5, False), (5, True), (40, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_inputs_give_nan_rows(backend, seqlen, masked, dtype):
    """NaN/inf in q makes its row NaN (ATen's short-sequence kernel used to hide a NaN query);
    NaN in a real key or value reaches every row of its sequence and head."""
    _skip_fp16_on_cpu(backend, dtype)
    with running(backend) as (backend, device):
        q, k, v = (torch.randn(2, seqlen, 2, 8) for _ in range(3))
        q[0, 2, 0, 3], q[1, 1, 1, 0] = float("nan"), float("inf")
        k[0, 1, 1, 5], v[1, 0, 0, 2] = float("nan"), float("nan")
        expected = torch.zeros(2, seqlen, 2, dtype=torch.bool)
        expected[0, 2, 0] = expected[1, 1, 1] = True
        expected[0, :, 1] = expected[1, :, 0] = True
        mask = torch.ones(2, seqlen, dtype=torch.bool, device=device) if masked else None
        out = attention(*(t.to(device, dtype) for t in (q, k, v)), attention_mask=mask, backend=backend).cpu()
        assert torch.equal(~out.isfinite().all(-1), expected)
        assert out[expected].isnan().any(-1).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_under_padding_never_reaches_real_rows(backend, dtype):
    """Whatever is stored at padded keys and values (here NaN and inf) changes no real row,
    in outputs or gradients, and they get zero gradients."""
    _skip_fp16_on_cpu(backend, dtype)
    with running(backend) as (backend, device):
        mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3], device=device)
        clean = [torch.randn(2, 7, 2, 8, device=device, dtype=dtype) for _ in range(3)]
        dirty = [t.clone() for t in clean]
        dirty[1][1, 4:], dirty[2][1, 5:], dirty[2][1, 4, 0, 0] = float("nan"), float("nan"), float("inf")
        dout = torch.randn(2, 7, 2, 8, device=device, dtype=dtype) * mask[:, :, None, None]
        results = []
        for tensors in (clean, dirty):
            inputs = [t.clone().requires_grad_() for t in tensors]
            out = attention(*inputs, attention_mask=mask, backend=backend)
            results.append([out[mask], *(g for g in torch.autograd.grad(out, inputs, dout))])
        for name, c, d in zip(["out", "dq", "dk", "dv"], *results):
            assert torch.isfinite(d).all(), name
            torch.testing.assert_close(d, c, msg=name)
        assert (results[1][2][~mask] == 0).all() and (results[1][3][~mask] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_one_packed_sequence_stays_there(backend, dtype):
    """A NaN key and value of sequence 0 make its rows NaN and leave sequence 1 exactly as if run alone."""
    _skip_fp16_on_cpu(backend, dtype)
    with running(backend) as (backend, device):
        cu = cu_seqlens_of([3, 4], device)
        q, k, v = (torch.randn(7, 2, 8, device=device, dtype=dtype) for _ in range(3))
        k[1, 0, 0], v[2, 1, 0] = float("nan"), float("nan")
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, cu_seqlens=cu, max_seqlen=4, backend=backend)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, dout)
        assert out[:3].isnan().any(-1).all()
        alone = [t[3:].clone().requires_grad_() for t in (q, k, v)]
        out_alone = attention(*alone, cu_seqlens=cu_seqlens_of([4], device), max_seqlen=4, backend=backend)
        torch.testing.assert_close(out[3:], out_alone)
        for g, g_alone in zip(grads, torch.autograd.grad(out_alone, alone, dout[3:])):
            torch.testing.assert_close(g[3:], g_alone)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", ["padded", "masked", "keyless", "nan_query", "packed", "strided"])
def test_out_without_lse_is_the_out_with_it(backend, case):
    """return_lse=False lets a backend skip laying out the lse (the CPU torch backend's
    forward_out): the output and its gradients are bitwise those of the call that returns it,
    which the tests above check against the reference."""
    with running(backend) as (name, device):
        dtype = plain_dtype(backend)
        gen = torch.Generator().manual_seed(7)
        shape = (11, 2, 16) if case == "packed" else (3, 7, 2, 16)
        base = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3)]
        if case == "nan_query":
            base[0][1, 2, 0, 3] = float("nan")
        if case == "strided":
            base = [strided_view(t, "last_two_dims_swapped") for t in base]
        kwargs = {}
        if case in ("masked", "keyless"):
            mask = random_mask(3, 7, min_len=1).to(device)
            if case == "keyless":
                mask[2] = False
            kwargs["attention_mask"] = mask
        if case == "packed":
            kwargs.update(cu_seqlens=cu_seqlens_of([5, 0, 6]).to(device), max_seqlen=6)
        dout = torch.randn(shape, generator=gen).to(device, dtype)
        results = []
        for return_lse in (False, True):
            leaves = [t.detach().requires_grad_() for t in base]
            out = attention(*leaves, return_lse=return_lse, backend=name, **kwargs)
            out = out[0] if return_lse else out
            results.append((out, *torch.autograd.grad(out, leaves, dout)))
        for without, with_lse in zip(*results):
            assert torch.equal(without.nan_to_num(7.0), with_lse.nan_to_num(7.0))
            assert torch.equal(without.isnan(), with_lse.isnan())


# --------------------------------------------------------------------------- padding helpers (a new user's audit)
@pytest.mark.parametrize(
    "lengths,match",
    [
        ([3, 2], "got list"),
        (torch.tensor([3.0, 2.5]), "got torch.float32"),  # 3 + 2.5 became offsets [0, 3, 5]
        (torch.tensor([True, False]), "got torch.bool"),
        (torch.tensor([[3, 2]]), r"got torch.int64 \(1, 2\)"),  # became a (1, 3) "cu_seqlens"
        (torch.tensor([3, -1, 2]), "got min -1, total 4"),  # offsets [0, 3, 2, 4]: not increasing
        (torch.tensor([2**31, 1]), "total 2147483649"),  # wrapped to negative int32 offsets
    ],
)
def test_cu_seqlens_from_lengths_refuses_what_it_would_get_wrong(lengths, match):
    from fastmlm.ops import padding
    with pytest.raises(ValueError, match="lengths must be .*" + match):
        padding.cu_seqlens_from_lengths(lengths)
    assert padding.cu_seqlens_from_lengths(torch.tensor([3, 0, 2])[::1]).tolist() == [0, 3, 3, 5]
    assert padding.cu_seqlens_from_lengths(torch.zeros(0, dtype=torch.int64)).tolist() == [0]


def test_cu_seqlens_from_mask_refuses_float_and_left_padded_masks():
    """A float (additive) mask was summed as numbers (0/-inf gave int32 garbage, 0.5 counted 0), a 1-D mask
    failed inside torch, a left-padded mask gave offsets that unpad reads padding with, and an int mask of
    2s counted each token twice; now: a ValueError, a ValueError, a ValueError, and nonzero = one real token."""
    from fastmlm.ops import padding
    for mask in (torch.tensor([[0.0, 0.0, float("-inf")]]), torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([1, 1, 0])):
        with pytest.raises(ValueError, match=r"attention_mask must be a \(B, S\) bool or integer tensor"):
            padding.cu_seqlens_from_mask(mask)
    for mask in (torch.tensor([[0, 1, 1], [1, 1, 0]]), torch.tensor([[1, 0, 1]])):
        with pytest.raises(ValueError, match="attention_mask must be right-padded"):
            padding.cu_seqlens_from_mask(mask)
    cu, longest = padding.cu_seqlens_from_mask(torch.tensor([[2, 2, 0], [1, 0, 0]]))
    assert cu.tolist() == [0, 2, 3] and longest == 2
    cu, longest = padding.cu_seqlens_from_mask(torch.tensor([[True, False], [True, True], [False, False]]).t().t())
    assert cu.tolist() == [0, 1, 3, 3] and longest == 2
    assert padding.cu_seqlens_from_mask(torch.zeros(0, 4, dtype=torch.bool))[0].tolist() == [0]


@pytest.mark.parametrize("op", ["attention", "block_sparse_attention"])
def test_options_that_would_be_misread_are_refused(op):
    """softmax_scale=True was taken as a scale of 1.0, and a max_seqlen beside padded q was ignored (a user
    passing 3 for S=8 got attention over all 8 positions); both now fail naming the argument."""
    from fastmlm.ops import block_layout, block_sparse_attention

    q = torch.randn(2, 8, 2, 16)
    if op == "attention":
        call = lambda **kw: attention(q, q, q, **kw)  # noqa: E731
    else:
        layout = block_layout.sliding_window(8, 2, block_size=4)
        call = lambda **kw: block_sparse_attention(q, q, q, layout, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite float, got True"):
        call(softmax_scale=True)
    with pytest.raises(ValueError, match=r"max_seqlen is for the packed \(T, H, D\) layout; padded q has seqlen 8, "
                                         r"got max_seqlen=3"):
        call(max_seqlen=3)
    torch.testing.assert_close(call(max_seqlen=8), call())  # S itself is accepted, as before
