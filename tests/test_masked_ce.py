"""fastmlm.ops.masked_lm_loss: reference vs torch's cross_entropy, backends, edge cases, bad inputs."""
import sys

import pytest
import torch
import torch.nn.functional as F

from fastmlm.ops import masked_lm_loss, masked_lm_loss_reference
from fastmlm.ops import row_bound
from helpers import STRIDED_KINDS, assert_error_ratio, loss_route, strided_view

FAST_BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.interpreter),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(autouse=True)
def _fused_route(monkeypatch):
    """This file checks the torch backend's fused route (gradients computed in the forward) at
    small sizes too: the native route it takes there (autograd recording its forward) is checked
    against the reference by the test_native_route_* tests at the end."""
    loss_route(monkeypatch, "fused")


def skip_if_unsupported(backend, dtype, device):
    if backend == "triton" and dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        pytest.skip("the Triton interpreter's tl.dot is wrong for bf16; bf16 is checked on the GPU tier")


def make_batch(tokens, hidden, vocab, rate=0.15, dtype=torch.float32, scale=1.0, device="cpu"):
    h = torch.randn(tokens, hidden, dtype=dtype) * scale
    w = torch.randn(vocab, hidden, dtype=dtype) / hidden**0.5
    b = torch.randn(vocab, dtype=dtype) * 0.1
    labels = torch.randint(0, vocab, (tokens,))
    labels[torch.rand(tokens) >= rate] = -100
    return tuple(t.to(device) for t in (h, w, b, labels))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_reference_matches_torch_cross_entropy(label_smoothing):
    h, w, b, labels = make_batch(50, 12, 23, rate=0.3, dtype=torch.float64)
    loss = masked_lm_loss(h, w, b, labels, label_smoothing=label_smoothing, backend="reference")
    expected = F.cross_entropy(h @ w.t() + b, labels, ignore_index=-100, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss.double(), expected)


def test_z_loss_and_accuracy_by_hand():
    h, w, b, labels = make_batch(40, 8, 11, rate=0.5, dtype=torch.float64)
    loss, correct = masked_lm_loss(h, w, b, labels, z_loss=1e-2, reduction="sum", return_accuracy=True,
                                   backend="reference")
    logits = (h @ w.t() + b)[labels != -100]
    target = labels[labels != -100]
    lse = torch.logsumexp(logits, -1)
    expected = (lse - logits[torch.arange(len(target)), target] + 1e-2 * lse**2).sum()
    torch.testing.assert_close(loss.double(), expected)
    assert correct.item() == (logits.argmax(-1) == target).sum().item()


def test_positions_select_rows_and_none_reduction_shape():
    h, w, b, labels = make_batch(30, 8, 13, rate=0.2, dtype=torch.float64)
    masked = (labels != -100).nonzero()[:, 0]
    positions = torch.cat([masked, torch.full((5,), -1)])
    per_row = masked_lm_loss(h, w, b, labels, positions=positions, reduction="none", backend="reference")
    assert per_row.shape == positions.shape and (per_row[-5:] == 0).all()
    full = masked_lm_loss(h, w, b, labels, reduction="none", backend="reference")
    torch.testing.assert_close(per_row[: len(masked)], full[masked])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,hidden,vocab", [(1, 8, 123), (97, 24, 123), (64, 40, 3001)])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-3)], ids=["plain", "smooth+z"])
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
def test_backend_error_ratio(backend, dtype, tokens, hidden, vocab, options, use_positions, device):
    _check_error_ratio(backend, dtype, tokens, hidden, vocab, options, use_positions, device)


def _check_error_ratio(backend, dtype, tokens, hidden, vocab, options, use_positions, device, reduction="mean",
                       duplicates=False):
    """The error-ratio rule for the loss, its accuracy and its three gradients against the fp64
    reference, on fresh inputs; returns the backend's loss."""
    skip_if_unsupported(backend, dtype, device)
    h, w, b, labels = make_batch(tokens, hidden, vocab, dtype=torch.float64, device=device)
    labels[0] = 3  # at least one counted row
    positions = None
    if use_positions:
        masked = (labels != -100).nonzero()[:, 0]
        positions = torch.cat([torch.full((2,), -1, device=device), masked.flip(0)]
                              + ([masked[:2]] if duplicates else []))  # a repeated row counts twice
    exact_in = [t.requires_grad_() for t in (h, w, b)]
    low_in = [t.detach().to(dtype).requires_grad_() for t in (h, w, b)]
    kw = dict(positions=positions, reduction=reduction, **options)
    grad = torch.rand(()) + 0.5  # a grad_output other than 1

    exact = masked_lm_loss(*exact_in, labels, backend="reference", **kw)
    lowp_rows = masked_lm_loss_reference(*low_in, labels, positions, -100, options.get("label_smoothing", 0.0),
                                         options.get("z_loss", 0.0), upcast=False)[0]
    lowp = lowp_rows.sum() / (lowp_rows != 0).sum() if reduction == "mean" else lowp_rows.sum()
    fast, correct = masked_lm_loss(*low_in, labels, backend=backend, return_accuracy=True, **kw)
    _, exact_correct = masked_lm_loss(*exact_in, labels, backend="reference", return_accuracy=True, **kw)
    assert fast.dtype == torch.float32
    floor = 1e-5 if dtype == torch.float32 else 0.0
    # One scalar: allow its own rounding (one ulp of the input dtype) on top of the rule.
    assert_error_ratio(fast, exact, lowp, 2.0, floor + torch.finfo(dtype).eps * exact.abs().item(), "loss")
    if dtype == torch.float32:
        assert correct.item() == exact_correct.item()
    names = ("d_hidden", "d_weight", "d_bias")
    for name, f, e, l in zip(names, torch.autograd.grad(fast * grad, low_in), torch.autograd.grad(exact * grad, exact_in),
                             torch.autograd.grad(lowp * grad, low_in)):
        assert_error_ratio(f, e, l, 3.0, floor, name)
    return fast


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_masked_tokens_give_zero_loss_and_grads(backend, reduction, device):
    h, w, b, labels = make_batch(20, 8, 17, device=device)
    labels[:] = -100
    inputs = [t.requires_grad_() for t in (h, w, b)]
    loss, correct = masked_lm_loss(*inputs, labels, reduction=reduction, return_accuracy=True, backend=backend)
    assert (loss == 0).all() and correct.item() == 0
    for g in torch.autograd.grad(loss.sum(), inputs):
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_large_logits_stay_finite(backend, device):
    h, w, b, labels = make_batch(16, 8, 50, rate=1.0, scale=3000.0, device=device)  # logits in the tens of thousands
    inputs = [t.requires_grad_() for t in (h, w, b)]
    loss = masked_lm_loss(*inputs, labels, backend=backend)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_no_bias_and_3d_hidden(backend, device):
    h, w, _, labels = make_batch(24, 8, 19, rate=0.5, device=device)
    loss = masked_lm_loss(h.reshape(2, 12, 8), w, None, labels.reshape(2, 12), backend=backend)
    expected = F.cross_entropy(h @ w.t(), labels)
    torch.testing.assert_close(loss, expected)


def _call(**overrides):
    h, w, b, labels = make_batch(10, 8, 7)
    args = dict(hidden=h, weight=w, bias=b, labels=labels)
    args.update(overrides)
    return masked_lm_loss(args.pop("hidden"), args.pop("weight"), args.pop("bias"), args.pop("labels"), **args)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(hidden=torch.randn(10)), ValueError, "hidden must be"),
        (dict(weight=torch.randn(7, 9)), ValueError, "weight must be"),
        (dict(weight=torch.randn(7, 8, dtype=torch.float64)), ValueError, "dtype"),
        (dict(bias=torch.randn(6)), ValueError, "bias has 6"),
        (dict(labels=torch.zeros(9, dtype=torch.long)), ValueError, "labels shape"),
        (dict(labels=torch.zeros(10)), ValueError, "dtype"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
        (dict(label_smoothing=float("nan")), ValueError,
         r"label_smoothing must be a finite number in \[0.0, 1.0\), got nan"),
        (dict(label_smoothing=float("inf")), ValueError, "label_smoothing must be a finite number"),
        (dict(z_loss=float("nan")), ValueError, r"z_loss must be a finite number >= 0.0, got nan"),
        (dict(z_loss=float("inf")), ValueError, "z_loss must be a finite number >= 0.0, got inf"),
        (dict(z_loss=-1e-3), ValueError, "z_loss must be a finite number >= 0.0, got -0.001"),
        (dict(z_loss="1e-4"), ValueError, "z_loss must be a finite number >= 0.0, got '1e-4' \\(str\\)"),
        (dict(ignore_index=0), ValueError, "ignore_index"),
        (dict(hidden=torch.randn(10, 8).to_sparse()), ValueError, r"hidden must be a dense \(strided\) tensor"),
        (dict(labels=torch.zeros(10, dtype=torch.long).to_sparse()), ValueError, "labels must be a dense"),
        (dict(ignore_index=-100.0), ValueError, r"ignore_index must be a negative int .*got -100.0"),
        (dict(ignore_index=True), ValueError, r"ignore_index must be a negative int .*got True"),
        (dict(ignore_index=-2**64), ValueError, r"ignore_index must be a negative int"),
        (dict(labels=torch.full((10,), 7)), RuntimeError, "labels must be ignore_index"),
        (dict(positions=torch.tensor([3, 10])), RuntimeError, "positions must lie"),
        (dict(positions=torch.tensor([-2])), RuntimeError, "positions must lie"),
        (dict(max_masked_fraction=0.0), ValueError,
         r"max_masked_fraction must be None or a number in \(0, 1\] .*got 0.0"),
        (dict(max_masked_fraction=1.5), ValueError, r"max_masked_fraction must be .*got 1.5"),
        (dict(max_masked_fraction=float("nan")), ValueError, r"max_masked_fraction must be .*got nan"),
        (dict(max_masked_fraction=True), ValueError, r"max_masked_fraction must be .*got True"),
        (dict(max_masked_fraction="0.5"), ValueError, r"max_masked_fraction must be .*got '0.5'"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_inputs_have_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize("use_positions", [False, True])
def test_opcheck_torch_backend(use_positions):
    h, w, b, labels = make_batch(12, 8, 9, rate=0.5)
    labels[1] = 2
    positions = torch.tensor([1, -1, 5]) if use_positions else None
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), labels, positions, -100, 0.1, 0.0, 0.5, "torch")
    torch.library.opcheck(torch.ops.fastmlm.masked_lm_loss_fwd.default, args)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("positions", [None, torch.full((3,), -1)], ids=["labels", "positions"])
def test_empty_batch(backend, positions, device):
    h, w, b, _ = make_batch(0, 8, 7, device=device)
    positions = None if positions is None else positions.to(device)
    loss, correct = masked_lm_loss(h, w, b, torch.zeros(0, dtype=torch.long, device=device), positions=positions,
                                   return_accuracy=True, backend=backend)
    assert loss.item() == 0 and correct.item() == 0


# --------------------------------------------------------------------------- NaN, strides, sizes, fp64
CPU_BACKENDS = ["reference", "torch"]  # the kernel backends have the same checks in their own test files


def _loss_and_grads(backend, h, w, b, labels, **kw):
    inputs = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = masked_lm_loss(*inputs, labels, backend=backend, **kw)
    return [loss, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
def test_nan_in_rows_that_do_not_count_never_reaches_loss_or_grads(backend, use_positions):
    h, w, b, labels = make_batch(12, 8, 11, rate=0.0)
    labels[[1, 4, 7]] = torch.tensor([3, 0, 9])
    positions = torch.tensor([4, -1, 1, 7, -1]) if use_positions else None
    dirty = h.clone()
    dirty[[0, 2, 11]] = float("nan")  # ignore_index rows, never listed in positions
    dirty[5, 3] = float("inf")
    clean = _loss_and_grads(backend, h, w, b, labels, positions=positions, z_loss=1e-3, label_smoothing=0.1)
    got = _loss_and_grads(backend, dirty, w, b, labels, positions=positions, z_loss=1e-3, label_smoothing=0.1)
    for name, c, g in zip(["loss", "d_hidden", "d_weight", "d_bias"], clean, got):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, c, msg=name)
    # No row at all: the zero loss must not be built from the NaN either.
    no_rows = _loss_and_grads(backend, dirty, w, b, labels, positions=torch.zeros(0, dtype=torch.long))
    assert all(torch.isfinite(t).all() and (t == 0).all() for t in no_rows)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_a_counted_row_gives_nan_loss(backend):
    h, w, b, labels = make_batch(12, 8, 11, rate=0.0)
    labels[[1, 4]] = torch.tensor([3, 0])
    h[4, 2] = float("nan")
    assert masked_lm_loss(h, w, b, labels, backend=backend).isnan()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", STRIDED_KINDS)
def test_strided_inputs(backend, kind):
    """Views of hidden, weight, bias, labels and positions give the loss and gradients of contiguous copies."""
    h, w, b, labels = make_batch(20, 8, 13, rate=0.4)
    labels[0] = 5
    positions = (labels != -100).nonzero()[:, 0]
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    exact_in = [t.double().requires_grad_() for t in (h, w, b)]
    low_in = [t.clone().requires_grad_() for t in (h, w, b)]
    fast_in = [t.clone().requires_grad_() for t in (h, w, b)]
    for use_positions in (False, True):
        pos = strided_view(positions, "last_dim_stride_2") if use_positions else None
        exact = masked_lm_loss(*exact_in, labels, positions=pos, backend="reference", **kw)
        rows = masked_lm_loss_reference(*low_in, labels, pos, -100, upcast=False, **kw)[0]
        lowp = rows.sum() / (labels != -100).sum()
        views = [strided_view(t, k) for t, k in zip(fast_in, (kind, kind, "last_dim_stride_2"))]  # bias is 1-d
        fast = masked_lm_loss(*views, strided_view(labels, "interleaved"), positions=pos, backend=backend, **kw)
        assert_error_ratio(fast, exact, lowp, 2.0, 1e-5 + torch.finfo(torch.float32).eps * exact.abs().item(), "loss")
        for name, f, e, l in zip(["d_hidden", "d_weight", "d_bias"], torch.autograd.grad(fast, fast_in),
                                 torch.autograd.grad(exact, exact_in), torch.autograd.grad(lowp, low_in)):
            assert_error_ratio(f, e, l, 3.0, 1e-5, name)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_hidden_size_zero_has_the_defined_result(backend, use_bias, device):
    """With no hidden features the logits are the bias (or zeros): a plain cross-entropy over them."""
    labels = torch.tensor([2, -100, 0, 4], device=device)
    h = torch.zeros(4, 0, device=device, requires_grad=True)
    w = torch.zeros(5, 0, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True) if use_bias else None
    loss = masked_lm_loss(h, w, b, labels, backend=backend)
    logits = (b if use_bias else torch.zeros(5, device=device)).expand(4, 5)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    grads = torch.autograd.grad(loss, [t for t in (h, w, b) if t is not None])
    assert grads[0].shape == (4, 0) and grads[1].shape == (5, 0)
    if use_bias:
        torch.testing.assert_close(grads[2], torch.autograd.grad(F.cross_entropy(logits, labels), b)[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64_inputs_give_fp64_loss_and_pass_gradcheck(backend):
    h, w, b, labels = make_batch(6, 4, 7, rate=0.5, dtype=torch.float64)
    labels[0] = 1
    positions = torch.tensor([0, -1, 3, 5])
    assert masked_lm_loss(h, w, b, labels, backend=backend).dtype == torch.float64
    assert masked_lm_loss(h, w, b, labels, reduction="none", backend=backend).dtype == torch.float64
    assert masked_lm_loss(h, w, b, labels, positions=torch.full((2,), -1), backend=backend).dtype == torch.float64
    for pos in (None, positions):
        def fn(h, w, b):
            return masked_lm_loss(h, w, b, labels, positions=pos, label_smoothing=0.1, z_loss=1e-2, backend=backend)
        assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in (h, w, b)])


# --------------------------------------------------------------------------- gradients in the forward (issue 16)
def _reference_loss_and_grads(h, w, b, labels, positions=None, reduction="mean", grad=1.0, **kw):
    """fp64 reference: the loss and grad * d(loss)/d(h, w, b)."""
    exact = [t.detach().double().requires_grad_() for t in (h, w, b)]
    loss = masked_lm_loss(*exact, labels, positions=positions, reduction=reduction, backend="reference", **kw)
    return loss, torch.autograd.grad(loss * grad, exact)


def _assert_close_to_reference(got, want, names=("loss", "d_hidden", "d_weight", "d_bias")):
    for name, g, e in zip(names, got, want):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6, msg=name)


def test_reduced_loss_computes_gradients_in_the_forward(monkeypatch):
    """mean/sum with gradients: the backend runs once, in the forward; the backward only scales."""
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    calls = []
    fused = torch_backend.reduced
    monkeypatch.setattr(torch_backend, "reduced", lambda *a: calls.append(a[1:]) or fused(*a))
    monkeypatch.setattr(torch_backend, "forward_and_grads", lambda *a: pytest.fail("per-row gradients on the CPU"))
    monkeypatch.setattr(torch_backend, "backward", lambda *a: pytest.fail("the backward ran a second pass"))
    h, w, b, labels = make_batch(30, 8, 37, rate=0.4)
    labels[0] = 4
    inputs = [t.requires_grad_() for t in (h, w, b)]
    loss = masked_lm_loss(*inputs, labels, backend="torch", label_smoothing=0.1, z_loss=1e-3)
    assert calls == [(True, True)]  # (mean, grads)
    grads = torch.autograd.grad(loss * -2.5, inputs)  # a grad_output other than 1
    assert len(calls) == 1
    _, want = _reference_loss_and_grads(h, w, b, labels, grad=-2.5, label_smoothing=0.1, z_loss=1e-3)
    _assert_close_to_reference(grads, want, names=("d_hidden", "d_weight", "d_bias"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_loss_backward_twice_with_retain_graph(reduction):
    """The first backward hands over the gradients it scaled in place; a second one must still be right."""
    h, w, b, labels = make_batch(25, 8, 29, rate=0.5)
    labels[3] = 7
    inputs = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = masked_lm_loss(*inputs, labels, reduction=reduction, backend="torch")
    (loss * 3.0).backward(retain_graph=True)
    first = [t.grad.clone() for t in inputs]
    (loss * -0.5).backward()  # accumulates: 3.0 - 0.5
    _, want3 = _reference_loss_and_grads(h, w, b, labels, reduction=reduction, grad=3.0)
    _, want = _reference_loss_and_grads(h, w, b, labels, reduction=reduction, grad=2.5)
    _assert_close_to_reference(first, want3, names=("d_hidden", "d_weight", "d_bias"))
    _assert_close_to_reference([t.grad for t in inputs], want, names=("d_hidden", "d_weight", "d_bias"))


def test_no_gradients_kept_without_requires_grad(monkeypatch):
    """No input needs gradients (or grad mode is off): the forward-only op runs, no gradient is computed."""
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    monkeypatch.setattr(torch_backend, "forward_and_grads", lambda *a: pytest.fail("computed unwanted gradients"))
    h, w, b, labels = make_batch(20, 8, 17, rate=0.5)
    labels[0] = 1
    want = masked_lm_loss(h, w, b, labels, backend="reference")
    torch.testing.assert_close(masked_lm_loss(h, w, b, labels, backend="torch"), want)
    with torch.no_grad():
        got = masked_lm_loss(h.requires_grad_(), w, b, labels, backend="torch")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("chunk_rows", [None, 2], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(label_smoothing=0.1, z_loss=1e-2)],
                         ids=["plain", "smooth", "smooth+z"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_loss_without_gradients_matches_the_reference(chunk_rows, options, reduction, monkeypatch):
    """The forward-only reduced loss (ATen's cross-entropy without a z-loss, the lse terms with one)
    and its accuracy, on fresh inputs with duplicated positions, against the fp64 reference."""
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    vocab = 29
    if chunk_rows:
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk_rows * vocab)
    h, w, b, labels = make_batch(37, 8, vocab, rate=0.4, dtype=torch.float64, scale=3.0)
    labels[[1, 2]] = torch.tensor([5, 6])
    labels[::3] = (h @ w.t() + b)[::3].argmax(1)  # rows the accuracy counts as correct
    for positions in (None, torch.tensor([2, -1, 1, 2, 0, 30])):
        kw = dict(positions=positions, reduction=reduction, return_accuracy=True, **options)
        want, want_correct = masked_lm_loss(h, w, b, labels, backend="reference", **kw)
        got, correct = masked_lm_loss(h.float(), w.float(), b.float(), labels, backend="torch", **kw)
        assert got.dtype == torch.float32 and correct.dtype == torch.int64
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert correct.item() == want_correct.item() > 0


@pytest.mark.parametrize("static_rows", [False, True], ids=["compacted", "static"])
def test_torch_forward_and_grads_rows_match_the_reference(static_rows, monkeypatch):
    """The per-row outputs of forward_and_grads (loss, lse, correct; what any backward may rely on),
    without z-loss, where nothing else reads lse; duplicated positions and rows that do not count."""
    from fastmlm.ops.masked_ce import MaskedCEInputs
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    if static_rows:
        monkeypatch.setattr(torch_backend, "COMPACT_DEVICES", ())
    h, w, b, labels = make_batch(21, 8, 17, rate=0.5, dtype=torch.float64, scale=4.0)
    labels[[0, 3]] = torch.tensor([(h[0] @ w.t() + b).argmax(), 2])
    for positions in (None, torch.tensor([3, -1, 0, 3, 20])):
        inputs = MaskedCEInputs(h, w, b, labels, positions, -100, 0.1, 0.0)
        grad_rows = torch.rand(inputs.num_rows, dtype=torch.float64)
        got = torch_backend.forward_and_grads(inputs, grad_rows)[:3]
        want = masked_lm_loss_reference(h, w, b, labels, positions, -100, 0.1, 0.0)
        for name, g, e in zip(("loss", "lse", "correct"), got, want):
            torch.testing.assert_close(g, e, msg=name)
        assert want[2].any()


def test_only_some_inputs_need_gradients():
    h, w, b, labels = make_batch(20, 8, 17, rate=0.5)
    labels[0] = 1
    hidden = h.clone().requires_grad_()  # weight and bias frozen
    loss = masked_lm_loss(hidden, w, b, labels, backend="torch")
    (d_hidden,) = torch.autograd.grad(loss, hidden)
    _, want = _reference_loss_and_grads(h, w, b, labels)
    _assert_close_to_reference([d_hidden], want[:1], names=("d_hidden",))


@pytest.mark.parametrize("static_rows", [False, True], ids=["compacted", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
def test_torch_backend_many_chunks(static_rows, dtype, use_positions, monkeypatch):
    """Several row chunks (one reused logits buffer, d_weight written then accumulated), duplicated
    positions, and both row plans: compacted (CPU) and static (every row projected, as on CUDA)."""
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 3 * 41)  # 3 rows of V = 41 per chunk
    if static_rows:
        monkeypatch.setattr(torch_backend, "COMPACT_DEVICES", ())
    h, w, b, labels = make_batch(23, 16, 41, rate=0.5, dtype=torch.float64)
    labels[[0, 5]] = torch.tensor([40, 2])
    h[labels == -100] = float("nan")  # rows that do not count never reach anything
    positions = torch.tensor([5, -1, 0, 5] + (labels != -100).nonzero()[:, 0].tolist()) if use_positions else None
    clean = torch.where(torch.isnan(h), 0.0, h)
    exact_in = [t.clone().requires_grad_() for t in (clean, w, b)]
    low_in = [t.to(dtype).requires_grad_() for t in (h, w, b)]
    kw = dict(positions=positions, label_smoothing=0.1, z_loss=1e-3, reduction="sum")
    exact = masked_lm_loss(*exact_in, labels, backend="reference", **kw)
    low_ref = [t.to(dtype).requires_grad_() for t in (clean, w, b)]
    lowp = masked_lm_loss_reference(*low_ref, labels, positions, -100, 0.1, 1e-3, upcast=False)[0].sum()
    fast = masked_lm_loss(*low_in, labels, backend="torch", **kw)
    floor = 1e-5 if dtype == torch.float32 else 0.0
    assert_error_ratio(fast, exact, lowp, 2.0, floor + torch.finfo(dtype).eps * exact.abs().item(), "loss")
    for name, f, e, l in zip(("d_hidden", "d_weight", "d_bias"), torch.autograd.grad(fast, low_in),
                             torch.autograd.grad(exact, exact_in), torch.autograd.grad(lowp, low_ref)):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
        assert_error_ratio(f, e, l, 3.0, floor, name)


def test_torch_backend_projects_only_the_counted_rows(monkeypatch):
    """Without positions, on the CPU, the cost follows the masked count, not the token count."""
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    rows = []
    logits = torch_backend._logits
    monkeypatch.setattr(torch_backend, "_logits", lambda h, *a, **k: rows.append(h.shape[0]) or logits(h, *a, **k))
    h, w, b, labels = make_batch(200, 8, 31, rate=0.0)
    labels[[3, 50, 199]] = torch.tensor([1, 2, 3])
    for requires_grad in (False, True):
        rows.clear()
        masked_lm_loss(*[t.clone().requires_grad_(requires_grad) for t in (h, w, b)], labels, backend="torch")
        assert rows == [3]


@pytest.mark.parametrize("mean", [True, False])
def test_opcheck_reduced_op(mean):
    h, w, b, labels = make_batch(12, 8, 9, rate=0.5)
    labels[1] = 2
    for positions in (None, torch.tensor([1, -1, 5, 1])):
        args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), labels, positions, -100, 0.1, 1e-3, 0.5,
                mean, "torch")
        torch.library.opcheck(torch.ops.fastmlm.masked_lm_loss_reduced.default, args)


def test_reduced_loss_under_torch_compile():
    h, w, b, labels = make_batch(16, 8, 13, rate=0.5)
    labels[2] = 3

    def step(h, w, b):
        return masked_lm_loss(h, w, b, labels, label_smoothing=0.1, backend="torch")

    got_in = [t.clone().requires_grad_() for t in (h, w, b)]
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*got_in)
    got.backward()
    want, grads = _reference_loss_and_grads(h, w, b, labels, label_smoothing=0.1)
    _assert_close_to_reference([got, *(t.grad for t in got_in)], [want, *grads])


# ------------------------------------------------------------- a static bound without positions on CUDA (issue 16)
BOUNDED_PATHS = ["torch-cuda-emulated", "cuda-emulated"]


@pytest.fixture
def bounded(monkeypatch):
    """A bound of ceil(0.25 R) + 2 rows without positions, on the CUDA row plan of both backends
    (the torch backend compacts on the host only on COMPACT_DEVICES), through the default fraction
    that CUDA inputs get (DEFAULT_MAX_MASKED_FRACTION, here for the CPU tensors that stand in)."""
    import fastmlm.ops  # noqa: F401
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    monkeypatch.setattr(torch_backend, "COMPACT_DEVICES", ())
    monkeypatch.setattr(sys.modules["fastmlm.ops.masked_ce"], "DEFAULT_MAX_MASKED_FRACTION", {"cpu": 0.25})
    monkeypatch.setattr(sys.modules["fastmlm.ops.row_bound"], "SLACK_ROWS", 2)
    return torch_backend


def _batch_with_count(tokens, hidden, vocab, count, dtype=torch.float64):
    """A batch whose ``count`` counted rows sit at random tokens; NaN in every row that does not count;
    hidden is a transposed view (strided)."""
    h = torch.randn(hidden, tokens, dtype=dtype).t()
    w = torch.randn(vocab, hidden, dtype=dtype) / hidden**0.5
    b = torch.randn(vocab, dtype=dtype) * 0.1
    labels = torch.full((tokens,), -100)
    labels[torch.randperm(tokens)[:count]] = torch.randint(0, vocab, (count,))
    h[labels == -100] = float("nan")
    return h, w, b, labels


@pytest.mark.parametrize("path", BOUNDED_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bounded_rows_match_the_reference(bounded, path, dtype, reduction):
    """(a) Without positions, the bounded row plan: loss and gradients by the error-ratio rule."""
    from backend_params import running

    h, w, b, labels = _batch_with_count(61, 16, 37, count=13)  # bound: ceil(61 / 4) + 2 = 18 rows
    clean = torch.where(torch.isnan(h), 0.0, h)
    grad_rows = torch.rand(61, dtype=torch.float64) + 0.5  # per-row weights other than 1 ("none")
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction)

    def total(rows):
        return rows if reduction == "mean" else (rows * grad_rows.to(rows.dtype)).sum()

    exact_in = [t.clone().requires_grad_() for t in (clean, w, b)]
    exact = total(masked_lm_loss(*exact_in, labels, backend="reference", **kw))
    low_ref = [t.to(dtype).requires_grad_() for t in (clean, w, b)]
    lowp_rows = masked_lm_loss_reference(*low_ref, labels, None, -100, 0.1, 1e-3, upcast=False)[0]
    lowp = total(lowp_rows.sum() / (labels != -100).sum() if reduction == "mean" else lowp_rows)
    low_in = [t.to(dtype).requires_grad_() for t in (h, w, b)]
    with running(path) as (backend, _):
        with torch.no_grad():
            no_grad = masked_lm_loss(*low_in, labels, backend=backend, **kw)
        fast = total(masked_lm_loss(*low_in, labels, backend=backend, **kw))
        grads = torch.autograd.grad(fast, low_in)
    floor = 1e-5 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(total(no_grad), fast.detach())
    assert_error_ratio(fast, exact, lowp, 2.0, floor + torch.finfo(dtype).eps * exact.abs().item(), "loss")
    for name, f, e, l in zip(("d_hidden", "d_weight", "d_bias"), grads, torch.autograd.grad(exact, exact_in),
                             torch.autograd.grad(lowp, low_ref)):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
        assert_error_ratio(f, e, l, 3.0, floor, name)


def _rows_seen(path, monkeypatch):
    """The list that collects how many rows each projection multiplies, on ``path``."""
    seen = []
    if path == "torch-cuda-emulated":
        from fastmlm.ops.torch_impl import masked_ce as module

        logits = module._logits
        monkeypatch.setattr(module, "_logits", lambda h, *a, **k: seen.append(h.shape[0]) or logits(h, *a, **k))
    else:
        from fastmlm.ops.cuda_impl import masked_ce as module

        rows_and_targets = module._rows_and_targets
        monkeypatch.setattr(module, "_rows_and_targets",
                            lambda inputs: seen.append(inputs.num_rows) or rows_and_targets(inputs))
    return seen


@pytest.mark.parametrize("path", BOUNDED_PATHS)
def test_bounded_rows_follow_the_masked_count(bounded, path, monkeypatch):
    """(b) The projection multiplies the B bounded rows, not the T tokens; B = T at the default fraction 1.0."""
    from backend_params import running

    seen = _rows_seen(path, monkeypatch)
    h, w, b, labels = _batch_with_count(200, 8, 31, count=30, dtype=torch.float32)
    assert row_bound.counted_bound(200, 0.25) == 52  # ceil(0.25 * 200) + 2
    with running(path) as (backend, _):
        for reduction, requires_grad in (("mean", False), ("mean", True), ("none", True)):
            seen.clear()
            inputs = [t.clone().requires_grad_(requires_grad) for t in (h, w, b)]
            loss = masked_lm_loss(*inputs, labels, backend=backend, reduction=reduction)
            if reduction == "none":
                torch.autograd.grad(loss.sum(), inputs)  # the separate backward is bounded too
            assert seen and set(seen) == {52}, (reduction, requires_grad, seen)
        seen.clear()
        masked_lm_loss(h, w, b, labels, backend=backend, max_masked_fraction=1.0)
        assert seen == [200]


@pytest.mark.parametrize("path", BOUNDED_PATHS)
def test_bounded_rows_overflow_stops_with_a_clear_error(bounded, path):
    """(c) More counted rows than the bound: an error naming the bound and the ways past it, never a
    loss over some of the rows; exactly the bound still fits, and positions lift the bound."""
    from backend_params import running

    h, w, b, labels = _batch_with_count(40, 8, 11, count=13, dtype=torch.float32)  # bound: ceil(40 / 4) + 2 = 12 rows
    h = torch.where(torch.isnan(h), 0.0, h)
    with running(path) as (backend, _):
        for requires_grad in (False, True):
            inputs = [t.clone().requires_grad_(requires_grad) for t in (h, w, b)]
            with pytest.raises(RuntimeError, match=r"more rows count .* the 12 of 40 rows .*max_masked_fraction=0.25"):
                masked_lm_loss(*inputs, labels, backend=backend)
        positions = (labels != -100).nonzero()[:, 0]
        with_positions = masked_lm_loss(h, w, b, labels, positions=positions, backend=backend)
        want_positions = masked_lm_loss(h, w, b, labels, backend="reference")
        labels[positions[0]] = -100  # 12 counted rows: fits
        fits = masked_lm_loss(h, w, b, labels, backend=backend)
    want = masked_lm_loss(h, w, b, labels, backend="reference")
    torch.testing.assert_close(fits, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_positions, want_positions, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- max_masked_fraction: the per-call bound (issue 16)
def test_masked_fraction_bound_is_checked_on_the_cpu_too(monkeypatch):
    """Without positions at most ceil(f·R) + 64 rows may count; the CPU, which compacts on the host,
    checks the same bound as a GPU (there for free), so a call that would stop on CUDA stops here."""
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    assert row_bound.counted_bound(200, 0.25) == 114 and row_bound.counted_bound(200, 1.0) == 200
    assert row_bound.counted_bound(40, 0.25) == 40  # the slack covers small batches
    h, w, b, _ = make_batch(200, 8, 13)
    labels = torch.full((200,), -100)
    labels[torch.randperm(200)[:115]] = torch.randint(0, 13, (115,))
    for requires_grad in (False, True):
        inputs = [t.clone().requires_grad_(requires_grad) for t in (h, w, b)]
        for reduction in ("mean", "none"):
            with pytest.raises(RuntimeError, match=r"the 114 of 200 rows .*max_masked_fraction=0.25"):
                masked_lm_loss(*inputs, labels, backend="torch", reduction=reduction, max_masked_fraction=0.25)
    want = masked_lm_loss(h, w, b, labels, backend="reference")
    torch.testing.assert_close(masked_lm_loss(h, w, b, labels, max_masked_fraction=1.0), want)
    torch.testing.assert_close(masked_lm_loss(h, w, b, labels), want)  # None: no bound for CPU inputs
    positions = (labels != -100).nonzero()[:, 0]  # with positions, their length is the bound
    torch.testing.assert_close(masked_lm_loss(h, w, b, labels, positions=positions, max_masked_fraction=0.25), want)
    labels[(labels != -100).nonzero()[0, 0]] = -100  # 114 counted rows: exactly the bound fits
    torch.testing.assert_close(masked_lm_loss(h, w, b, labels, backend="torch", max_masked_fraction=0.25),
                               masked_lm_loss(h, w, b, labels, backend="reference"))


def test_masked_fraction_bound_stops_every_backend_choice_on_the_cpu():
    """The bound is checked at the op's boundary: under backend="auto" it is an error too, not a backend
    failure that falls back to the reference (and demotes the torch backend for the signature)."""
    import warnings

    h, w, b, _ = make_batch(200, 8, 13)
    labels = torch.randint(0, 13, (200,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no BackendFailed fallback warning either
        for backend in ("auto", "torch"):
            with pytest.raises(RuntimeError, match=r"the 66 of 200 rows .*max_masked_fraction=0.01"):
                masked_lm_loss(h, w, b, labels, backend=backend, max_masked_fraction=0.01)
        torch.testing.assert_close(masked_lm_loss(h, w, b, labels), masked_lm_loss(h, w, b, labels, backend="reference"))


def test_masked_fraction_reaches_the_bundle(monkeypatch):
    """None resolves per device type (0.5 for CUDA inputs); the value the backends receive."""
    import fastmlm.ops  # noqa: F401
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    op_module = sys.modules["fastmlm.ops.masked_ce"]
    assert op_module.DEFAULT_MAX_MASKED_FRACTION == {"cuda": 0.5}
    seen = []
    reduced = torch_backend.reduced
    monkeypatch.setattr(torch_backend, "reduced", lambda inputs, *a: seen.append(inputs.max_masked_fraction)
                        or reduced(inputs, *a))
    h, w, b, labels = make_batch(12, 8, 9, rate=0.5)
    labels[0] = 1
    for fraction in (None, 0.5, 1):
        masked_lm_loss(h, w, b, labels, max_masked_fraction=fraction)
    monkeypatch.setattr(op_module, "DEFAULT_MAX_MASKED_FRACTION", {"cpu": 0.3})  # as CUDA inputs get theirs
    op_module.REGISTRY.forget_failures()  # the default is resolved once per signature, and remembered
    masked_lm_loss(h, w, b, labels)
    assert seen == [1.0, 0.5, 1.0, 0.3]


def test_model_and_hf_patch_pass_their_compacted_rows_unbounded(monkeypatch):
    """fastmlm's model and fastmlm.hf.patch hand over rows that are the masked tokens already: they
    say max_masked_fraction=1.0, so the bound (0.5 by default on CUDA) never trips on them."""
    import fastmlm.hf  # noqa: F401  (the module fastmlm.hf.patch is shadowed by the function patch)
    import fastmlm.ops as ops
    from fastmlm.config import preset
    from fastmlm.model import FastMLMForMaskedLM

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("max_masked_fraction"))
        return masked_lm_loss(*args, **kwargs)

    hf_patch = sys.modules["fastmlm.hf.patch"]
    monkeypatch.setattr(ops, "masked_lm_loss", spy)
    monkeypatch.setattr(hf_patch, "masked_lm_loss", spy)
    model = FastMLMForMaskedLM(preset("tiny", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                      intermediate_size=32, max_position_embeddings=16))
    ids = torch.randint(5, 50, (2, 8))
    labels = torch.where(torch.rand(2, 8) < 0.5, ids, -100)
    labels[0, 0] = 7
    assert torch.isfinite(model(ids, labels=labels).loss)
    hidden, weight = torch.randn(2, 8, 16), torch.randn(50, 16)
    for num_items in (None, 3):
        hf_patch.masked_rows_loss(hidden, labels, lambda x: x, weight, None, num_items_in_batch=num_items)
    assert calls == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- the reduced path's sums (issue 22)
@pytest.mark.parametrize("chunk_rows", [None, 2], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(label_smoothing=0.1, z_loss=1e-2)],
                         ids=["plain", "smooth", "smooth+z"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_loss_with_gradients_matches_the_reference(chunk_rows, options, reduction, monkeypatch):
    """The torch backend's ``reduced`` with gradients sums the loss and the accuracy per chunk (ATen's
    nll_loss without a z-loss) and scales dz by one number: loss, n_correct and the gradients on
    fresh fp64 inputs, against the reference."""
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    vocab = 23
    if chunk_rows:
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 2 * chunk_rows * vocab)  # grads: half-size chunks
    h, w, b, labels = make_batch(19, 6, vocab, rate=0.5, dtype=torch.float64, scale=2.0)
    labels[[0, 1]] = torch.tensor([3, 22])
    labels[::4] = (h @ w.t() + b)[::4].argmax(1)  # rows the accuracy counts as correct
    inputs = [t.clone().requires_grad_() for t in (h, w, b)]
    got, correct = masked_lm_loss(*inputs, labels, backend="torch", reduction=reduction, return_accuracy=True,
                                  **options)
    want, want_correct = masked_lm_loss(h, w, b, labels, backend="reference", reduction=reduction,
                                        return_accuracy=True, **options)
    assert got.shape == () and got.dtype == torch.float64 and correct.dtype == torch.int64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert correct.item() == want_correct.item() > 0
    _, want_grads = _reference_loss_and_grads(h, w, b, labels, reduction=reduction, grad=0.75, **options)
    _assert_close_to_reference(torch.autograd.grad(got * 0.75, inputs), want_grads,
                               names=("d_hidden", "d_weight", "d_bias"))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_int32_labels_and_positions_match_int64(reduction, grad):
    """int32 labels and positions are accepted inputs: every torch-backend path (ATen's losses take
    int64 targets only) gives the int64 result."""
    h, w, b, labels = make_batch(21, 8, 13, rate=0.5)
    labels[[2, 3]] = torch.tensor([0, 12])
    for positions in (None, torch.tensor([3, -1, 2, 3, 7])):
        results = []
        for dtype in (torch.int64, torch.int32):
            inputs = [t.clone().requires_grad_(grad) for t in (h, w, b)]
            pos = None if positions is None else positions.to(dtype)
            loss = masked_lm_loss(*inputs, labels.to(dtype), positions=pos, reduction=reduction, backend="torch")
            results.append([loss, *(torch.autograd.grad(loss.sum(), inputs) if grad else ())])
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_second_backward_after_an_in_place_change_raises():
    """A retained graph's second backward recomputes the gradients from the inputs: an input changed
    in place in between is an error (as save_for_backward would raise), not a silent wrong gradient."""
    h, w, b, labels = make_batch(16, 8, 11, rate=0.5)
    labels[0] = 3
    inputs = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = masked_lm_loss(*inputs, labels, backend="torch")
    loss.backward(retain_graph=True)
    with torch.no_grad():
        inputs[1].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified (in place|by an inplace operation)"):
        loss.backward()


@pytest.mark.parametrize("path", ["c", "set", "numpy"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_value_checks_of_short_and_long_inputs(path, index_dtype, monkeypatch):
    """Labels and positions are value-checked on every call, read by the C helper, or as a Python
    set up to SHORT_IDS entries and with NumPy beyond: all reject the same values with the same message."""
    from fastmlm.ops import checks

    if path != "c":
        monkeypatch.setattr(checks, "native_boundary", None)
    if path == "numpy":
        monkeypatch.setattr(checks, "SHORT_IDS", 0)
    h, w, b, labels = make_batch(12, 4, 9, rate=0.5)
    labels[0] = 8

    def call(labels, positions=None):
        return masked_lm_loss(h, w, b, labels.to(index_dtype), backend="torch",
                              positions=None if positions is None else positions.to(index_dtype))

    assert torch.isfinite(call(labels, torch.tensor([0, -1, 11])))
    for value in (9, -1, -101):  # past the vocabulary, negative but not ignore_index
        wrong = labels.clone()
        wrong[5] = value
        with pytest.raises(RuntimeError, match=r"labels must be ignore_index=-100 or lie in \[0, 9\)"):
            call(wrong)
    for value in (12, -2):
        with pytest.raises(RuntimeError, match=r"positions must lie in \[-1, 12\)"):
            call(labels, torch.tensor([0, value]))


# --------------------------------------------------------------------------- the native route
def _assert_native(loss):
    """The loss came from the torch backend's native route: autograd's own nodes, not the op's."""
    assert loss.grad_fn is not None and "EagerReducedLoss" not in type(loss.grad_fn).__name__, loss.grad_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,hidden,vocab", [(1, 8, 123), (97, 24, 123), (64, 40, 301)])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-3)], ids=["plain", "smooth+z"])
@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_native_route_error_ratio(dtype, tokens, hidden, vocab, options, use_positions, reduction, monkeypatch):
    """Small CPU calls let autograd record the torch backend's forward (no gradients computed in
    the forward, no Python node): the error-ratio rule holds for the loss and its gradients,
    duplicated positions summing theirs."""
    loss_route(monkeypatch, "native")
    fast = _check_error_ratio("torch", dtype, tokens, hidden, vocab, options, use_positions, "cpu", reduction,
                              duplicates=True)
    _assert_native(fast)


@pytest.mark.parametrize("use_positions", [False, True], ids=["labels", "positions"])
def test_native_route_edge_cases(use_positions, monkeypatch):
    """The native route keeps the contract's edges: NaN or inf in rows that do not count reaches
    neither the loss nor a gradient; no counted row gives a zero loss with zero gradients for every
    input; a retained graph's second backward accumulates as the fused route's does."""
    h, w, b, labels = make_batch(12, 8, 11, rate=0.0)
    labels[[1, 4, 7]] = torch.tensor([3, 0, 9])
    positions = torch.tensor([4, -1, 1, 7, -1]) if use_positions else None
    dirty = h.clone()
    dirty[[0, 2, 11]] = float("nan")
    dirty[5, 3] = float("inf")
    kw = dict(positions=positions, z_loss=1e-3, label_smoothing=0.1)
    loss_route(monkeypatch, "fused")
    clean = _loss_and_grads("torch", h, w, b, labels, **kw)
    loss_route(monkeypatch, "native")
    inputs = [t.clone().requires_grad_() for t in (dirty, w, b)]
    loss = masked_lm_loss(*inputs, labels, backend="torch", **kw)
    _assert_native(loss)
    got = [loss, *torch.autograd.grad(loss, inputs)]
    for name, c, g in zip(["loss", "d_hidden", "d_weight", "d_bias"], clean, got):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, c, msg=name)

    none_count = labels.clone()
    none_count[:] = -100
    inputs = [t.clone().requires_grad_() for t in (dirty, w, b)]
    loss, correct = masked_lm_loss(*inputs, none_count, positions=positions, backend="torch", return_accuracy=True)
    assert loss.item() == 0 and correct.item() == 0 and loss.dtype == torch.float32
    assert all((g == 0).all() for g in torch.autograd.grad(loss, inputs))

    inputs = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = masked_lm_loss(*inputs, labels, positions=positions, backend="torch")
    (loss * 3.0).backward(retain_graph=True)
    (loss * -0.5).backward()
    _, want = _reference_loss_and_grads(h, w, b, labels, positions=positions, grad=2.5)
    _assert_close_to_reference([t.grad for t in inputs], want, names=("d_hidden", "d_weight", "d_bias"))


def test_ignore_index_may_be_a_numpy_integer():
    """An ignore_index read from a NumPy array (np.int64, np.int32) counts as the int it equals."""
    np = pytest.importorskip("numpy")
    h, w, b, labels = make_batch(12, 8, 9, rate=0.5)
    labels[0] = 3
    want = masked_lm_loss(h, w, b, labels)
    for value in (np.int64(-100), np.int32(-100)):
        torch.testing.assert_close(masked_lm_loss(h, w, b, labels, ignore_index=value), want, rtol=0, atol=0)
    other = torch.where(labels == -100, -7, labels)
    torch.testing.assert_close(masked_lm_loss(h, w, b, other, ignore_index=np.int64(-7)), want, rtol=0, atol=0)
