"""masked_lm_loss fast backends on the cases issue 4 names: how many rows are masked, fp16 extremes,
grad_output, odd sizes, positions with padding and duplicates, argmax ties, opcheck, BERT-base (GPU).

Every case runs each backend of ``FAST_BACKENDS`` and applies the error-ratio rule of
ARCHITECTURE.md to the loss and to all three gradients.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlm.ops import masked_lm_loss, masked_lm_loss_reference
from fastmlm.ops.masked_ce import REGISTRY, MaskedCEInputs, row_index
from helpers import assert_error_ratio
from test_masked_ce import FAST_BACKENDS, make_batch, skip_if_unsupported

IGNORE = -100


def reduce_rows(rows, labels, positions, reduction):
    """The op's reduction applied to per-row losses from masked_lm_loss_reference."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / row_index(labels, positions, IGNORE)[1].sum().clamp(min=1)


def check_backend(backend, h, w, b, labels, dtype, positions=None, reduction="mean", grad=None,
                  reference_positions=None, **options):
    """Run ``backend`` in ``dtype``; compare loss, accuracy and d_hidden/d_weight/d_bias with the reference.

    The exact reference runs in fp64, the low-precision one in ``dtype`` with ``upcast=False``.
    ``grad`` is the incoming gradient (shaped like the loss). ``reference_positions`` lets the
    references project only the masked rows where the backend gets none (same mean and sum).
    """
    ref_positions = positions if reference_positions is None else reference_positions
    exact_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    low_in = [t.detach().to(dtype).requires_grad_() for t in (h, w, b)]
    kw = dict(reduction=reduction, **options)

    fast, correct = masked_lm_loss(*low_in, labels, positions=positions, backend=backend, return_accuracy=True, **kw)
    exact, exact_correct = masked_lm_loss(*exact_in, labels, positions=ref_positions, backend="reference",
                                          return_accuracy=True, **kw)
    lowp_rows = masked_lm_loss_reference(*low_in, labels, ref_positions, IGNORE, options.get("label_smoothing", 0.0),
                                         options.get("z_loss", 0.0), upcast=False)[0]
    lowp = reduce_rows(lowp_rows, labels, ref_positions, reduction)

    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    floor = 1e-5 if dtype == torch.float32 else 0.0
    # The loss is reduced in fp32: allow its own rounding (one ulp of the input dtype) on top of the rule.
    ulp = torch.finfo(dtype).eps * exact.detach().abs().max().item() if exact.numel() else 0.0
    assert_error_ratio(fast, exact, lowp, 2.0, floor + ulp, "loss")
    if dtype == torch.float32:
        assert correct.item() == exact_correct.item()
    grad = torch.ones_like(exact) if grad is None else grad.to(exact.device)
    names = ("d_hidden", "d_weight", "d_bias")
    fast_g = torch.autograd.grad(fast, low_in, grad)
    exact_g = torch.autograd.grad(exact, exact_in, grad.to(exact.dtype))
    lowp_g = torch.autograd.grad(lowp, low_in, grad.to(lowp.dtype))
    for name, f, e, l in zip(names, fast_g, exact_g, lowp_g):
        assert f.dtype == dtype, f"{name}: dtype {f.dtype}"
        assert_error_ratio(f, e, l, 3.0, floor, name)
    return fast, fast_g


def masked_positions(labels, pad=0):
    """The (static-length) position list of labels != ignore, padded with -1 at the front."""
    masked = (labels != IGNORE).nonzero()[:, 0]
    return torch.cat([torch.full((pad,), -1, device=labels.device), masked])


# --------------------------------------------------------------------------- how many rows are masked
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("how_many", ["none", "one", "all", "15%"])
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
def test_masked_count(backend, how_many, use_positions, device):
    h, w, b, labels = make_batch(45, 24, 123, rate=1.0, device=device)
    if how_many == "none":
        labels[:] = IGNORE
    elif how_many == "one":
        labels[labels != IGNORE] = IGNORE
        labels[17] = 5
    elif how_many == "15%":
        labels[torch.rand(45, device=device) >= 0.15] = IGNORE
        labels[3] = 0
    positions = masked_positions(labels, pad=3) if use_positions else None
    fast, grads = check_backend(backend, h, w, b, labels, torch.float32, positions, reduction="sum")
    if how_many == "none":  # loss 0 and zero gradients exactly, not merely small
        assert fast.item() == 0.0
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_positions_with_padding_only_or_ignored_labels(backend, device):
    """Positions that are all -1, or point at ignore_index labels: nothing counts."""
    h, w, b, labels = make_batch(12, 8, 31, rate=0.0, device=device)
    positions = torch.tensor([-1, 4, -1, 7, 4], device=device)
    inputs = [t.requires_grad_() for t in (h, w, b)]
    for reduction in ("mean", "none"):
        loss, correct = masked_lm_loss(*inputs, labels, positions=positions, reduction=reduction,
                                       return_accuracy=True, backend=backend)
        assert (loss == 0).all() and correct.item() == 0
        for g in torch.autograd.grad(loss.sum(), inputs):
            assert torch.isfinite(g).all() and (g == 0).all()


# --------------------------------------------------------------------------- options, sizes, grad_output
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_grad_output_other_than_one(backend, reduction, device):
    h, w, b, labels = make_batch(40, 24, 123, rate=0.3, device=device)
    labels[0] = 9
    grad = torch.rand(40, device=device) * 2 - 0.5 if reduction == "none" else torch.tensor(-1.7, device=device)
    check_backend(backend, h, w, b, labels, torch.float32, reduction=reduction, grad=grad,
                  label_smoothing=0.2, z_loss=1e-2)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden,vocab", [(40, 257), (72, 129)])
def test_odd_hidden_and_vocab(backend, dtype, hidden, vocab, device):
    skip_if_unsupported(backend, dtype, device)
    h, w, b, labels = make_batch(37, hidden, vocab, rate=0.5, device=device)
    labels[1] = vocab - 1  # the last column, in a partial tile
    check_backend(backend, h, w, b, labels, dtype, masked_positions(labels, pad=2), label_smoothing=0.1)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_duplicate_positions_sum_their_gradients(backend, device):
    h, w, b, labels = make_batch(20, 24, 123, rate=0.4, device=device)
    labels[2] = 11
    positions = torch.tensor([2, -1, 2, 5, 2, -1, 19, 5], device=device)
    check_backend(backend, h, w, b, labels, torch.float32, positions, reduction="none",
                  grad=torch.rand(8, device=device) + 0.5, z_loss=1e-3)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_logits_near_the_fp16_limit(backend, device):
    """fp16 inputs whose logits reach 6e4 (the fp16 maximum is 65504): finite, and within the rule."""
    h, w, b, labels = make_batch(24, 16, 123, rate=1.0, dtype=torch.float64, device=device)
    w = w.half().double()
    h = (h * (6.0e4 / (h @ w.t() + b).abs().max())).half().double()
    logits = (h @ w.t() + b).abs().max()
    assert 5.8e4 < logits < 65504
    fast, grads = check_backend(backend, h, w, b, labels, torch.float16, label_smoothing=0.1, z_loss=1e-6)
    assert torch.isfinite(fast) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_argmax_ties_pick_the_first_index(backend, device):
    """Equal vocabulary rows in the same tile, another tile and another split of the Triton forward:
    the prediction is the first one, so only rows labelled with it count as correct."""
    vocab, first, near, later, last = 2100, 7, 50, 200, 2090
    # Integer entries: every dot product is exact, so the ties are exact too. The four rows are
    # all 2s, every other row has entries in [-2, 1]: z = h · w peaks exactly at those four.
    w = torch.randint(-2, 2, (vocab, 8)).float()
    w[first] = w[near] = w[later] = w[last] = 2.0
    h = w[first].repeat(6, 1)
    b = torch.zeros(vocab)
    labels = torch.tensor([first, last, first, near, later, first])
    _, correct = masked_lm_loss(h.to(device), w.to(device), b.to(device), labels.to(device),
                                return_accuracy=True, backend=backend)
    _, expected = masked_lm_loss(h, w, b, labels, return_accuracy=True, backend="reference")
    assert correct.item() == expected.item() == 3


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_accuracy_counts_correct_predictions(backend, device):
    h, w, b, labels = make_batch(60, 16, 123, rate=0.5, device=device)
    predicted = (h @ w.t() + b).argmax(-1)
    labels = torch.where((labels != IGNORE) & (torch.rand(60, device=device) < 0.5), predicted, labels)
    _, correct = masked_lm_loss(h, w, b, labels, return_accuracy=True, backend=backend)
    expected = ((predicted == labels) & (labels != IGNORE)).sum()
    assert expected.item() > 5 and correct.item() == expected.item()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triton_many_vocab_chunks_and_splits(dtype, use_positions, reduction, device, monkeypatch):
    """Small shapes fit one backward chunk and one forward split; shrink both so the multi-chunk
    accumulation and the split merge (what BERT-base shapes use) run here too: "none" takes the
    backward's vocabulary chunks, "sum" forward_and_grads' row chunks (d_weight accumulated)."""
    kernel = REGISTRY.module("triton")
    h, w, b, labels = make_batch(50, 24, 777, rate=0.4, device=device)
    labels[0] = 776
    positions = masked_positions(labels, pad=5) if use_positions else None
    rows = 50 if positions is None else positions.shape[0]
    monkeypatch.setattr(kernel, "WORKSPACE_ELEMENTS", rows * 256)  # chunks of 256, 256, 256, 9 columns
    monkeypatch.setattr(kernel, "VOCAB_PER_SPLIT", 128)  # one split per forward tile
    grad = torch.rand(rows, device=device) + 0.5 if reduction == "none" else None
    check_backend("triton", h, w, b, labels, dtype, positions, reduction=reduction, grad=grad, label_smoothing=0.1,
                  z_loss=1e-3)


# --------------------------------------------------------------------------- strided views, NaN
# Shared with the cuda backend's tests (test_cuda_kernels.py, on the kernel emulator).
def assert_strided_inputs_match(backend, device, dtype=torch.float32):
    """hidden (last-dim stride 2), weight (transposed), bias (stride 2), labels and positions
    (stride 2) as views give the loss and gradients of contiguous copies (to rounding, as in
    test_attention_triton.assert_strided_views_match)."""
    h, w, b, labels = make_batch(30, 16, 300, rate=0.4, dtype=dtype, device=device)
    labels[0] = 7
    positions = masked_positions(labels, pad=2)
    wide = torch.zeros(30, 32, dtype=dtype, device=device)
    wide[:, ::2] = h
    views = (wide[:, ::2], w.t().contiguous().t(), torch.stack([b, b], 1)[:, 0],
             torch.stack([labels, labels], 1)[:, 0], torch.stack([positions, positions], 1)[:, 0])
    assert not any(t.is_contiguous() for t in views)
    for use_positions in (False, True):
        results = []
        for hh, ww, bb, ll, pp in ((h, w, b, labels, positions), views):
            inputs = [t.detach().requires_grad_() for t in (hh, ww, bb)]
            loss = masked_lm_loss(*inputs, ll, positions=pp if use_positions else None, label_smoothing=0.1,
                                  backend=backend)
            results.append((loss, *torch.autograd.grad(loss, inputs)))
        for name, contiguous, strided in zip(("loss", "d_hidden", "d_weight", "d_bias"), *results):
            torch.testing.assert_close(strided, contiguous,
                                       msg=lambda m: f"{name}, strided inputs (positions: {use_positions}): {m}")


def assert_rows_that_do_not_count_never_contribute(backend, device, dtype=torch.float32):
    """NaN in every hidden row that does not count (ignored labels; with positions, also rows
    no position names and one an ignored label's position names) leaves the loss and the
    gradients as they are with zeros there, bit for bit; a NaN in a counted row, or in a weight
    row, gives a NaN loss (and lse) with neither label smoothing nor z-loss to carry it."""
    h, w, b, labels = make_batch(20, 16, 300, rate=0.3, dtype=dtype, device=device)
    labels[[0, 5]] = torch.tensor([3, 299], device=device)
    ignored = labels == IGNORE
    positions = torch.cat([masked_positions(labels, pad=2), ignored.nonzero()[:1, 0]])
    for pos in (None, positions):
        results = []
        for fill in (float("nan"), 0.0):
            inputs = [t.detach().clone().requires_grad_() for t in (h, w, b)]
            with torch.no_grad():
                inputs[0][ignored] = fill
            loss = masked_lm_loss(*inputs, labels, positions=pos, backend=backend)
            results.append((loss, *torch.autograd.grad(loss, inputs)))
        for name, poisoned, zeros in zip(("loss", "d_hidden", "d_weight", "d_bias"), *results):
            assert torch.isfinite(poisoned).all(), f"{name}: NaN in rows that do not count reached it"
            assert torch.equal(poisoned, zeros), f"{name}: rows that do not count changed it"
    kernel = REGISTRY.module(backend)
    for poison in ("hidden", "weight"):
        hh, ww = h.clone(), w.clone()
        (hh[5] if poison == "hidden" else ww[150]).fill_(float("nan"))
        loss, lse, _ = kernel.forward(MaskedCEInputs(hh, ww, b, labels, None, IGNORE, 0.0, 0.0))
        nan_rows = ~ignored if poison == "weight" else torch.arange(20, device=device) == 5
        assert loss[nan_rows].isnan().all() and lse[nan_rows].isnan().all(), f"NaN {poison}: NaN in, NaN out"
        assert torch.isfinite(loss[~nan_rows]).all()


@pytest.mark.interpreter
def test_triton_strided_inputs(device):
    assert_strided_inputs_match("triton", device)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN inputs
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_rows_that_do_not_count_never_contribute(device, dtype):
    assert_rows_that_do_not_count_never_contribute("triton", device, dtype)


# --------------------------------------------------------------------------- the custom op itself
@pytest.mark.interpreter
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
def test_opcheck_triton_backend(use_positions, device):
    h, w, b, labels = make_batch(12, 16, 19, rate=0.5, device=device)
    labels[1] = 2
    positions = torch.tensor([1, -1, 5, 1], device=device) if use_positions else None
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), labels, positions, IGNORE, 0.1, 1e-3, 1.0,
            "triton")
    torch.library.opcheck(torch.ops.fastmlm.masked_lm_loss_fwd.default, args)


@pytest.mark.interpreter
def test_opcheck_triton_reduced_op(device):
    h, w, b, labels = make_batch(12, 16, 19, rate=0.5, device=device)
    labels[1] = 2
    positions = torch.tensor([1, -1, 5, 1], device=device)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), labels, positions, IGNORE, 0.1, 1e-3, 1.0, True,
            "triton")
    torch.library.opcheck(torch.ops.fastmlm.masked_lm_loss_reduced.default, args)


@pytest.mark.interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_reduced_loss_takes_one_pass(reduction, device, monkeypatch):
    """mean/sum with gradients: forward_and_grads (logits stored once, several row chunks and
    vocabulary splits here); the backward kernels never run."""
    kernel = REGISTRY.module("triton")
    monkeypatch.setattr(kernel, "backward", lambda *a: pytest.fail("the backward kernels ran"))
    monkeypatch.setattr(kernel, "WORKSPACE_ELEMENTS", 40 * 300)  # row chunks of one tile (32 rows here)
    monkeypatch.setattr(kernel, "VOCAB_PER_SPLIT", 128)
    h, w, b, labels = make_batch(97, 24, 300, rate=0.6, device=device)
    labels[0] = 299
    check_backend("triton", h, w, b, labels, torch.float32, masked_positions(labels, pad=3), reduction=reduction,
                  grad=torch.tensor(-1.3), label_smoothing=0.1, z_loss=1e-3)


# --------------------------------------------------------------------------- GPU tier: BERT-base shapes
def bert_base_batch(seed=0):
    """32k tokens, H = 768, V = 30522, 15% masked, bf16 (on the GPU)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens, hidden, vocab = 32 * 1024, 768, 30522
    h = torch.randn(tokens, hidden, device="cuda", generator=gen)
    w = torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.02 * 3
    b = torch.randn(vocab, device="cuda", generator=gen) * 0.1
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    labels[torch.rand(tokens, device="cuda", generator=gen) >= 0.15] = IGNORE
    return h, w, b, labels


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
def test_bert_base_shapes_bf16(backend, use_positions):
    h, w, b, labels = bert_base_batch()
    masked = masked_positions(labels, pad=64)
    options = dict(label_smoothing=0.1, z_loss=1e-4) if use_positions else {}
    check_backend(backend, h, w, b, labels, torch.bfloat16, masked if use_positions else None,
                  grad=torch.tensor(0.5, device="cuda"), reference_positions=masked, **options)


@pytest.mark.gpu
def test_triton_forward_backward_never_sync_and_are_deterministic():
    """No host synchronisation inside the backend (CUDA sync debug mode raises on one), and
    bit-identical gradients from two runs (no atomics)."""
    kernel = REGISTRY.module("triton")
    h, w, b, labels = bert_base_batch(1)
    h, w, b = (t.bfloat16() for t in (h, w, b))
    args = (h, w, b, labels, None, IGNORE, 0.1, 1e-4)
    loss, lse, _ = kernel.forward(MaskedCEInputs(*args))  # warm-up: compiles the kernels
    grad_rows = torch.rand_like(loss)
    first = kernel.backward(MaskedCEInputs(*args), lse, grad_rows)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, lse, _ = kernel.forward(MaskedCEInputs(*args))
        second = kernel.backward(MaskedCEInputs(*args), lse, grad_rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    fused = kernel.forward_and_grads(MaskedCEInputs(*args), grad_rows)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = kernel.forward_and_grads(MaskedCEInputs(*args), grad_rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, c in zip(fused, again):
        assert torch.equal(a, c)


# --------------------------------------------------------------------------- compiles for a GPU, on any machine
@pytest.mark.interpreter
def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile every kernel for an H100 with its
    bf16 GPU configuration, on any machine (a subprocess: TRITON_INTERPRET=1 replaces @triton.jit)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from fastmlm.ops.kernels_path import import_module; "
            "import torch; import_module('fastmlm_kernels._masked_ce_compile').main([torch.bfloat16])")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok") == 7, done.stdout  # one line per kernel and variant (fused or not)


@pytest.mark.interpreter
def test_triton_keeps_the_max_masked_fraction_bound(device):
    """The kernels need no bound (programs past the counted rows exit), but max_masked_fraction means
    the same on every backend: more counted rows than ceil(f·R) + 64 stop the call (a device-side
    assertion on a GPU), whichever pass runs; exactly the bound fits."""
    if torch.device(device).type == "cuda":
        pytest.skip("a device-side assertion ends the CUDA context: checked under the interpreter")
    h, w, b, _ = make_batch(88, 8, 13, device=device)
    labels = torch.full((88,), IGNORE, device=device)
    labels[1:] = torch.randint(0, 13, (87,))  # the bound at f = 0.25: ceil(22) + 64 = 86
    for requires_grad, reduction in ((False, "mean"), (True, "mean"), (True, "none")):
        inputs = [t.clone().requires_grad_(requires_grad) for t in (h, w, b)]
        with pytest.raises(RuntimeError, match=r"the 86 of 88 rows .*max_masked_fraction=0.25"):
            loss = masked_lm_loss(*inputs, labels, backend="triton", reduction=reduction, max_masked_fraction=0.25)
            torch.autograd.grad(loss.sum(), inputs) if requires_grad else None
    labels[1] = IGNORE
    got = masked_lm_loss(h, w, b, labels, backend="triton", max_masked_fraction=0.25)
    torch.testing.assert_close(got, masked_lm_loss(h, w, b, labels, backend="reference"), rtol=1e-4, atol=1e-5)
