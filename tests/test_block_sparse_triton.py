"""The Triton block-sparse kernels (kernels/block_sparse.py): equivalence with dense attention
under the layout's mask, tile skipping, kernel-tile schedules, and the GPU tier."""
import pytest
import torch

from fastmlm.ops import block_sparse_attention, block_sparse_attention_reference
from fastmlm.ops import block_layout as L
from fastmlm.ops.attention import AttentionInputs
from fastmlm.ops.block_sparse import BlockSparseInputs
from fastmlm.ops.kernels_path import import_module
from helpers import assert_error_ratio, cu_seqlens_of
from test_attention_triton import (assert_nan_in_gives_nan_out, assert_padding_never_contributes,
                                   assert_strided_views_match)

interpreter = pytest.mark.interpreter
gpu = pytest.mark.gpu


def _bs():
    return import_module("fastmlm_kernels.block_sparse")


def _check(inputs, layout, dtype, device, **batch):
    """Error-ratio rule (outputs 2x, gradients 3x) against the dense reference under the layout."""
    inputs, layout = [t.to(device) for t in inputs], layout.to(device)
    exact_in = [t.double().requires_grad_() for t in inputs]
    low_in = [t.to(dtype).requires_grad_() for t in inputs]
    fast_in = [t.to(dtype).requires_grad_() for t in inputs]
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    ref_batch = {k: v for k, v in batch.items() if k != "max_seqlen"}
    exact, exact_lse = block_sparse_attention_reference(*exact_in, layout, **ref_batch)
    lowp, _ = block_sparse_attention_reference(*low_in, layout, **ref_batch, upcast=False)
    fast, lse = block_sparse_attention(*fast_in, layout, **batch, return_lse=True, backend="triton")
    floor = 1e-5 if dtype == torch.float32 else 1e-6  # see test_attention_triton._check_against_reference
    assert_error_ratio(fast, exact, lowp, 2.0, floor)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact_lse)), "lse = -inf exactly for rows without keys"
    dout = torch.randn(exact.shape, dtype=torch.float64).to(device)
    grads = [torch.autograd.grad(fast, fast_in, dout.to(dtype)), torch.autograd.grad(exact, exact_in, dout),
             torch.autograd.grad(lowp, low_in, dout.to(dtype))]
    for name, f, e, l in zip("qkv", *grads):
        assert_error_ratio(f, e, l, 3.0, floor, f"d{name}")


def _random_token_mask(heads, seqlen, density=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(heads, seqlen, seqlen, generator=gen) < density


# Layout block sizes 16 and 32 run as kernel tiles of the same size; 8 is pooled into 16-tiles.
LAYOUTS = {
    "window+global/16": lambda s, h: L.sliding_window(s, 9, 16) | L.global_tokens(s, 2, 16),
    "random-per-head/32": lambda s, h: L.random_blocks(s, 2, 32, num_heads=h, seed=3) | L.global_tokens(s, 1, 32),
    "dilated/16": lambda s, h: L.dilated(s, num_blocks=1, dilation=2, block_size=16),
    "token-mask-per-head/16": lambda s, h: L.from_dense_mask(_random_token_mask(h, s), 16),
    "window-pooled/8": lambda s, h: L.sliding_window(s, 5, 8) | L.random_blocks(s, 1, 8, num_heads=h, seed=1),
}


# --------------------------------------------------------------------------- interpreter tier
@interpreter
@pytest.mark.parametrize(
    "name,dtype",
    [(name, torch.float32) for name in LAYOUTS] + [("token-mask-per-head/16", torch.float16),
                                                   ("window-pooled/8", torch.float16)],
    ids=lambda x: x if isinstance(x, str) else str(x).replace("torch.", ""),
)
def test_matches_dense_attention_under_the_layout_mask(device, name, dtype):
    seqlen, heads = 45, 2
    layout = LAYOUTS[name](seqlen, heads)
    inputs = [torch.randn(2, seqlen, heads, 32) for _ in range(3)]
    mask = torch.ones(2, seqlen, dtype=torch.bool)
    mask[1, 36:] = False
    mask[1, 7] = False  # a hole: the key-padding mask need not be right-padded
    _check(inputs, layout, dtype, device, attention_mask=mask)


@interpreter
def test_packed_with_layout_longer_than_sequences(device):
    lengths = [33, 0, 5, 40]
    layout = L.sliding_window(60, 12, 16) | L.global_tokens(60, 1, 16) | L.random_blocks(60, 1, 16, num_heads=2)
    inputs = [torch.randn(sum(lengths), 2, 16) for _ in range(3)]
    _check(inputs, layout, torch.float16, device, cu_seqlens=cu_seqlens_of(lengths), max_seqlen=40)


@interpreter
def test_layout_block_larger_than_the_kernel_tile(device):
    """Layout blocks of 256 tokens are split into 64-token kernel tiles."""
    seqlen = 300
    blocks = torch.tensor([[[1, 2], [0, 1]]], dtype=torch.int8)
    layout = L.BlockSparseLayout(blocks, 256, seqlen, window=20)
    inputs = [torch.randn(1, seqlen, 1, 16) for _ in range(3)]
    _check(inputs, layout, torch.float32, device)


@interpreter
def test_skipped_tiles_are_never_loaded(device):
    """NaN in keys no query block keeps, and in queries that keep no key block: a kernel that
    loaded a skipped tile (even to mask it) would spread NaN into outputs or gradients."""
    seqlen, block = 64, 16
    blocks = torch.full((1, 4, 4), L.FULL, dtype=torch.int8)
    blocks[:, :, 2] = L.SKIP  # key block 2: kept by nobody
    blocks[:, 3, :] = L.SKIP  # query block 3: keeps nothing
    layout = L.BlockSparseLayout(blocks, block, seqlen)
    q, k, v = (torch.randn(1, seqlen, 2, 16, device=device) for _ in range(3))
    k[:, 32:48], v[:, 32:48], q[:, 48:] = float("nan"), float("nan"), float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    clean = [t.detach().nan_to_num(0.0).double().cpu().requires_grad_() for t in (q, k, v)]
    ref, _ = block_sparse_attention_reference(*clean, layout)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-5, rtol=1e-5)
    assert (out[:, 48:] == 0).all() and torch.isneginf(lse[:, 48:]).all()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, clean, dout.double().cpu())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), r, atol=1e-5, rtol=1e-5)


def _run_under(layout):
    """A block-sparse attention backend in the form the shared attention checks take."""
    return lambda q, k, v, **kw: block_sparse_attention(q, k, v, layout.to(q.device), **kw, backend="triton")


# One layout serves every batch of the shared checks (up to 100 tokens): window, globals, partial tiles.
SHARED_LAYOUT = L.sliding_window(100, 9, 16) | L.global_tokens(100, 2, 16)


@interpreter
@pytest.mark.parametrize("layout,kind", [("padded", "every_other"), ("packed", "transposed")])
def test_strided_views(device, layout, kind):
    assert_strided_views_match(_run_under(SHARED_LAYOUT), layout, kind, torch.float32, device)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN inputs
@interpreter
@pytest.mark.parametrize("layout,dtype", [("padded", torch.float32), ("packed", torch.float16)])
def test_padding_never_contributes(device, layout, dtype):
    """Key padding and the neighbouring packed sequence, poisoned with NaN, change nothing."""
    assert_padding_never_contributes(_run_under(SHARED_LAYOUT), layout, dtype, device)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN inputs
@interpreter
def test_nan_in_gives_nan_out(device):
    # No all -inf row here: the layout may keep no key for a row, and such a row outputs zeros.
    assert_nan_in_gives_nan_out(_run_under(SHARED_LAYOUT), torch.float32, device, all_minus_inf_row=False)


@interpreter
def test_backward_is_deterministic(device):
    layout = L.sliding_window(40, 10, 16) | L.random_blocks(40, 2, 16, num_heads=2)
    q, k, v = (torch.randn(1, 40, 2, 32, device=device, dtype=torch.float16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    runs = [torch.autograd.grad(block_sparse_attention(q, k, v, layout, backend="triton"), (q, k, v), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@interpreter
def test_opcheck_triton_backend(device):
    q, k, v = (torch.randn(1, 12, 2, 16, device=device, requires_grad=True) for _ in range(3))
    layout = (L.sliding_window(12, 3, 4) | L.global_tokens(12, 1, 4)).to(device)
    args = (q, k, v, None, None, 12, 0.35, layout.blocks, None, 4, layout.window, layout.num_global, "triton")
    torch.library.opcheck(torch.ops.fastmlm.block_sparse_attention_fwd.default, args)


# --------------------------------------------------------------------------- schedules (no kernel)
@pytest.mark.parametrize("block,seqlen", [(4, 37), (8, 100), (16, 50), (256, 300)])
def test_kernel_tile_states_cover_the_layout_exactly(block, seqlen):
    """Pooled/split tile states: every attending pair lies in a kept tile, and a FULL tile
    has every in-range pair attending (so skipping its mask is exact)."""
    bs = _bs()
    layout = L.sliding_window(seqlen, 6, block) | L.random_blocks(seqlen, 2, block, num_heads=2, seed=5)
    tile = bs.kernel_tile(block)
    states = bs._tile_states(layout.blocks, block, seqlen, tile)
    nt = -(-seqlen // tile)
    assert states.shape == (2, nt, nt)
    idx = torch.arange(seqlen) // tile
    token_state = states.long()[:, idx][:, :, idx]
    dense = layout.to_dense()
    assert not (dense & (token_state == L.SKIP)).any()
    assert dense[token_state == L.FULL].all()


def test_visit_lists_and_their_transpose():
    bs = _bs()
    layout = L.random_blocks(96, 2, 16, num_heads=3, seed=2) | L.global_tokens(96, 1, 16)
    plan = bs.sparse_schedule(layout.blocks, 16, 96, layout.window, layout.num_global, None)
    keep = plan.tile_state != L.SKIP
    for h in range(3):
        for i in range(keep.shape[1]):
            kv = plan.kv_index[h, i, : plan.kv_count[h, i]]
            assert torch.equal(kv, keep[h, i].nonzero()[:, 0].int())
            qs = plan.q_index[h, i, : plan.q_count[h, i]]
            assert torch.equal(qs, keep[h, :, i].nonzero()[:, 0].int())
    assert (plan.kv_index[plan.kv_index >= 0].numel() == keep.sum())
    assert bs.sparse_schedule(layout.blocks, 16, 96, layout.window, layout.num_global, None) is plan, "cached per layout"


def test_non_power_of_two_block_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so the CPU itself is not the reason given
    q = torch.randn(1, 24, 1, 16)
    layout = L.sliding_window(24, 3, 12)
    assert "not a power of two" in _bs().why_not(
        BlockSparseInputs.from_layout(AttentionInputs(q, q, q, None, None, 24, 0.25), layout))


# --------------------------------------------------------------------------- GPU tier
@gpu
@pytest.mark.parametrize("seqlen", [1024, 4096])
def test_gpu_modernbert_window_bf16(seqlen):
    """ModernBERT-style local layer: 128-token window (64 each side) plus [CLS] global, block 64."""
    layout = L.sliding_window(seqlen, 64, 64) | L.global_tokens(seqlen, 1, 64)
    inputs = [torch.randn(2, seqlen, 4, 64) for _ in range(3)]
    mask = torch.arange(seqlen)[None] < torch.tensor([[seqlen], [seqlen - 77]])
    _check(inputs, layout, torch.bfloat16, "cuda", attention_mask=mask)


@gpu
@pytest.mark.parametrize("block", [16, 64, 128])
def test_gpu_per_head_random_blocks_bf16(block):
    seqlen, heads = 1000, 4
    layout = L.random_blocks(seqlen, 3, block, num_heads=heads, seed=7) | L.sliding_window(seqlen, 40, block)
    lengths = [1000, 0, 511, 17]
    inputs = [torch.randn(sum(lengths), heads, 64) for _ in range(3)]
    _check(inputs, layout, torch.bfloat16, "cuda", cu_seqlens=cu_seqlens_of(lengths), max_seqlen=1000)


@gpu
def test_gpu_full_density_equals_dense_kernel():
    from fastmlm.ops import attention
    q, k, v = (torch.randn(2, 777, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = L.from_dense_mask(torch.ones(777, 777, dtype=torch.bool), 64).to("cuda")
    sparse = block_sparse_attention(q, k, v, layout, backend="triton")
    dense = attention(q, k, v, backend="triton")
    torch.testing.assert_close(sparse.float(), dense.float(), atol=2e-2, rtol=2e-2)
