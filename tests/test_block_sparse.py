"""fastmlm.ops.block_sparse_attention and its layouts."""
import pytest
import torch

from backend_params import params, running
from fastmlm.ops import attention, block_sparse_attention, block_sparse_attention_reference
from fastmlm.ops import block_layout as L
from helpers import (STRIDED_KINDS, assert_backend_matches, assert_error_ratio, cu_seqlens_of, random_mask,
                     strided_view)

# torch-cuda(-emulated): the torch backend's GPU routes (varlen windows, FlexAttention; see backend_params.py).
FAST_BACKENDS = params("torch", "torch-cuda-emulated", "triton", "torch-cuda")
# The cuda backend's tests are in tests/test_block_sparse_cuda.py (it takes layout blocks of multiples of 64).


def dense_rule(seqlen, window=-1, num_global=0):
    i = torch.arange(seqlen)
    keep = torch.zeros(seqlen, seqlen, dtype=torch.bool)
    if window >= 0:
        keep |= (i[:, None] - i[None, :]).abs() <= window
    return keep | (i[:, None] < num_global) | (i[None, :] < num_global)


@pytest.mark.parametrize("seqlen,block", [(17, 4), (64, 16), (5, 8)])
@pytest.mark.parametrize("window,num_global", [(0, 0), (3, 0), (6, 2), (-1, 5)])
def test_window_and_global_layouts_mean_their_token_rule(seqlen, block, window, num_global):
    layout = L.global_tokens(seqlen, num_global, block)
    if window >= 0:
        layout = L.sliding_window(seqlen, window, block) | layout
    assert torch.equal(layout.to_dense()[0], dense_rule(seqlen, window, num_global))
    # Skipped tiles hold nothing and full tiles need no mask; a union may leave a
    # tile it could call full as partial (still exact, only a little slower).
    tight = L.from_dense_mask(layout.to_dense(), block).blocks
    assert torch.equal(tight == L.SKIP, layout.blocks == L.SKIP)
    assert (tight[layout.blocks == L.FULL] == L.FULL).all()
    if window < 0 or num_global == 0:
        assert torch.equal(tight, layout.blocks)


def test_kv_blocks_lists_kept_tiles_in_order():
    layout = L.random_blocks(40, 3, block_size=8, num_heads=2, seed=1)
    index, counts = layout.kv_blocks
    assert (counts == 3).all()
    for h in range(2):
        for qb in range(5):
            kept = (layout.blocks[h, qb] != L.SKIP).nonzero()[:, 0].int()
            assert torch.equal(index[h, qb, : counts[h, qb]], kept)


def test_dilated_and_random_are_block_level():
    layout = L.dilated(64, num_blocks=2, dilation=2, block_size=8)
    assert set(layout.blocks.unique().tolist()) <= {L.SKIP, L.FULL}
    assert layout.blocks[0, 4].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert 0 < layout.density < 1


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_full_density_equals_dense_attention(backend):
    with running(backend) as (backend, device):
        _full_density(backend, device)


def _full_density(backend, device):
    q, k, v = (torch.randn(2, 19, 2, 16, device=device) for _ in range(3))
    mask = random_mask(2, 19, 1).to(device)
    layout = L.from_dense_mask(torch.ones(19, 19, dtype=torch.bool), 8)
    assert layout.density == 1.0
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, attention_mask=mask, backend=backend),
                               attention(q, k, v, attention_mask=mask, backend="reference"), atol=1e-5, rtol=1e-5)


LAYOUTS = {  # name -> (heads, seqlen) -> layout
    "window+global+random": lambda h, s: L.sliding_window(s, 5, 8) | L.global_tokens(s, 1, 8) | L.random_blocks(s, 1, 8, h),
    "window": lambda h, s: L.sliding_window(s, 5, 8),  # pure: the varlen window route on CUDA (padded + mask: flex)
    "dense-mask": lambda h, s: L.from_dense_mask(torch.rand(h, s, s) < 0.4, 8),  # per-head token mask
}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", list(LAYOUTS))
def test_backend_error_ratio_per_head_layouts(backend, dtype, pattern):
    if pattern != "window+global+random" and backend not in ("torch-cuda", "torch-cuda-emulated"):
        pytest.skip("the other layouts pick other routes of the torch backend's CUDA path only")
    with running(backend) as (backend, device):
        _error_ratio_per_head(backend, device, dtype, LAYOUTS[pattern])


def _error_ratio_per_head(backend, device, dtype, make_layout):
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter's bf16 dot is wrong; bf16 runs on the GPU tier")
    heads, seqlen = 3, 37
    layout = make_layout(heads, seqlen)
    exact_in = [torch.randn(2, seqlen, heads, 32, dtype=torch.float64, device=device, requires_grad=True)
                for _ in range(3)]
    low_in = [t.detach().to(dtype).requires_grad_() for t in exact_in]
    mask = random_mask(2, seqlen, 1).to(device)
    exact = block_sparse_attention(*exact_in, layout, attention_mask=mask, backend="reference")
    lowp = reference_lowp(low_in, layout, mask)
    fast = block_sparse_attention(*low_in, layout, attention_mask=mask, backend=backend)
    valid = mask[:, :, None, None].expand_as(exact)
    floor = 1e-5 if dtype == torch.float32 else 0.0
    assert_error_ratio(fast[valid], exact[valid], lowp[valid], 2.0, floor)
    dout = torch.randn_like(exact) * valid
    for f, e, l in zip(torch.autograd.grad(fast, low_in, dout.to(dtype)), torch.autograd.grad(exact, exact_in, dout),
                       torch.autograd.grad(lowp, low_in, dout.to(dtype))):
        assert_error_ratio(f, e, l, 3.0, floor, "grad")


def reference_lowp(inputs, layout, mask):
    return block_sparse_attention_reference(*inputs, layout, attention_mask=mask, upcast=False)[0]


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_packed_layout_and_empty_rows(backend):
    with running(backend) as (backend, device):
        _packed_and_empty_rows(backend, device)


@pytest.mark.parametrize("backend", params("torch-cuda-emulated", "torch-cuda"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_packed_pure_window_error_ratio(backend, dtype):
    """Packed sequences under a pure sliding window: varlen_attn's window_size in fp16 on CUDA, flex in fp32."""
    with running(backend) as (backend, device):
        lengths, window = [40, 0, 1, 77], 9
        layout = L.sliding_window(80, window, 16)
        cu = cu_seqlens_of(lengths, device)
        exact_in = [torch.randn(sum(lengths), 2, 32, dtype=torch.float64, device=device) for _ in range(3)]
        assert_backend_matches(
            lambda q, k, v: block_sparse_attention(q, k, v, layout, cu_seqlens=cu, max_seqlen=77, backend=backend),
            lambda q, k, v, upcast: block_sparse_attention_reference(q, k, v, layout, cu_seqlens=cu, upcast=upcast)[0],
            exact_in, dtype=dtype, floor=1e-5 if dtype == torch.float32 else 0.0)


def _packed_and_empty_rows(backend, device):
    lengths = [9, 0, 20]
    q, k, v = (torch.randn(sum(lengths), 2, 16, device=device, requires_grad=True) for _ in range(3))
    # Query 3 of every sequence sees no key at all.
    token_mask = torch.ones(24, 24, dtype=torch.bool)
    token_mask[3] = False
    layout = L.from_dense_mask(token_mask, 8)
    cu = cu_seqlens_of(lengths).to(device)
    out, lse = block_sparse_attention(q, k, v, layout, cu_seqlens=cu, max_seqlen=20, return_lse=True, backend=backend)
    ref, _ = block_sparse_attention(q, k, v, layout, cu_seqlens=cu, max_seqlen=20, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out[3] == 0).all() and torch.isneginf(lse[3]).all() and (out[9 + 3] == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads) and (grads[0][3] == 0).all()


def test_layout_errors():
    q = torch.randn(1, 20, 2, 8)
    with pytest.raises(ValueError, match="covers 16 tokens"):
        block_sparse_attention(q, q, q, L.sliding_window(16, 2, 8))
    with pytest.raises(ValueError, match="3 heads"):
        block_sparse_attention(q, q, q, L.random_blocks(20, 1, 8, num_heads=3))
    with pytest.raises(ValueError, match="BlockSparseLayout"):
        block_sparse_attention(q, q, q, torch.ones(20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="same block_size"):
        L.sliding_window(20, 2, 8) | L.sliding_window(20, 2, 4)
    with pytest.raises(ValueError, match="window must be"):
        L.sliding_window(20, -2, 8)


def test_opcheck_torch_backend():
    q, k, v = (torch.randn(1, 12, 2, 8, requires_grad=True) for _ in range(3))
    layout = L.sliding_window(12, 2, 4) | L.global_tokens(12, 1, 4)
    args = (q, k, v, None, None, 12, 0.35, layout.blocks, None, 4, layout.window, layout.num_global, "torch")
    torch.library.opcheck(torch.ops.fastmlm.block_sparse_attention_fwd.default, args)


# --------------------------------------------------------------------------- strides, NaN, padding, bad layouts
CPU_BACKENDS = ["reference", "torch"]  # the Triton kernel has the same checks in test_block_sparse_triton.py
CUDA_PATHS = params("torch-cuda-emulated", "torch-cuda")  # the torch backend's CUDA routes, same checks


def _layout(seqlen):
    return L.sliding_window(seqlen, 2, 4) | L.global_tokens(seqlen, 1, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS + CUDA_PATHS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind", STRIDED_KINDS)
def test_strided_inputs(backend, layout, kind):
    """Sliced, interleaved, fused-QKV and transposed views give the right outputs and gradients."""
    if backend == "torch-cuda" and kind != "fused_slice":
        pytest.skip("one strided kind on the GPU (each FlexAttention graph compiles); the emulated path runs all")
    with running(backend) as (backend, device):
        if layout == "padded":
            shape, kw, max_seqlen = (2, 11, 2, 16), dict(attention_mask=random_mask(2, 11, 1).to(device)), 11
            valid = kw["attention_mask"][:, :, None, None]
        else:
            shape, kw, max_seqlen, valid = (13, 2, 16), dict(cu_seqlens=cu_seqlens_of([9, 0, 4], device)), 9, None
        bsl = _layout(max_seqlen)
        assert_backend_matches(
            lambda q, k, v: block_sparse_attention(*(strided_view(t, kind) for t in (q, k, v)), bsl, **kw,
                                                   max_seqlen=max_seqlen, backend=backend),
            lambda q, k, v, upcast: block_sparse_attention_reference(q, k, v, bsl, **kw, upcast=upcast)[0],
            [torch.randn(shape, device=device) for _ in range(3)], valid)


@pytest.mark.parametrize("backend", CPU_BACKENDS + CUDA_PATHS)
def test_nan_under_padding_never_reaches_real_rows(backend):
    with running(backend) as (backend, device):
        mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4], device=device)
        clean = [torch.randn(2, 10, 2, 8, device=device) for _ in range(3)]
        dirty = [t.clone() for t in clean]
        dirty[1][1, 6:], dirty[2][1, 7:] = float("nan"), float("inf")
        dout = torch.randn(2, 10, 2, 8, device=device) * mask[:, :, None, None]
        results = []
        for tensors in (clean, dirty):
            inputs = [t.clone().requires_grad_() for t in tensors]
            out = block_sparse_attention(*inputs, _layout(10), attention_mask=mask, backend=backend)
            results.append([out[mask], *torch.autograd.grad(out, inputs, dout)])
        for name, c, d in zip(["out", "dq", "dk", "dv"], *results):
            assert torch.isfinite(d).all(), name
            torch.testing.assert_close(d, c, msg=name)


@pytest.mark.parametrize("backend", params("torch", "torch-cuda-emulated", "torch-cuda"))
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_layout_longer_than_the_batch(backend, layout):
    """One layout serves shorter batches: the reference and the torch backend agree, values and gradients
    (fp64 on the CPU path; fp32, which is what the CUDA routes take, within fp32 tolerance there)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    with running(backend) as (backend, device):
        bsl = L.from_dense_mask(torch.rand(2, 24, 24) < 0.5, 4) | _layout(24)
        if layout == "padded":
            shape, kw = (2, 13, 2, 8), dict(attention_mask=random_mask(2, 13, 1).to(device))
        else:
            shape, kw = (15, 2, 8), dict(cu_seqlens=cu_seqlens_of([10, 5], device), max_seqlen=10)
        inputs = [torch.randn(shape, dtype=torch.float64, device=device) for _ in range(3)]
        dout = torch.randn(shape, dtype=torch.float64, device=device)
        results = []
        for name in ("reference", backend):
            leaves = [t.clone().to(dtype if name != "reference" else torch.float64).requires_grad_() for t in inputs]
            out = block_sparse_attention(*leaves, bsl, **kw, backend=name)
            results.append([out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))])
        for ref, fast in zip(*results):
            torch.testing.assert_close(fast.double(), ref.double(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: L.sliding_window(20, 2, block_size=0), "block_size must be an int >= 1, got 0"),
        (lambda: L.sliding_window(0, 2, 8), "seqlen must be an int >= 1, got 0"),
        (lambda: L.global_tokens(20, 1, block_size=-4), "block_size must be an int >= 1, got -4"),
        (lambda: L.global_tokens(20, -1, 8), "num_global must be an int >= 0, got -1"),
        (lambda: L.random_blocks(20, -1, 8), "blocks_per_row must be an int >= 0, got -1"),
        (lambda: L.random_blocks(20, 1, 8, num_heads=0), "num_heads must be an int >= 1, got 0"),
        (lambda: L.random_blocks(20, 1, block_size=2.5), "block_size must be an int >= 1, got 2.5"),
        (lambda: L.dilated(20, 1, 2, block_size=0), "block_size must be an int >= 1, got 0"),
        (lambda: L.dilated(20, 1, 0, 8), "dilation must be an int >= 1, got 0"),
        (lambda: L.from_dense_mask(torch.ones(8, 8, dtype=torch.bool), 0), "block_size must be an int >= 1, got 0"),
        (lambda: L.from_dense_mask(torch.ones(0, 0, dtype=torch.bool)), "non-empty bool"),
        (lambda: L.BlockSparseLayout(torch.full((1, 2, 2), 3, dtype=torch.int8), 4, 8), r"0 \(skip\).*got \[3\]"),
        (lambda: L.BlockSparseLayout(torch.tensor([[[1, -1], [0, 2]]]), 4, 8), r"got \[-1\]"),
        (lambda: L.BlockSparseLayout(torch.ones(1, 2, 2), 4, 8), "integer tensor .* got torch.float32"),
        (lambda: L.BlockSparseLayout(torch.ones(1, 2, 2, dtype=torch.bool), 4, 8), "integer tensor .* got torch.bool"),
        (lambda: L.BlockSparseLayout(torch.ones(1, 2, 2, dtype=torch.int8), 4, 8, window=-2), "window must be"),
        (lambda: L.BlockSparseLayout(torch.ones(1, 2, 2, dtype=torch.int8), 4, 8, token_mask=torch.ones(1, 8, 8)),
         "token_mask must be a bool"),
    ],
)
def test_bad_layout_arguments_have_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_a_token_mask_with_other_heads_than_q_is_refused():
    """A 3-head token mask for 2-head q: a clear error, not a broadcasting failure deep in torch."""
    q = torch.randn(1, 8, 2, 16)
    layout = L.BlockSparseLayout(torch.ones(1, 2, 2, dtype=torch.int8), 4, 8,
                                 token_mask=torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask has 3 heads; q has 2"):
        block_sparse_attention(q, q, q, layout)


def test_layout_tiles_of_any_integer_dtype_become_int8():
    layout = L.BlockSparseLayout(torch.tensor([[[1, 0], [2, 1]]]), 4, 8, window=1)
    assert layout.blocks.dtype == torch.int8
    assert torch.equal(layout.to_dense()[0, :4, :4], torch.ones(4, 4, dtype=torch.bool))


# --------------------------------------------------------------------------- the CPU route that skips tiles
# fastmlm/ops/torch_impl/block_sparse_cpu.py: query blocks grouped by kept count, ATen flash per group.
# The sparse_route fixture sends every layout that skips a tile of the batch there, so the small
# shapes below run it whatever the production thresholds (density, block size, seqlen) pick.
from fastmlm.ops.torch_impl import block_sparse as torch_bs  # noqa: E402
from fastmlm.ops.torch_impl import block_sparse_cpu  # noqa: E402
from fastmlm.testing import poisoned_allocations  # noqa: E402


@pytest.fixture
def sparse_route(monkeypatch):
    """Force the tile-skipping CPU route and count its forward and backward calls."""
    for name, value in (("DENSE_ABOVE", 1.0), ("MIN_BLOCK", 1), ("MIN_SEQLEN", 1)):
        monkeypatch.setattr(torch_bs, name, value)
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(block_sparse_cpu, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(block_sparse_cpu, name, counted)
    return calls


def _zero_row_layout(seqlen=37, block=8):
    """Uneven kept counts per query block (3, 3, 0, 1, 5): query block 2 keeps no key block, and
    query block 3 keeps only a far partial tile whose window rule keeps none of its pairs."""
    nb = -(-seqlen // block)
    states = torch.tensor([[2, 2, 0, 0, 1], [1, 2, 2, 0, 0], [0, 0, 0, 0, 0], [0, 2, 0, 0, 0], [2, 1, 1, 1, 2]])
    return L.BlockSparseLayout(states[None, :nb, :nb], block, seqlen, window=3)


def _shared_blocks_per_head_mask(seqlen=37, block=8):
    """One tile grid for all heads, a token mask per head: the route must treat it per head."""
    dense = torch.rand(3, seqlen, seqlen) < 0.3
    shared = L.from_dense_mask(dense.any(0), block).blocks
    shared[0, 1, 3] = L.SKIP
    return L.BlockSparseLayout(torch.where(shared == L.SKIP, L.SKIP, L.PARTIAL), block, seqlen, token_mask=dense)


SPARSE_CASES = {  # name -> (layout, lengths of a packed batch or None for padded (2, 37) with a random mask)
    "uneven-counts-per-head": (lambda: LAYOUTS["window+global+random"](3, 37), None),
    "zero-kept-block": (_zero_row_layout, None),
    "shared-blocks-per-head-mask": (_shared_blocks_per_head_mask, None),
    "packed-odd-lengths-longer-layout": (lambda: L.random_blocks(48, 1, 8, num_heads=3) | L.sliding_window(48, 4, 8),
                                         [13, 0, 1, 29]),
}


def _check_sparse_case(case, dtype=torch.float32, view=lambda t: t):
    """The route on SPARSE_CASES[case] against the fp64 reference: outputs and gradients by the error-ratio rule."""
    make_layout, lengths = SPARSE_CASES[case]
    layout = make_layout()
    if lengths is None:
        shape, kw, max_seqlen = (2, 37, 3, 32), dict(attention_mask=random_mask(2, 37, 1)), None
        valid = kw["attention_mask"][:, :, None, None]
    else:
        shape, kw, valid = (sum(lengths), 3, 32), dict(cu_seqlens=cu_seqlens_of(lengths)), None
        max_seqlen = max(lengths)
    with poisoned_allocations():  # an output row the route forgets to write shows as NaN
        assert_backend_matches(
            lambda q, k, v: block_sparse_attention(*(view(t) for t in (q, k, v)), layout, **kw, max_seqlen=max_seqlen,
                                                   backend="torch"),
            lambda q, k, v, upcast: block_sparse_attention_reference(q, k, v, layout, **kw, upcast=upcast)[0],
            [torch.randn(shape) for _ in range(3)], valid, dtype=dtype, floor=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("case", list(SPARSE_CASES))
@pytest.mark.parametrize("kind,dtype", [("contiguous", torch.float32), ("last_dim_stride_2", torch.float32),
                                        ("contiguous", torch.bfloat16)], ids=["fp32", "fp32-strided", "bf16"])
def test_cpu_sparse_route_error_ratio(sparse_route, case, kind, dtype):
    """Outputs and gradients of the tile-skipping route against the fp64 reference (error-ratio rule)."""
    _check_sparse_case(case, dtype, (lambda t: t) if kind == "contiguous" else (lambda t: strided_view(t, kind)))
    assert sparse_route == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_cpu_sparse_route_one_query_block_per_group(sparse_route, monkeypatch, case):
    """The smallest groups (GATHER_BYTES below one key block: each ATen call takes one query block, per
    head for per-head layouts) on every case: odd lengths, packed, per-head masks, blocks without keys;
    outputs and gradients by the error-ratio rule, dk / dv summed over many calls."""
    monkeypatch.setattr(block_sparse_cpu, "GATHER_BYTES", 1)
    _check_sparse_case(case)
    assert sparse_route == {"forward": 1, "backward": 1}


def test_cpu_sparse_route_split_groups(sparse_route, monkeypatch):
    """Query blocks of one kept count split into several ATen calls (GATHER_BYTES) give the same
    outputs and gradients, dk / dv summed across the calls."""
    layout = L.sliding_window(40, 5, 4)  # 10 blocks, 3 kept by most query blocks
    inputs = [torch.randn(2, 40, 2, 16, dtype=torch.float64) for _ in range(3)]
    block_bytes = 4 * 2 * 2 * 16 * 8  # one gathered key block: 4 tokens of (B, H, D) fp64
    results = []
    for budget in (1 << 30, 3 * block_bytes):  # one group per count; one query block per group
        monkeypatch.setattr(block_sparse_cpu, "GATHER_BYTES", budget)
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = block_sparse_attention(*leaves, layout, backend="torch")
        results.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    dense_in = block_sparse_cpu.BlockSparseInputs.from_layout(
        torch_bs.dense.AttentionInputs(*inputs, None, None, 40, 0.25), layout)
    assert len(block_sparse_cpu.schedule(dense_in, 10, 1, 3)) > len(layout.kv_blocks[1].unique())  # really split
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    ref = block_sparse_attention(*inputs, layout, backend="reference")
    torch.testing.assert_close(results[1][0], ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape,view", [((1, 9, 3, 4), None), ((3, 9, 3, 4), None), ((3, 18, 2), None),
                                        ((3, 3, 9, 4), "transpose"), ((2, 9, 6), "step"), ((2, 9, 0), None)])
def test_cpu_sparse_route_take_rows(shape, view):
    """The gather of table rows (one index_select on a flat view when the table has one) is
    ``index_select(1, rows)`` for any batch, trailing shape and layout in memory, repeated rows included."""
    table = torch.randn(shape)
    table = {None: table, "transpose": table.transpose(1, 2), "step": table[:, :, ::2]}[view]
    rows = torch.tensor([4, 0, 8, 4, 1])
    taken = block_sparse_cpu._take_rows(table, rows)
    assert torch.equal(taken, table.index_select(1, rows))


def test_cpu_sparse_route_rows_without_keys(sparse_route):
    """A query block with no kept key block, and rows of visited tiles that keep no key: zeros, lse -inf,
    zero gradients."""
    layout = _zero_row_layout()
    q, k, v = (torch.randn(1, 37, 2, 16, requires_grad=True) for _ in range(3))
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="torch")
    ref, ref_lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="reference")
    no_key = ~layout.to_dense()[0].any(-1)  # (37,)
    assert no_key[16:32].all()  # block 2 (no tile), block 3 (a visited tile that keeps nothing)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out[0, no_key] == 0).all() and torch.isneginf(lse[0, no_key]).all()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    dq = torch.autograd.grad(out, q, torch.randn_like(out))[0]
    assert (dq[0, no_key] == 0).all() and torch.isfinite(dq).all()


def test_cpu_sparse_route_nan_query(sparse_route):
    """A NaN query row is NaN where it has keys (ATen's kernel for such short, unmasked groups would
    hide it: 4 queries against 4 keys) and zeros where it has none."""
    layout = L.BlockSparseLayout(torch.tensor([[[1, 0, 0], [0, 0, 0], [0, 0, 1]]]), 4, 12)
    q, k, v = (torch.randn(1, 12, 2, 8) for _ in range(3))
    q[0, [0, 5]] = float("nan")  # row 0 keeps block 0, row 5 (block 1) keeps nothing
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="torch")
    assert out[0, 0].isnan().all() and lse[0, 0].isnan().all()
    assert (out[0, 4:8] == 0).all() and torch.isneginf(lse[0, 4:8]).all() and out[0, 1:4].isfinite().all()


def test_cpu_sparse_route_never_reads_skipped_tiles(sparse_route):
    """NaN keys in a key block that a query block skips leave that query block's rows exact: the
    route does not load the tile (the dense route would add NaN scores under its mask)."""
    layout = L.random_blocks(40, 2, 8, num_heads=1, seed=3)
    skipping = (layout.blocks[0, :, 4] == L.SKIP).nonzero()[:, 0]  # query blocks that skip key block 4
    assert skipping.numel() > 0
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    k[0, 32:40] = float("nan")
    rows = torch.cat([torch.arange(b * 8, b * 8 + 8) for b in skipping.tolist()])
    out = block_sparse_attention(q, k, v, layout, backend="torch")
    ref = block_sparse_attention(q, k, v, layout, backend="reference")
    torch.testing.assert_close(out[0, rows], ref[0, rows], atol=1e-5, rtol=1e-5)


def test_cpu_route_by_density(monkeypatch):
    """No tile skipped: dense flash attention, with no mask when every tile is FULL (so full density
    costs what dense attention does); tiles skipped: the sparse route, unless the blocks or the
    sequence are too short for it to pay (the thresholds are lowered for the small shapes here)."""
    routes = []
    monkeypatch.setattr(torch_bs.dense, "masked_forward", lambda inputs, mask: routes.append(("dense", mask)))
    monkeypatch.setattr(block_sparse_cpu, "forward", lambda inputs: routes.append(("sparse", None)))

    def route(layout, seqlen=20, **thresholds):
        for name, value in thresholds.items():
            monkeypatch.setattr(torch_bs, name, value)
        q = torch.randn(1, seqlen, 2, 8)
        torch_bs.forward(torch_bs.BlockSparseInputs.from_layout(
            torch_bs.dense.AttentionInputs(q, q, q, None, None, seqlen, 0.3), layout))
        return routes.pop()

    assert route(L.random_blocks(40, 5, 8)) == ("dense", None)  # every tile FULL (of a longer layout)
    kind, mask = route(L.sliding_window(20, 9, 8))  # no tile skipped, some partial
    assert kind == "dense" and not mask.all()
    assert route(L.random_blocks(20, 1, 8))[0] == "dense"  # skips 2/3, but 8-token blocks and 20 tokens
    assert route(L.random_blocks(20, 1, 8), MIN_BLOCK=8, MIN_SEQLEN=20) == ("sparse", None)
    assert route(L.random_blocks(20, 2, 8), MIN_BLOCK=8, MIN_SEQLEN=20)[0] == "sparse"  # density 2/3 < 0.7
    assert route(L.random_blocks(20, 2, 8), MIN_BLOCK=8, MIN_SEQLEN=20, DENSE_ABOVE=0.6)[0] == "dense"


def test_opcheck_cpu_sparse_route(sparse_route):
    q, k, v = (torch.randn(1, 12, 2, 8, requires_grad=True) for _ in range(3))
    layout = L.sliding_window(12, 1, 2)  # 6 blocks of 2, 3 kept per interior query block
    args = (q, k, v, None, None, 12, 0.35, layout.blocks, None, 2, layout.window, layout.num_global, "torch")
    torch.library.opcheck(torch.ops.fastmlm.block_sparse_attention_fwd.default, args)
    assert sparse_route["forward"] > 0


# --------------------------------------------------------------------------- the boundary on a repeated signature
def test_boundary_is_memoised_per_signature_and_layout(monkeypatch):
    """A repeated call (same tensor metadata, options and layout object) skips the metadata checks and
    the backend choice; another layout with the same tensors is checked again; the value check of
    cu_seqlens runs on every call; the memo keeps no layout alive."""
    import gc
    import sys
    import weakref

    op = sys.modules["fastmlm.ops.block_sparse"]
    plans = []
    monkeypatch.setattr(op, "_plan", lambda *a, _real=op._plan: plans.append(a[3]) or _real(*a))
    op.REGISTRY.forget_failures()  # starts from an empty memo
    layout = L.sliding_window(12, 2, 4)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    cu = cu_seqlens_of([7, 5])
    first = block_sparse_attention(q, k, v, layout, cu_seqlens=cu, max_seqlen=7)
    again = block_sparse_attention(q, k, v, layout, cu_seqlens=cu, max_seqlen=7)
    assert plans == [layout] and torch.equal(first, again)
    bad = torch.tensor([0, 8, 12], dtype=torch.int32)  # same metadata as cu, a sequence past max_seqlen
    with pytest.raises(RuntimeError, match="no sequence may exceed max_seqlen=7"):
        block_sparse_attention(q, k, v, layout, cu_seqlens=bad, max_seqlen=7)
    short = L.sliding_window(6, 2, 3)
    with pytest.raises(ValueError, match="layout covers 6 tokens but sequences are up to 7 long"):
        block_sparse_attention(q, k, v, short, cu_seqlens=cu, max_seqlen=7)
    with pytest.raises(ValueError, match="layout must be a BlockSparseLayout, got Tensor"):
        block_sparse_attention(q, k, v, layout.blocks, cu_seqlens=cu, max_seqlen=7)
    assert len(plans) == 3  # the other layout and the tensor were planned (and refused), not served from the memo
    alive = weakref.ref(layout)
    del layout, plans[:]
    gc.collect()
    assert alive() is None


def test_plain_eager_calls_skip_the_custom_op(monkeypatch):
    """Plain tensors in eager mode run the backend under the op's own autograd rule, not through the
    fastmlm:: custom ops (kept for torch.compile, modes and opcheck); the gradients are the same."""
    import sys

    op = sys.modules["fastmlm.ops.block_sparse"]
    layout = L.sliding_window(24, 3, 4)
    q, k, v = (torch.randn(2, 24, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    through_op = block_sparse_attention(q, k, v, layout, backend="torch")
    op_grads = torch.autograd.grad(through_op, (q, k, v), torch.ones_like(through_op))
    refuse = lambda *a: (_ for _ in ()).throw(AssertionError("custom op called on the plain eager path"))
    monkeypatch.setattr(op, "_bsa_fwd", refuse)
    monkeypatch.setattr(op, "_bsa_bwd", refuse)
    out = block_sparse_attention(q, k, v, layout, backend="torch")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.testing.assert_close(out, through_op, rtol=0, atol=0)
    for g, r in zip(grads, op_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(block_sparse_attention(q, k, v, layout, backend="torch"), out, rtol=0, atol=0)


def test_dense_route_mask_is_built_once_per_layout(monkeypatch):
    """The dense CPU route's token mask (short sequences) is built once per layout and length, not on
    every forward and backward; another layout sharing the tile tensor but not its block size gets its own."""
    built = []
    monkeypatch.setattr(torch_bs, "token_keep", lambda *a, _real=torch_bs.token_keep: built.append(a[1]) or _real(*a))
    blocks = torch.tensor([[[2, 2, 0, 0], [2, 2, 2, 0], [0, 2, 2, 2], [0, 0, 2, 2]]], dtype=torch.int8)
    by4, by5 = L.BlockSparseLayout(blocks, 4, 16, window=2), L.BlockSparseLayout(blocks, 5, 16, window=2)
    assert by4.blocks is by5.blocks  # the same tensor: a cache keyed by it alone would mix them up
    q, k, v = (torch.randn(1, 16, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for layout in (by4, by4, by5):
        out = block_sparse_attention(q, k, v, layout, backend="torch")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        ref = block_sparse_attention(q, k, v, layout, backend="reference")
        torch.testing.assert_close(out, ref)
        for g, r in zip(grads, torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))):
            torch.testing.assert_close(g, r)
    assert built == [4, 5]


def test_cpu_routes_follow_a_layout_edited_in_place(sparse_route, monkeypatch):
    """Schedules and masks are remembered per layout, but a layout whose tile states (or token mask) are
    edited in place is planned again, as the Triton schedules are: both CPU routes match the reference."""
    q, k, v = (torch.randn(1, 40, 2, 8, dtype=torch.float64) for _ in range(3))
    layout = L.random_blocks(40, 2, 8, seed=1)
    short = L.sliding_window(16, 2, 4) | L.BlockSparseLayout(torch.full((1, 4, 4), L.PARTIAL), 4, 16,
                                                              token_mask=torch.zeros(1, 16, 16, dtype=torch.bool))
    monkeypatch.setattr(torch_bs, "MIN_SEQLEN", 20)  # 16 tokens: the dense route; 40: the sparse route
    for lay, n in ((short, 16), (layout, 40)):
        block_sparse_attention(q[:, :n], k[:, :n], v[:, :n], lay, backend="torch")  # plans and remembers
    layout.blocks[0, 1] = L.FULL - layout.blocks[0, 1].clamp(max=1)  # swap kept and skipped tiles of a row
    short.token_mask[0, 9, 1] = True
    for lay, n in ((short, 16), (layout, 40)):
        out = block_sparse_attention(q[:, :n], k[:, :n], v[:, :n], lay, backend="torch")
        torch.testing.assert_close(out, block_sparse_attention(q[:, :n], k[:, :n], v[:, :n], lay, backend="reference"))
    assert sparse_route["forward"] == 2


# --------------------------------------------------------------------------- a new user's layouts (audit)
def test_a_window_or_global_count_past_the_sequence_means_every_token():
    """sliding_window(S, 10**30) and global_tokens(S, 10**30) attend to everything (a value past S means
    the same as S), not an OverflowError from torch; the stored values are clamped to fit the kernels' ints."""
    q = torch.randn(1, 16, 2, 8, dtype=torch.float64)
    dense = attention(q, q, q, backend="reference")
    for layout in (L.sliding_window(16, 10**30, 4), L.global_tokens(16, 10**30, 4),
                   L.BlockSparseLayout(torch.full((1, 4, 4), L.PARTIAL), 4, 16, window=10**30)):
        assert (layout.window, layout.num_global) in ((15, 0), (-1, 16)) and layout.to_dense().all()
        torch.testing.assert_close(block_sparse_attention(q, q, q, layout, backend="torch"), dense)


@pytest.mark.parametrize("seed", [1.5, None, "1", True, 2**64, -2**63 - 1])
def test_random_blocks_seed_must_be_an_int(seed):
    """A float, None, a string or a seed past 64 bits: a ValueError naming seed (not torch's RuntimeError
    "manual_seed expected a long"); a bool is not silently seed 1."""
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\), got"):
        L.random_blocks(16, 1, 4, seed=seed)
    largest = L.random_blocks(16, 1, 4, seed=2**64 - 1).blocks
    assert torch.equal(largest, L.random_blocks(16, 1, 4, seed=2**64 - 1).blocks)


def test_a_layout_with_no_heads_or_a_mismatched_token_mask_is_refused_when_built():
    """Checked once, where the layout is built (not on every attention call): zero heads, a token mask
    whose heads match neither the tiles' nor 1, a token mask on another device than the tiles."""
    tiles = torch.ones(2, 2, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"blocks must be \(heads >= 1, 2, 2\) .* got \(0, 2, 2\)"):
        L.BlockSparseLayout(tiles[:0], 4, 8)
    with pytest.raises(ValueError, match="token_mask has 3 heads but blocks has 2"):
        L.BlockSparseLayout(tiles, 4, 8, token_mask=torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask is on meta but blocks is on cpu"):
        L.BlockSparseLayout(tiles, 4, 8, token_mask=torch.ones(1, 8, 8, dtype=torch.bool, device="meta"))
    for heads in (1, 2):  # shared masks, and one mask per head, still build
        L.BlockSparseLayout(tiles, 4, 8, token_mask=torch.ones(heads, 8, 8, dtype=torch.bool))
    L.BlockSparseLayout(tiles[:1], 4, 8, token_mask=torch.ones(3, 8, 8, dtype=torch.bool))


def test_a_layout_or_something_else_is_a_type_error():
    with pytest.raises(TypeError, match=r"unsupported operand type\(s\) for \|"):
        L.sliding_window(16, 1, 4) | torch.ones(16, 16, dtype=torch.bool)


def test_device_copies_and_kv_blocks_follow_an_in_place_edit():
    """A layout edited in place after .to(device) (or after reading kv_blocks) is copied (listed) again:
    the kept copy would run the old tiles on the device while host_blocks read the edited ones."""
    layout = L.sliding_window(16, 2, 4)
    copy = layout.to("meta")
    _, counts = layout.kv_blocks
    assert layout.to("meta") is copy and layout.kv_blocks[1] is counts  # unchanged: reused
    layout.blocks[0, 0] = L.FULL
    fresh = layout.to("meta")
    assert fresh is not copy and layout.to("meta") is fresh
    assert L.host_blocks(fresh.blocks) is layout.blocks
    assert layout.kv_blocks[1][0].tolist() == [4, 3, 3, 2]


def test_dilated_reach_past_the_sequence_and_a_huge_block_size():
    """dilated(S, 10**30, 1) keeps every block and a dilation past the blocks keeps the diagonal (the same
    as the largest meaningful values), not an OverflowError from torch; a block size past the kernels'
    int32 is a ValueError naming block_size."""
    assert torch.equal(L.dilated(16, 10**30, 1, 4).blocks, L.dilated(16, 3, 1, 4).blocks)
    assert torch.equal(L.dilated(16, 1, 10**30, 4).blocks, L.dilated(16, 0, 1, 4).blocks)
    with pytest.raises(ValueError, match=r"block_size must be at most 2\*\*31 - 1 .* got 1000000000000000000000"):
        L.sliding_window(16, 1, 10**30)


def test_layouts_on_two_devices_do_not_combine():
    with pytest.raises(ValueError, match=r"layouts on meta and cpu do not combine \(move one with .to\(device\)\)"):
        L.sliding_window(16, 1, 4).to("meta") | L.global_tokens(16, 1, 4)


def test_a_union_means_the_union_of_its_layouts_token_masks():
    """A hand-made layout may narrow its rule by its tiles (here: block-diagonal tiles with a window of 15,
    global tokens, or an all-True token mask). The union applies both rules in every partial tile of
    either, so that rule leaked into the other layout's tiles (256 pairs kept instead of 64); now such
    a layout joins as its exact token mask. Unions of the builders stay mask-free."""
    diag = torch.where(torch.eye(4, dtype=torch.bool), L.PARTIAL, L.SKIP)[None]
    narrowed = [L.BlockSparseLayout(diag, 4, 16, window=15), L.BlockSparseLayout(diag, 4, 16, num_global=2),
                L.BlockSparseLayout(diag, 4, 16, token_mask=torch.ones(1, 16, 16, dtype=torch.bool))]
    eye = torch.eye(16, dtype=torch.bool)[None]
    others = [L.sliding_window(16, 1, 4), L.global_tokens(16, 1, 4),
              L.BlockSparseLayout(torch.full((1, 4, 4), L.PARTIAL), 4, 16, token_mask=eye)]
    for a in narrowed:
        for b in others:
            for union in (a | b, b | a):
                assert torch.equal(union.to_dense(), a.to_dense() | b.to_dense())
    plain = L.sliding_window(16, 2, 4) | L.global_tokens(16, 1, 4) | L.random_blocks(16, 1, 4, seed=2)
    assert plain.token_mask is None and (plain.window, plain.num_global) == (2, 1)


def test_host_tiles_of_a_device_copy_follow_an_in_place_edit():
    """The CUDA routes judge a layout (e.g. whether it is a pure window) on host_blocks of its device tiles.
    After an in-place edit of the device copy (or of the host tiles it came from) that was the stale host
    tensor; now the device is read again (a meta tensor has no values: NotImplementedError shows the read)."""
    for edit_device in (True, False):
        layout = L.sliding_window(16, 2, 4)
        copy = layout.to("meta")
        assert L.host_blocks(copy.blocks) is layout.blocks
        (copy.blocks if edit_device else layout.blocks)[0, 0, 3] = L.FULL
        with pytest.raises(NotImplementedError, match="meta"):
            L.host_blocks(copy.blocks)
