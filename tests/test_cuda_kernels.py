"""The CUDA C++ kernels (csrc/): on the CPU through the kernel emulator, on the GPU tier for real.

CPU tier: ``fastmlm.ops.cuda_impl.emulation()`` runs the same kernel templates and Python
drivers on CPU tensors (csrc/emulate/: every CUDA thread a fiber, mma.sync assembled from
the PTX fragment layout). Tiny shapes, but every code path of the kernels: several key
tiles, zero-padded head dims, empty and length-1 sequences, arbitrary key masks, several
vocabulary chunks, argmax ties across chunks. Skipped where g++ or the CUDA headers are
missing. GPU tier (``gpu``): the built extension on real shapes, bf16, determinism.
"""
import pytest
import torch
import torch.nn.functional as F

from fastmlm.ops import attention, attention_reference, cuda_impl, masked_lm_loss, masked_lm_loss_reference
from fastmlm.ops.attention import AttentionInputs
from fastmlm.ops.cuda_impl import attention as cuda_attention
from fastmlm.ops.cuda_impl import emulate
from fastmlm.ops.cuda_impl import masked_ce as cuda_masked_ce
from helpers import assert_error_ratio, cu_seqlens_of, random_mask
from test_attention_triton import (assert_nan_in_gives_nan_out, assert_padding_never_contributes,
                                   assert_strided_views_match)
from test_masked_ce_triton import assert_rows_that_do_not_count_never_contribute, assert_strided_inputs_match


@pytest.fixture
def emulated():
    why = emulate.unavailable()
    if why:
        pytest.skip(f"kernel emulator unavailable: {why}")
    with cuda_impl.emulation():
        yield "cpu"


@pytest.fixture
def on_gpu():
    if cuda_impl.why_not_built() is not None:
        pytest.fail(f"the GPU tier needs the extension: {cuda_impl.why_not_built()}")
    return "cuda"


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def check_attention(device, dtype, batch, seqlen, heads, head_dim, mask=None, cu_seqlens=None):
    """cuda backend vs the fp64 reference under the error-ratio rule, outputs, lse and gradients."""
    shape = (batch, seqlen, heads, head_dim) if cu_seqlens is None else (seqlen, heads, head_dim)
    exact_in = [torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3)]
    low_in = [t.detach().to(dtype).requires_grad_() for t in exact_in]
    layout = dict(attention_mask=mask) if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    max_seqlen = None if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    exact, exact_lse = attention_reference(*exact_in, **layout)
    lowp, _ = attention_reference(*low_in, **layout, upcast=False)
    fast, fast_lse = attention(*low_in, **layout, max_seqlen=max_seqlen, return_lse=True, backend="cuda")
    valid = torch.ones(exact.shape[:-1], dtype=torch.bool, device=device)
    if mask is not None:  # padded query rows are unspecified by the contract
        valid = mask[:, :, None].expand(exact.shape[:-1]).to(device)
    finite = valid & torch.isfinite(exact_lse)
    assert_error_ratio(fast[valid], exact[valid], lowp[valid], 2.0, 0.0)
    assert torch.equal(torch.isneginf(fast_lse[valid]), torch.isneginf(exact_lse[valid])), "lse = -inf rows differ"
    assert_error_ratio(fast_lse[finite], exact_lse[finite], exact_lse[finite], 1.0, 0.05, "lse")
    dout = torch.randn(exact.shape, dtype=torch.float64, device=device) * valid[..., None]
    for name, f, e, l in zip("qkv", _grads(fast, low_in, dout.to(dtype)), _grads(exact, exact_in, dout),
                             _grads(lowp, low_in, dout.to(dtype))):
        assert_error_ratio(f, e, l, 3.0, 0.0, f"d{name}")


# --------------------------------------------------------------------------- CPU tier (emulated)
@pytest.mark.parametrize(
    "dtype,batch,seqlen,heads,head_dim",
    [
        (torch.float16, 2, 17, 2, 32),    # one key tile, ragged
        (torch.bfloat16, 1, 70, 1, 40),   # two query and key tiles; head dim 40 zero-padded to 64
        (torch.float16, 1, 45, 1, 128),   # head dim 128: 32-key tiles
    ],
)
def test_emulated_attention_padded(emulated, dtype, batch, seqlen, heads, head_dim):
    check_attention(emulated, dtype, batch, seqlen, heads, head_dim, mask=random_mask(batch, seqlen, min_len=1))


def test_emulated_attention_skips_right_padding(emulated):
    """Key tiles past the last real key are skipped (forward, dQ) and their dK/dV blocks write zeros."""
    mask = torch.arange(140)[None, :] < torch.tensor([140, 5, 0])[:, None]
    check_attention(emulated, torch.float16, 3, 140, 1, 32, mask=mask)


def test_emulated_attention_packed_varlen(emulated):
    check_attention(emulated, torch.float16, 0, 51, 2, 32, cu_seqlens=cu_seqlens_of([17, 0, 1, 33]))


def test_emulated_attention_mask_with_holes_and_empty_sequence(emulated):
    """Not right-padded: the kernel applies the (B, S) mask per key; an all-padding sequence gives 0 / -inf / 0."""
    mask = torch.rand(3, 20) < 0.6
    mask[2] = False
    q, k, v = (torch.randn(3, 20, 2, 32, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out, lse = attention(q, k, v, attention_mask=mask, return_lse=True, backend="cuda")
    ref, ref_lse = attention_reference(q, k, v, attention_mask=mask)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()
    torch.testing.assert_close(lse[:2], ref_lse[:2], atol=1e-3, rtol=1e-3)
    dout = torch.randn_like(out)
    for g, r in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert torch.isfinite(g).all() and (g[2] == 0).all()
        torch.testing.assert_close(g.float(), r.float(), atol=3e-3, rtol=3e-3)


def test_emulated_attention_refuses_what_it_cannot_run(emulated):
    q = torch.randn(1, 4, 1, 36, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 8"):
        attention(q, q, q, backend="cuda")
    q = torch.randn(1, 4, 1, 32)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        attention(q, q, q, backend="cuda")


def test_emulated_attention_opcheck(emulated):
    q, k, v = (torch.randn(2, 5, 1, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    args = (q, k, v, random_mask(2, 5, 1), None, 5, 0.25, "cuda")
    torch.library.opcheck(torch.ops.fastmlm.attention_fwd.default, args)


def _cuda_attention(q, k, v, **kw):
    return attention(q, k, v, **kw, backend="cuda")


@pytest.mark.parametrize("layout,kind", [("padded", "every_other"), ("packed", "transposed")])
def test_emulated_attention_strided_views(emulated, layout, kind):
    assert_strided_views_match(_cuda_attention, layout, kind, torch.float16, emulated)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_emulated_attention_padding_never_contributes(emulated, layout):
    """NaN under padding keys/values (holes, right and left padding) or in the neighbouring packed
    sequence: K and V rows that are not real keys are zero-filled on load, not only masked."""
    assert_padding_never_contributes(_cuda_attention, layout, torch.float16, emulated)


def test_emulated_attention_left_padding_longer_than_a_key_tile(emulated):
    """70 padding keys then 30 real ones: the first 64-key tile is all padding, so the running max is
    still -inf after it and the rescale must use a shift of 0, not 2^(-inf + inf) = NaN (issue 23)."""
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[1, :70] = False
    check_attention(emulated, torch.float16, 2, 100, 1, 32, mask=mask)


def test_emulated_attention_nan_in_gives_nan_out(emulated):
    assert_nan_in_gives_nan_out(_cuda_attention, torch.float16, emulated)


def check_masked_ce(device, dtype, tokens, hidden, vocab, use_positions, options, per_row=False):
    """cuda backend vs the fp64 reference under the error-ratio rule: loss, accuracy, three gradients.

    The mean loss runs forward_and_grads; ``per_row`` averages reduction="none" instead, which
    runs the forward and the backward kernels."""
    h = torch.randn(tokens, hidden, dtype=torch.float64, device=device)
    w = torch.randn(vocab, hidden, dtype=torch.float64, device=device) / hidden**0.5
    b = torch.randn(vocab, dtype=torch.float64, device=device) * 0.1
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[torch.rand(tokens, device=device) >= 0.3] = -100
    labels[0] = 3
    positions = None
    if use_positions:  # masked rows in reverse order, padded with -1 at the front
        masked = (labels != -100).nonzero()[:, 0]
        positions = torch.cat([torch.full((2,), -1, device=device), masked.flip(0)])
    exact_in = [t.requires_grad_() for t in (h, w, b)]
    low_in = [t.detach().to(dtype).requires_grad_() for t in (h, w, b)]
    kw = dict(positions=positions, **options)
    exact, exact_correct = masked_lm_loss(*exact_in, labels, backend="reference", return_accuracy=True, **kw)
    lowp_rows = masked_lm_loss_reference(*low_in, labels, positions, -100, options.get("label_smoothing", 0.0),
                                         options.get("z_loss", 0.0), upcast=False)[0]
    lowp = lowp_rows.sum() / (lowp_rows != 0).sum()
    fast, correct = masked_lm_loss(*low_in, labels, backend="cuda", return_accuracy=True, **kw)
    if per_row:
        rows = masked_lm_loss(*low_in, labels, backend="cuda", reduction="none", **kw)
        fast = rows.sum() / (rows != 0).sum()
    assert fast.dtype == torch.float32
    floor = 1e-5 if dtype == torch.float32 else 0.0
    assert_error_ratio(fast, exact, lowp, 2.0, floor + torch.finfo(dtype).eps * exact.abs().item(), "loss")
    if dtype == torch.float32:
        assert correct.item() == exact_correct.item()
    for name, f, e, l in zip(("d_hidden", "d_weight", "d_bias"), torch.autograd.grad(fast * 0.7, low_in),
                             torch.autograd.grad(exact * 0.7, exact_in), torch.autograd.grad(lowp * 0.7, low_in)):
        assert_error_ratio(f, e, l, 3.0, floor, name)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several vocabulary chunks on tiny shapes (chunk = 128 columns)."""
    monkeypatch.setattr(cuda_masked_ce, "CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
@pytest.mark.parametrize("per_row", [False, True], ids=["reduced", "per-row"])
def test_emulated_masked_ce(emulated, small_chunks, dtype, use_positions, per_row):
    options = dict(label_smoothing=0.1, z_loss=1e-3) if use_positions else {}
    check_masked_ce(emulated, dtype, 9, 16, 300, use_positions, options, per_row)


def test_emulated_masked_ce_argmax_ties_across_chunks(emulated, small_chunks):
    """The first index among equal maxima wins, also when they sit in different vocabulary chunks."""
    w = torch.zeros(300, 4)
    w[[5, 140, 290]] = 1.0  # three equal best logits, in chunks 0, 1 and 2
    h = torch.ones(3, 4)
    for target, expected in ((5, 1), (140, 0), (290, 0)):
        labels = torch.full((3,), -100)
        labels[1] = target
        _, correct = masked_lm_loss(h, w, None, labels, return_accuracy=True, backend="cuda")
        assert correct.item() == expected


def test_emulated_masked_ce_edge_cases(emulated):
    h, w, b = torch.randn(12, 8), torch.randn(17, 8), torch.randn(17)
    inputs = [t.requires_grad_() for t in (h, w, b)]
    labels = torch.full((12,), -100)  # no masked token: zero loss and zero gradients
    loss = masked_lm_loss(*inputs, labels, backend="cuda")
    assert loss.item() == 0 and all((g == 0).all() for g in torch.autograd.grad(loss, inputs))
    labels[:] = torch.arange(12)  # huge logits stay finite
    big = [t.detach() * 3000 for t in (h, w)]
    loss = masked_lm_loss(*big, None, labels, backend="cuda")
    torch.testing.assert_close(loss, F.cross_entropy(big[0] @ big[1].t(), labels))


def test_emulated_masked_ce_strided_inputs(emulated):
    assert_strided_inputs_match("cuda", emulated)


def test_emulated_masked_ce_rows_that_do_not_count_never_contribute(emulated, small_chunks):
    """Also with several vocabulary chunks: a NaN logit alone in its thread's share of a chunk
    must survive the merge of the per-thread log-sum-exp states."""
    assert_rows_that_do_not_count_never_contribute("cuda", emulated, torch.bfloat16)


def test_emulated_gather_rows(emulated):
    hidden = torch.randn(7, 24, dtype=torch.bfloat16)
    positions = torch.tensor([6, -1, 0, 3, -1])
    rows = hidden.new_full((5, 24), float("nan"))  # poisoned: every element must be written
    cuda_impl.kernel_ops().gather_rows(hidden, positions, rows)
    expected = torch.where((positions >= 0)[:, None], hidden[positions.clamp(min=0)], 0)
    assert torch.equal(rows, expected)


# --------------------------------------------------------------------------- GPU tier
@pytest.mark.gpu
def test_extension_registers_its_ops(on_gpu):
    for name in ("attention_fwd", "attention_bwd", "block_sparse_fwd", "block_sparse_bwd", "gather_rows",
                 "masked_ce_chunk_stats", "masked_ce_finish", "masked_ce_chunk_grad"):
        assert hasattr(torch.ops.fastmlm_C, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen,head_dim", [(1, 32), (113, 64), (1023, 128), (257, 40), (300, 96)])
def test_gpu_attention_padded(on_gpu, dtype, seqlen, head_dim):
    mask = random_mask(3, seqlen, min_len=1).cuda()
    check_attention(on_gpu, dtype, 3, seqlen, 4, head_dim, mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_attention_packed(on_gpu, dtype):
    lengths = [1023, 0, 1, 17, 500]
    check_attention(on_gpu, dtype, 0, sum(lengths), 4, 64, cu_seqlens=cu_seqlens_of(lengths).cuda())


@pytest.mark.gpu
def test_gpu_attention_backward_is_deterministic(on_gpu):
    q, k, v = (torch.randn(4, 512, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = random_mask(4, 512, min_len=1).cuda()
    out = attention(q, k, v, attention_mask=mask, backend="cuda")
    dout = torch.randn_like(out)
    first = _grads(out, (q, k, v), dout)
    for _ in range(3):
        again = _grads(attention(q, k, v, attention_mask=mask, backend="cuda"), (q, k, v), dout)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
def test_gpu_binding_checks_inputs(on_gpu):
    q = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.float16)
    assert cuda_attention.why_not(AttentionInputs(q, q, q, None, None, 64, 0.125)) is None
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], device="cuda")
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fastmlm_C.attention_fwd(q.transpose(1, 2), q, q, None, None, None, 64, 0.125, out, lse)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fastmlm_C.attention_fwd(q, q, q, None, None, None, 64, 0.125, out, lse.half())


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gpu_attention_strided_views_and_padding(on_gpu, layout):
    assert_strided_views_match(_cuda_attention, layout, "transposed", torch.bfloat16, on_gpu)
    assert_padding_never_contributes(_cuda_attention, layout, torch.bfloat16, on_gpu)


@pytest.mark.gpu
def test_gpu_attention_nan_in_gives_nan_out(on_gpu):
    assert_nan_in_gives_nan_out(_cuda_attention, torch.bfloat16, on_gpu)


@pytest.mark.gpu
def test_gpu_attention_left_padding_longer_than_a_key_tile(on_gpu):
    mask = torch.ones(2, 100, dtype=torch.bool, device="cuda")
    mask[1, :70] = False
    check_attention(on_gpu, torch.bfloat16, 2, 100, 2, 64, mask=mask)


@pytest.mark.gpu
def test_gpu_masked_ce_strided_and_rows_that_do_not_count(on_gpu):
    assert_strided_inputs_match("cuda", on_gpu)
    assert_rows_that_do_not_count_never_contribute("cuda", on_gpu, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
def test_gpu_masked_ce(on_gpu, dtype, use_positions):
    options = dict(label_smoothing=0.1, z_loss=1e-4) if use_positions else {}
    check_masked_ce(on_gpu, dtype, 2048, 256, 30522, use_positions, options)
