"""Block-sparse attention on the cuda backend: the CUDA kernels' walk of the layout's visit lists.

CPU tier: ``cuda-emulated`` (tests/backend_params.py) runs the very kernels of csrc/attention.cuh
in the CPU emulator on tiny shapes, through every path of the walk: full, partial and skipped
layout blocks, the token rule (window, global tokens, per-head token mask), key masks with holes,
packed odd and zero lengths, rows and whole query blocks whose kept set is empty, the head-dim
buckets (a zero-padded 40, the 32-key tiles of 128). GPU tier (``cuda``): bf16, larger shapes,
determinism. Layout blocks are multiples of 64 (the kernels' query tile); others are refused.
"""
import pytest
import torch

from backend_params import params, running
from fastmlm.ops import attention, block_sparse_attention, block_sparse_attention_reference
from fastmlm.ops import block_layout as L
from fastmlm.testing import poisoned_allocations
from helpers import assert_backend_matches, assert_error_ratio, cu_seqlens_of, random_mask, strided_view

EMULATED = params("cuda-emulated")
BOTH = params("cuda-emulated", "cuda")


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def check_block_sparse(device, dtype, layout, shape, mask=None, lengths=None):
    """cuda backend vs the fp64 reference under the error-ratio rule: outputs, lse, gradients.

    The fast run allocates its outputs poisoned (NaN), so an element the kernels never write shows.
    """
    kw = dict(attention_mask=mask) if lengths is None else dict(cu_seqlens=cu_seqlens_of(lengths, device))
    exact_in = [torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3)]
    low_in = [t.detach().to(dtype).requires_grad_() for t in exact_in]
    exact, exact_lse = block_sparse_attention_reference(*exact_in, layout, **kw)
    lowp, _ = block_sparse_attention_reference(*low_in, layout, **kw, upcast=False)
    max_seqlen = None if lengths is None else max(lengths)
    with poisoned_allocations():
        fast, fast_lse = block_sparse_attention(*low_in, layout, **kw, max_seqlen=max_seqlen, return_lse=True,
                                                backend="cuda")
    valid = torch.ones(exact.shape[:-1], dtype=torch.bool, device=device)
    if mask is not None:  # padded query rows are unspecified by the contract
        valid = mask[:, :, None].expand(exact.shape[:-1])
    assert torch.equal(torch.isneginf(fast_lse[valid]), torch.isneginf(exact_lse[valid])), "lse = -inf rows differ"
    finite = valid & torch.isfinite(exact_lse)
    assert finite.any() and torch.isneginf(exact_lse[valid]).sum() < valid.sum(), "a test that sees nothing"
    assert_error_ratio(fast[valid], exact[valid], lowp[valid], 2.0, 0.0)
    assert_error_ratio(fast_lse[finite], exact_lse[finite], exact_lse[finite], 1.0, 0.05, "lse")
    dout = torch.randn(exact.shape, dtype=torch.float64, device=device) * valid[..., None]
    with poisoned_allocations():
        fast_grads = _grads(fast, low_in, dout.to(dtype))
    for name, f, e, l in zip("qkv", fast_grads, _grads(exact, exact_in, dout), _grads(lowp, low_in, dout.to(dtype))):
        assert_error_ratio(f, e, l, 3.0, 0.0, f"d{name}")


def _per_head_layout(heads, seqlen, block=64, seed=0):
    """Per head: random key blocks (not symmetric, so the dK/dV kernel's transposed list differs from
    the forward's), a token mask inside one random tile and a narrow window: every tile state."""
    gen = torch.Generator().manual_seed(seed)
    nb = -(-seqlen // block)
    token_mask = torch.zeros(heads, seqlen, seqlen, dtype=torch.bool)
    for h, (qb, kb) in enumerate(torch.randint(0, nb, (heads, 2), generator=gen).tolist()):
        tile = token_mask[h, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
        tile.copy_(torch.rand(tile.shape, generator=gen) < 0.1)
    layout = (L.random_blocks(seqlen, 1, block, heads, seed) | L.from_dense_mask(token_mask, block)
              | L.sliding_window(seqlen, 5, block))
    keep = layout.blocks != L.SKIP
    assert not torch.equal(keep, keep.transpose(1, 2)) and keep.any(-1).all()
    return layout


# --------------------------------------------------------------------------- CPU tier (emulated)
@pytest.mark.parametrize("param", EMULATED)
def test_window_and_global_padded_mask_with_holes(param):
    """Window | global tokens, shared by the heads (full global blocks, partial diagonal ones, skipped
    far ones, a short last block); a key mask with holes and an all-padding sequence."""
    with running(param) as (_, device):
        seqlen = 200
        layout = L.sliding_window(seqlen, 20, 64) | L.global_tokens(seqlen, 64, 64)
        assert set(layout.blocks.unique().tolist()) == {L.SKIP, L.FULL, L.PARTIAL}
        mask = torch.rand(2, seqlen) < 0.8
        mask[0, :4] = True
        mask[1] = False
        check_block_sparse(device, torch.float16, layout, (2, seqlen, 2, 32), mask=mask)


@pytest.mark.parametrize("param", EMULATED)
def test_per_head_layout_packed_odd_and_zero_lengths(param):
    """Per-head random layouts with a token mask, packed sequences of odd and zero length, bf16,
    head dim 40 (zero-padded to the 64 bucket)."""
    with running(param) as (_, device):
        lengths = [131, 0, 1, 67]
        layout = _per_head_layout(2, 131)
        check_block_sparse(device, torch.bfloat16, layout, (sum(lengths), 2, 40), lengths=lengths)


@pytest.mark.parametrize("param", EMULATED)
def test_head_dim_128_layout_block_of_128(param):
    """Head dim 128 steps through 32 keys (and, in dK/dV, 32 queries): four tiles per 128-token
    layout block, so the walk moves within a block and then jumps to the next visited one. The
    token mask has one head while the tile states have two."""
    with running(param) as (_, device):
        seqlen = 200
        token_mask = torch.zeros(seqlen, seqlen, dtype=torch.bool)
        token_mask[:128, :128] = torch.rand(128, 128, generator=torch.Generator().manual_seed(3)) < 0.05
        layout = L.random_blocks(seqlen, 1, 128, num_heads=2, seed=2) | L.from_dense_mask(token_mask, 128)
        assert layout.token_mask.shape[0] == 1 and layout.num_heads == 2
        assert set(layout.blocks.unique().tolist()) == {L.SKIP, L.FULL, L.PARTIAL}
        check_block_sparse(device, torch.float16, layout, (1, seqlen, 2, 128), mask=random_mask(1, seqlen))


@pytest.mark.parametrize("param", EMULATED)
def test_empty_kept_sets_give_zeros(param):
    """Query 3 keeps no key, nor does the whole second query block (its visit list is empty): zeros,
    lse = -inf and zero gradients there, not NaN; a zero-length sequence is left alone."""
    with running(param) as (_, device):
        lengths = [150, 0, 70]
        token_mask = torch.rand(150, 150, generator=torch.Generator().manual_seed(5)) < 0.3
        token_mask[3] = False
        token_mask[64:128] = False
        layout = L.from_dense_mask(token_mask, 64)
        _, counts = layout.kv_blocks
        assert counts[0, 1] == 0
        cu = cu_seqlens_of(lengths, device)
        q, k, v = (torch.randn(sum(lengths), 2, 32, dtype=torch.float16, requires_grad=True) for _ in range(3))
        out, lse = block_sparse_attention(q, k, v, layout, cu_seqlens=cu, max_seqlen=150, return_lse=True,
                                          backend="cuda")
        ref, ref_lse = block_sparse_attention_reference(q, k, v, layout, cu_seqlens=cu)
        empty = [3, *range(64, 128), 150 + 3]
        assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)
        dout = torch.randn_like(out)
        grads = _grads(out, (q, k, v), dout)
        for g, r in zip(grads, _grads(ref, (q, k, v), dout)):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g.float(), r.float(), atol=3e-3, rtol=3e-3)
        assert (grads[0][empty] == 0).all()


@pytest.mark.parametrize("param", EMULATED)
def test_full_layout_is_the_dense_kernel_bit_for_bit(param):
    """Every tile full: the sparse walk visits exactly the dense walk's tiles, in its order, with
    the same math, so outputs and gradients equal the dense cuda backend's bit for bit."""
    with running(param) as (_, device):
        mask = torch.rand(2, 130) < 0.7
        layout = L.from_dense_mask(torch.ones(130, 130, dtype=torch.bool), 64)
        assert (layout.blocks == L.FULL).all()
        q, k, v = (torch.randn(2, 130, 1, 32, dtype=torch.float16, requires_grad=True) for _ in range(3))
        sparse, sparse_lse = block_sparse_attention(q, k, v, layout, attention_mask=mask, return_lse=True,
                                                    backend="cuda")
        dense, dense_lse = attention(q, k, v, attention_mask=mask, return_lse=True, backend="cuda")
        assert torch.equal(sparse, dense) and torch.equal(sparse_lse, dense_lse)
        dout = torch.randn_like(dense)
        for a, b in zip(_grads(sparse, (q, k, v), dout), _grads(dense, (q, k, v), dout)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("param", EMULATED)
def test_strided_views_and_nan_under_padding(param):
    """A fused-QKV slice gives the right outputs and gradients; NaN / inf stored at padding keys
    never reach a real row, in full or partial tiles."""
    with running(param) as (_, device):
        layout = L.sliding_window(100, 10, 64) | L.global_tokens(100, 2, 64)
        mask = torch.ones(2, 100, dtype=torch.bool)
        mask[1, 30:40] = mask[1, 90:] = False
        kw = dict(attention_mask=mask)
        assert_backend_matches(
            lambda q, k, v: block_sparse_attention(*(strided_view(t, "fused_slice") for t in (q, k, v)), layout, **kw,
                                                   backend="cuda"),
            lambda q, k, v, upcast: block_sparse_attention_reference(q, k, v, layout, **kw, upcast=upcast)[0],
            [torch.randn(2, 100, 2, 32) for _ in range(3)], mask[:, :, None, None], dtype=torch.float16, floor=0.0)
        clean = [torch.randn(2, 100, 2, 32, dtype=torch.float16) for _ in range(3)]
        dirty = [t.clone() for t in clean]
        dirty[1][~mask], dirty[2][~mask] = float("nan"), float("inf")
        dout = torch.randn(2, 100, 2, 32, dtype=torch.float16) * mask[:, :, None, None]
        results = []
        for tensors in (clean, dirty):
            inputs = [t.clone().requires_grad_() for t in tensors]
            out = block_sparse_attention(*inputs, layout, **kw, backend="cuda")
            results.append([out[mask], *_grads(out, inputs, dout)])
        for name, c, d in zip(["out", "dq", "dk", "dv"], *results):
            assert torch.isfinite(d).all(), name
            assert torch.equal(d, c), name


@pytest.mark.parametrize("param", EMULATED)
def test_opcheck(param):
    """The custom op on the cuda backend: fake tensors, autograd registration, schema."""
    with running(param) as (_, device):
        q, k, v = (torch.randn(2, 5, 1, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
        layout = L.sliding_window(5, 1, 64) | L.global_tokens(5, 1, 64)
        args = (q, k, v, random_mask(2, 5, 1), None, 5, 0.25, layout.blocks, None, 64, layout.window,
                layout.num_global, "cuda")
        torch.library.opcheck(torch.ops.fastmlm.block_sparse_attention_fwd.default, args)


@pytest.mark.parametrize("param", EMULATED)
def test_refuses_what_the_kernels_cannot_run(param):
    """Layout blocks that are not a multiple of the 64-row query tile, and fp32, are refused with the reason."""
    with running(param) as (_, device):
        q = torch.randn(1, 40, 2, 32, dtype=torch.float16)
        with pytest.raises(ValueError, match="block_size that is a multiple of 64.*got 32"):
            block_sparse_attention(q, q, q, L.sliding_window(40, 4, 32), backend="cuda")
        with pytest.raises(ValueError, match="float16/bfloat16"):
            block_sparse_attention(q.float(), q.float(), q.float(), L.sliding_window(40, 4, 64), backend="cuda")


# --------------------------------------------------------------------------- GPU tier
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_gpu_per_head_layouts(dtype, head_dim):
    mask = random_mask(2, 1000, min_len=1).cuda()
    layout = _per_head_layout(4, 1000, block=64 if head_dim != 128 else 128)
    check_block_sparse("cuda", dtype, layout.to("cuda"), (2, 1000, 4, head_dim), mask=mask)


@pytest.mark.gpu
def test_gpu_packed_window_global_and_determinism():
    lengths = [1023, 0, 1, 17, 500]
    layout = (L.sliding_window(1023, 100, 64) | L.global_tokens(1023, 2, 64)).to("cuda")
    check_block_sparse("cuda", torch.bfloat16, layout, (sum(lengths), 4, 64), lengths=lengths)
    cu = cu_seqlens_of(lengths, "cuda")
    q, k, v = (torch.randn(sum(lengths), 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    run = lambda: block_sparse_attention(q, k, v, layout, cu_seqlens=cu, max_seqlen=1023, backend="cuda")
    dout = torch.randn_like(run())
    first = [run(), *_grads(run(), (q, k, v), dout)]
    for _ in range(2):
        again = [run(), *_grads(run(), (q, k, v), dout)]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
