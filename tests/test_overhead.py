"""The per-signature memo and the unwrapped eager path (issue 22): what is remembered never skips a check.

Speed is measured by benchmarks/bench_overhead.py, not here; these tests pin down correctness:
a changed signature is checked again, value checks run on every call, a backend failure
empties the memo, and the eager path gives what the custom op gives (and yields to it under
a dispatch mode).
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmlm.ops import attention, attention_reference, checks, dispatch, masked_lm_loss
from fastmlm.ops.attention import REGISTRY as ATTENTION
from fastmlm.ops.dispatch import BackendFailed, call_key
from helpers import cu_seqlens_of, loss_route


def _packed(lengths=(5, 3), heads=2, head_dim=8, dtype=torch.float64, grad=False):
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, dtype=dtype, requires_grad=grad) for _ in range(3))
    return q, k, v, cu_seqlens_of(list(lengths))


# --------------------------------------------------------------------------- the key
def test_call_key_tells_apart_what_validation_tells_apart():
    x = torch.zeros(2, 3)
    assert call_key(x, 16) == call_key(torch.ones(2, 3), 16)  # values never count
    assert call_key(x, 16) != call_key(x, 16.0)  # an int max_seqlen passes, a float one fails
    assert call_key(x, 1) != call_key(x, True)
    assert call_key(x, float("nan")) != call_key(x, float("nan"))  # NaN never matches: always re-checked
    assert call_key(x) != call_key(x.t())  # strides count
    assert call_key(x) != call_key(x.double()) != call_key(x.requires_grad_())
    assert call_key(torch.zeros(2, device="meta")) is None  # tests stub devices with meta tensors
    assert call_key(torch.zeros(2, 2).to_sparse()) is None  # no strides to tell it apart: validated (and refused)
    assert call_key(x, [1, 2]) is None  # any other kind of argument: validate every time

    class Fraction(float):  # e.g. numpy.float64: equal to the float, but validation may see it differently
        pass
    assert call_key(x, Fraction(0.5)) is None


def test_the_c_call_key_is_built_and_builds_the_python_key():
    """The C helper (fastmlm/ops/_boundary.c, built by pip install -e .) gives exactly the key of
    dispatch._python_call_key, and None where it does: tensors of several kinds, views, scalars of
    each type, their subclasses, meta tensors, NaN, other objects."""
    assert dispatch._native_call_key is not None, "fastmlm.ops._boundary was not built (a C compiler is needed)"

    class Fraction(float):
        pass

    class Subclass(torch.Tensor):
        pass

    x = torch.zeros(2, 3)
    cases = [
        (), (x,), (x, 16), (x, 16.0), (x, True), (x, "auto"), (x, None, None), (x.t(), x[:, 1:]),
        (x.double().requires_grad_(), torch.nn.Parameter(torch.ones(3))), (x.as_subclass(Subclass),),
        (torch.zeros(0, 5, dtype=torch.int32), -100, 0.0, 0.1, None, "mean", "auto"),
        (x, float("nan")), (x, Fraction(0.5)), (x, [1, 2]), (x, torch.zeros(2, device="meta")), (object(),),
        (x.to_sparse(),), (torch.ones(2, 1).expand(2, 3).to_sparse(), x),
    ]
    for args in cases:
        native, python = dispatch._native_call_key(*args), dispatch._python_call_key(args)
        if python is None:
            assert native is None, args
        else:  # (a NaN is the same object in both keys here, so they compare equal)
            assert native == python and hash(native) == hash(python), args


# --------------------------------------------------------------------------- checks still fire
def test_a_changed_signature_is_checked_again():
    q, k, v, cu = _packed()
    attention(q, k, v, cu_seqlens=cu, max_seqlen=5)  # remembered
    with pytest.raises(ValueError, match="k has dtype torch.float32"):
        attention(q, k.float(), v, cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="max_seqlen must be a non-negative Python int, got 5.0"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=5.0)
    with pytest.raises(ValueError, match="max_seqlen must be a non-negative Python int, got True"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=True)
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite float, got nan"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=5, softmax_scale=math.nan)
    with pytest.raises(ValueError, match="v has shape"):
        attention(q, k, v[:-1], cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="k must be a torch.Tensor, got list"):
        attention(q, [1.0], v, cu_seqlens=cu, max_seqlen=5)


@pytest.mark.parametrize("bad,why", [([1, 5, 8], "starts past 0"), ([0, 6, 4], "decreases"),
                                     ([0, 5, 7], "ends short of total"), ([0, 2, 8], "too long for max_seqlen")])
def test_value_checks_run_on_every_call_of_a_remembered_signature(bad, why):
    q, k, v, cu = _packed()
    attention(q, k, v, cu_seqlens=cu, max_seqlen=5)
    attention(q, k, v, cu_seqlens=cu, max_seqlen=5)  # the same signature again: from the memo
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0, be non-decreasing, end at total_tokens=8"):
        attention(q, k, v, cu_seqlens=torch.tensor(bad, dtype=torch.int32), max_seqlen=5)


def _use_check_path(monkeypatch, path: str, short_name: str, short_size: int):
    """Send the value checks down one path: "c" (the C helper, which must be built here), "python"
    (``short_name`` entries read as a Python list or set), "numpy", or "assert_async" (the device one)."""
    if path == "c":
        assert checks.native_boundary is not None, "fastmlm.ops._boundary was not built (a C compiler is needed)"
    else:
        monkeypatch.setattr(checks, "native_boundary", None)
    monkeypatch.setattr(checks, "host_readable", lambda t: path != "assert_async")
    monkeypatch.setattr(checks, short_name, short_size if path == "python" else 0)


@pytest.mark.parametrize("path", ["c", "python", "numpy", "assert_async"])
def test_every_cu_seqlens_check_agrees(monkeypatch, path):
    """The CPU checks (the C helper, a Python list when short, NumPy when long) and the
    device-side assertion accept and refuse the same offsets."""
    _use_check_path(monkeypatch, path, "SHORT_CHECK", 64)
    good = [[0], [0, 0], [0, 3, 3, 8], [0, 5, 8]]
    bad = [[1, 8], [0, 9], [0, 6, 5, 8], [0, 6, 8], [0, -2, 8], [0, 2**31 - 1, -2**31 + 2, 8]]
    for offsets in good:
        checks.check_cu_seqlens("attention", torch.tensor(offsets, dtype=torch.int32), offsets[-1], 5)
    for offsets in bad:
        with pytest.raises(RuntimeError, match="fastmlm.ops.attention: cu_seqlens must start at 0"):
            checks.check_cu_seqlens("attention", torch.tensor(offsets, dtype=torch.int32), 8, 5)


@pytest.mark.parametrize("path", ["c", "python", "numpy", "assert_async"])
def test_every_id_check_agrees_with_the_rule(monkeypatch, path):
    """check_ids's four paths (the C helper for contiguous CPU tensors, a Python set when short,
    NumPy when long, the device-side assertion) accept exactly the tensors whose entries lie in
    [low, high) or equal ``allowed``: fresh random values, both index dtypes, 2-D and strided views
    (which the C path leaves to the others)."""
    _use_check_path(monkeypatch, path, "SHORT_IDS", 256)
    gen = torch.Generator().manual_seed(22)
    pool = torch.tensor([-101, -100, -2, -1, 0, 1, 5, 9, 10, 11])
    for trial in range(300):
        values = pool[torch.randint(0, len(pool), (int(torch.randint(0, 13, (1,), generator=gen)),), generator=gen)]
        low, high = [(0, 10), (-1, 10), (0, 1)][trial % 3]
        allowed = [None, -100, -1, 10][trial % 4]
        want = all(v == allowed or low <= v < high for v in values.tolist())
        t = values.to(torch.int32 if trial % 2 else torch.int64)
        if trial % 5 == 0:
            wide = t.new_zeros(t.numel(), 2)
            wide[:, 0] = t
            t = wide[:, 0]  # a strided view of the same values
        elif trial % 5 == 1 and t.numel() % 2 == 0 and t.numel():
            t = t.view(2, -1)
        if want:
            checks.check_ids("masked_lm_loss", t, low, high, "bad ids", allowed=allowed)
        else:
            with pytest.raises(RuntimeError, match="fastmlm.ops.masked_lm_loss: bad ids"):
                checks.check_ids("masked_lm_loss", t, low, high, lambda: "bad ids", allowed=allowed)


def test_a_failure_after_the_choice_was_remembered_still_falls_back(monkeypatch):
    q, k, v = (torch.randn(2, 7, 2, 8, dtype=torch.float64) for _ in range(3))
    ATTENTION.forget_failures()
    attention(q, k, v)  # auto -> torch, remembered
    monkeypatch.setattr(ATTENTION.module("torch"), "forward", lambda inputs, **options: (_ for _ in ()).throw(
        RuntimeError("simulated launch failure")))
    try:
        with pytest.warns(BackendFailed, match="simulated launch failure"):
            out = attention(q, k, v)
        torch.testing.assert_close(out, attention_reference(q, k, v)[0])
        assert not ATTENTION._memo  # the failure emptied the memo: the next call chooses afresh
        with pytest.raises(RuntimeError, match="simulated launch failure"):
            attention(q, k, v, backend="torch")  # an explicit backend still raises its own error
    finally:
        ATTENTION.forget_failures()


# --------------------------------------------------------------------------- the eager path
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["padded", "masked", "packed"])
def test_the_eager_path_matches_the_custom_op(layout):
    """Outputs and gradients of the unwrapped eager path equal the custom op's, bit for bit (same backend);
    under a dispatch mode (fake tensors, selective checkpointing) the custom op itself runs."""
    if layout == "packed":
        q, k, v, cu = _packed(grad=True)
        kwargs = {"cu_seqlens": cu, "max_seqlen": 5}
    else:
        q, k, v = (torch.randn(2, 6, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool) if layout == "masked" else None
        kwargs = {"attention_mask": mask}
    upstream = torch.randn_like(q)
    out, lse = attention(q, k, v, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    with _Ops() as mode:
        out2, lse2 = attention(q, k, v, return_lse=True, **kwargs)
        grads2 = torch.autograd.grad(out2, (q, k, v), upstream)
    assert torch.ops.fastmlm.attention_fwd.default in mode.seen
    assert torch.ops.fastmlm.attention_bwd.default in mode.seen
    for a, b in zip((out, lse, *grads), (out2, lse2, *grads2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # no autograd record at all
        out3 = attention(q.detach(), k.detach(), v.detach(), **kwargs)
    torch.testing.assert_close(out3, out, rtol=0, atol=0)
    assert not out3.requires_grad and not lse.requires_grad


def test_plain_eager_yields_to_modes_subclasses_and_transforms():
    x = torch.zeros(2)
    assert dispatch.plain_eager(x, None)
    assert dispatch.plain_eager(torch.nn.Parameter(x))  # the loss's tied weight is one
    assert not dispatch.plain_eager(torch.Tensor._make_subclass(type("Sub", (torch.Tensor,), {}), x))
    with _Ops():
        assert not dispatch.plain_eager(x)
    seen = []
    torch.func.grad(lambda t: seen.append(dispatch.plain_eager(t)) or t.sum())(torch.ones(2))
    assert seen == [False]


# --------------------------------------------------------------------------- the benchmark entry
def test_overhead_bench_runs_every_provider_or_says_why_and_reports_the_difference():
    from benchmarks import bench_overhead as bench
    from benchmarks.harness import Skip

    rows = []
    for shape in bench.shapes("smoke")[:2] + bench.shapes("smoke")[-2:]:  # attention-padded and the loss
        shape["calls"] = 1
        for provider in bench.providers(shape, "cpu"):
            try:
                bench.make(provider, shape, torch.float32, "cpu").check()
            except Skip as skip:
                assert str(skip), provider
                continue
            median_ms = {"fastmlm": 6.0, "backend": 4.0}.get(provider, 1.0)  # per step of 200 calls
            rows.append({"op": bench.OP, "metric": "time", "provider": provider, "dtype": "fp32",
                         "params": {**shape, "calls": 200}, "median": median_ms})
    report = bench.report(rows)
    assert "| attention-padded | fwd | fp32 | 30.0 | 20.0 | 10.0 | 5.0 | 25.0 |" in report  # ms per 200 calls -> µs
    assert "| masked_lm_loss | fwd+bwd | fp32 | 30.0 | 20.0 | 10.0 | 5.0 | 25.0 |" in report


# --------------------------------------------------------------------------- masked_lm_loss
def _loss_inputs(tokens=12, hidden_size=8, vocab=11, grad=True):
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, requires_grad=grad)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=grad)
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=grad)
    labels = torch.full((tokens,), -100)
    labels[::3] = torch.randint(0, vocab, (len(labels[::3]),))
    return hidden, weight, bias, labels


def test_loss_value_checks_run_on_every_call_of_a_remembered_signature():
    hidden, weight, bias, labels = _loss_inputs(grad=False)
    positions = torch.tensor([0, 3, -1])
    for _ in range(2):  # the second call comes from the memo
        masked_lm_loss(hidden, weight, bias, labels, positions=positions)
    with pytest.raises(RuntimeError, match=r"labels must be ignore_index=-100 or lie in \[0, 11\)"):
        masked_lm_loss(hidden, weight, bias, labels.clone().fill_(11), positions=positions)
    with pytest.raises(RuntimeError, match=r"labels must be ignore_index=-100 or lie in \[0, 11\)"):
        masked_lm_loss(hidden, weight, bias, labels.clone().fill_(-1), positions=positions)
    with pytest.raises(RuntimeError, match=r"positions must lie in \[-1, 12\)"):
        masked_lm_loss(hidden, weight, bias, labels, positions=torch.tensor([0, 12, -1]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        masked_lm_loss(hidden, weight, bias, labels, positions=positions, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be a finite number"):
        masked_lm_loss(hidden, weight, bias, labels, positions=positions, label_smoothing=math.nan)


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "assert_async"])
def test_both_id_checks_agree(monkeypatch, host):
    monkeypatch.setattr(checks, "host_readable", lambda t: host)
    for ids in ([], [0, 4], [-100, 0, 4], [-100]):
        checks.check_ids("masked_lm_loss", torch.tensor(ids, dtype=torch.int64), 0, 5, "labels bad", allowed=-100)
    for ids in ([5], [-1, 0], [-100, 7], [-101]):
        with pytest.raises(RuntimeError, match="fastmlm.ops.masked_lm_loss: labels bad"):
            checks.check_ids("masked_lm_loss", torch.tensor(ids, dtype=torch.int64), 0, 5, "labels bad", allowed=-100)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("route", ["fused", "native"])
def test_the_loss_eager_path_matches_the_custom_op(reduction, route, monkeypatch):
    """The unwrapped eager path gives what the custom ops give: bitwise on the fused route (the
    same backend call), to rounding on the native one (autograd's own nodes in the backward)."""
    loss_route(monkeypatch, route)
    hidden, weight, bias, labels = _loss_inputs()
    leaves = (hidden, weight, bias)

    def run():
        loss = masked_lm_loss(hidden, weight, bias, labels, reduction=reduction)
        return (loss, *torch.autograd.grad(loss.sum(), leaves))

    eager = run()
    with _Ops() as mode:
        traced = run()
    op = torch.ops.fastmlm.masked_lm_loss_reduced.default if reduction == "mean" else \
        torch.ops.fastmlm.masked_lm_loss_fwd.default
    assert op in mode.seen
    exact = route == "fused" or reduction == "none"
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, **(dict(rtol=0, atol=0) if exact else {}))


# --------------------------------------------------------------------------- the CPU torch backend's own path
def _graph_names(t):
    """Names of every autograd node behind ``t``."""
    seen, todo = [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in seen:
            seen.append(node.name())
            todo.extend(next_node for next_node, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("layout", ["masked", "packed"])
def test_the_native_graph_matches_the_op_autograd_rule(monkeypatch, layout):
    """On the CPU the eager path lets autograd record ATen's own attention (no Python node to call
    back); its gradients equal the op's autograd rule (the backend's backward), here with an
    all-padding sequence or a zero-length packed one, NaN under padding, and strided inputs."""
    if layout == "packed":
        q, k, v, cu = _packed(lengths=(5, 0, 3), grad=True)
        kwargs = {"cu_seqlens": cu, "max_seqlen": 5}
    else:
        q, k, v = (torch.randn(3, 6, 2, 16, dtype=torch.float64)[..., ::2].requires_grad_() for _ in range(3))
        mask = torch.tensor([[1] * 6, [0] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
        with torch.no_grad():
            k[2, 5], v[2, 4] = float("nan"), float("inf")
        kwargs = {"attention_mask": mask}
    upstream = torch.randn(q.shape, dtype=q.dtype)
    native = attention(q, k, v, return_lse=True, **kwargs)
    assert not any("Eager" in name or "Python" in name for name in _graph_names(native[0]))
    from fastmlm.ops.torch_impl import attention as torch_attention
    monkeypatch.setattr(torch_attention, "differentiable", lambda inputs: False)  # the autograd.Function route
    ATTENTION.forget_failures()  # the choice of route is remembered per signature
    try:
        ruled = attention(q, k, v, return_lse=True, **kwargs)
    finally:
        ATTENTION.forget_failures()
    assert any("EagerAttention" in name for name in _graph_names(ruled[0]))
    for a, b in zip((*native, *torch.autograd.grad(native[0], (q, k, v), upstream)),
                    (*ruled, *torch.autograd.grad(ruled[0], (q, k, v), upstream))):
        assert not a.isnan().any()  # (lse is -inf for the all-padding sequence)
        assert a.is_contiguous() and b.is_contiguous()  # outputs and gradients, whatever the input strides
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if layout == "masked":
        assert (native[0][1] == 0).all() and torch.isneginf(native[1][1]).all()


@pytest.mark.parametrize("layout", ["padded", "masked", "packed"])
def test_large_masked_or_packed_calls_keep_the_op_autograd_rule(monkeypatch, layout):
    """The native graph would keep padded copies alive until the backward: beyond NATIVE_LIMIT
    masked and packed calls take the op's own rule (which saves the inputs themselves); unmasked
    padded ones save only views either way and stay native."""
    from fastmlm.ops.torch_impl import attention as torch_attention
    monkeypatch.setattr(torch_attention, "NATIVE_LIMIT", 0)
    if layout == "packed":
        q, k, v, cu = _packed(grad=True)
        kwargs = {"cu_seqlens": cu, "max_seqlen": 5}
    else:
        q, k, v = (torch.randn(2, 6, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        kwargs = {"attention_mask": torch.ones(2, 6, dtype=torch.bool)} if layout == "masked" else {}
    ATTENTION.forget_failures()  # the route is remembered per signature
    try:
        names = _graph_names(attention(q, k, v, **kwargs))
    finally:
        ATTENTION.forget_failures()
    assert any("EagerAttention" in name for name in names) == (layout != "padded")


def test_packings_are_remembered_by_value(monkeypatch):
    """The packed layout's index is remembered per cu_seqlens value: other offsets of the same
    signature get their own, and the memory of them is bounded."""
    from fastmlm.ops.torch_impl import attention as torch_attention
    monkeypatch.setattr(torch_attention, "_PACKINGS", {})
    monkeypatch.setattr(torch_attention, "PACKINGS_KEPT", 2)
    q, k, v, _ = _packed(lengths=(5, 3))
    for lengths in ((5, 3), (3, 5), (4, 4), (5, 3)):
        cu = cu_seqlens_of(list(lengths))
        out = attention(q, k, v, cu_seqlens=cu, max_seqlen=5)
        torch.testing.assert_close(out, attention_reference(q, k, v, cu_seqlens=cu)[0])
        assert 1 <= len(torch_attention._PACKINGS) <= 2


def test_flat_padding_helpers_agree_with_the_coordinate_ones():
    from fastmlm.ops import padding
    cu = cu_seqlens_of([3, 0, 5, 1])
    x = torch.randn(9, 3, 2).transpose(1, 2)  # a strided view
    flat = padding.flat_index(cu, 9, 6)
    padded = padding.pad_flat(x, flat, 4, 6)
    expected, _ = padding.pad(x, cu, 6)
    assert torch.equal(padded, expected)
    assert torch.equal(padding.unpad_flat(padded, flat), x)
    assert torch.equal(padding.pad_flat(x.transpose(0, 1), flat, 4, 6, dim=1), padded.permute(2, 0, 1, 3))
    seq_major = padded.transpose(0, 1).contiguous().transpose(0, 1)  # (B, S) not outermost: reshape copies
    assert torch.equal(padding.unpad_flat(seq_major, flat), padding.unpad(expected, cu, 9))
    assert padding.unpad_flat(padded, flat).is_contiguous()


def test_a_nonfinite_query_is_found_by_one_sum():
    """The NaN-query fix-up runs only when the query's sum is not finite; an overflowing sum of
    finite values takes the exact path and changes nothing."""
    from fastmlm.ops.torch_impl.attention import _nan_for_nonfinite_queries as fix
    out, lse = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3)
    q = torch.full((1, 3, 2, 4), 3e38)  # finite, but the sum overflows
    fixed = fix(q, q.transpose(1, 2), out, lse)
    assert torch.equal(fixed[0], out) and torch.equal(fixed[1], lse)
    q[0, 1, 0, 2] = float("nan")
    fixed_out, fixed_lse = fix(q, q.transpose(1, 2), out, lse)
    bad = torch.zeros(1, 2, 3, dtype=torch.bool)
    bad[0, 0, 1] = True
    assert fixed_out[bad].isnan().all() and fixed_lse[bad].isnan().all()
    assert torch.equal(fixed_out[~bad], out[~bad]) and torch.equal(fixed_lse[~bad], lse[~bad])


def test_the_interleaved_session_alternates_and_its_figures_reach_the_report():
    from benchmarks import bench_overhead as bench

    order, now = [], [0.0]

    def provider(name, cost_s):
        def call():
            order.append(name)
            now[0] += cost_s
        return call

    figures = bench.interleave({"fastmlm": provider("fastmlm", 30e-6), "backend": provider("backend", 20e-6)},
                               per_round=2, rounds=4, clock=lambda: now[0])
    assert order[:2] == ["fastmlm", "backend"]  # the warm-up, then rounds whose order rotates
    assert order[2:] == ["fastmlm"] * 2 + ["backend"] * 4 + ["fastmlm"] * 4 + ["backend"] * 4 + ["fastmlm"] * 2
    assert [round(x, 6) for x in figures["fastmlm"]] == [30.0, 30.0, 30.0]
    row = {"op": bench.OP, "metric": "time", "dtype": "fp32", "params": {"case": "attention-packed", "pass": "fwd",
                                                                       "calls": 20}}
    rows = [{**row, "provider": "fastmlm", "median": 1.0,
             "note": "20 calls per step; interleaved µs/call median 31.00 p20 29.50 p80 33.00 (3 rounds)"},
            {**row, "provider": "backend", "median": 0.4}]  # no note: the harness's 0.4 ms per 20 calls
    expected = "| attention-packed | fwd | fp32 | 31.0 | 20.0 | 11.0 | — | — | — | — | 29.5–33.0 |"
    assert expected in bench.report(rows)


# --------------------------------------------------------------------------- the short padded route
def _route_spy(monkeypatch):
    """Calls of the exact (zero the padding first) route of the CPU torch backend, recorded."""
    from fastmlm.ops.torch_impl import attention as torch_attention
    taken = []
    exact = torch_attention.masked_forward
    monkeypatch.setattr(torch_attention, "masked_forward", lambda *a: taken.append(1) or exact(*a))
    return taken


@pytest.mark.parametrize("native", [True, False], ids=["native-graph", "op-rule"])
@pytest.mark.parametrize("garbage", [1e30, -3e4, float("nan"), float("inf")])
def test_the_short_masked_route_drops_padding_exactly(monkeypatch, garbage, native):
    """Masked padded calls skip zeroing the padding (a -inf key bias gives it weight 0): whatever
    finite values padding holds, outputs, lse and gradients equal those of zeroed padding bit for bit
    and padded keys get zero gradients; a non-finite value under padding takes the exact route. The
    same under the op's own autograd rule, whose backward always takes the exact route."""
    from fastmlm.ops.torch_impl import attention as torch_attention
    if not native:
        monkeypatch.setattr(torch_attention, "NATIVE_LIMIT", 0)
    ATTENTION.forget_failures()  # the choice of route is remembered per signature
    monkeypatch.setattr(ATTENTION, "_memo", {})
    taken = _route_spy(monkeypatch)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    clean = [torch.randn(2, 7, 2, 8, dtype=torch.float64) for _ in range(3)]
    dirty = [t.clone() for t in clean]
    for t in dirty[1:]:
        t[~mask] = garbage
    clean[1:] = [t.masked_fill(~mask[:, :, None, None], 0.0) for t in clean[1:]]  # zeroed keys and values
    dout = torch.randn(2, 7, 2, 8, dtype=torch.float64)
    results = []
    for tensors in (clean, dirty):
        inputs = [t.clone().requires_grad_() for t in tensors]
        out, lse = attention(*inputs, attention_mask=mask, return_lse=True)
        results.append([out, lse, *torch.autograd.grad(out, inputs, dout)])
    assert len(taken) == (0 if math.isfinite(garbage) else 1)  # (the clean call is short)
    for name, c, d in zip(["out", "lse", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(d, c, rtol=0, atol=0, msg=name)
    assert (results[1][3][~mask] == 0).all() and (results[1][4][~mask] == 0).all()
    reference = attention_reference(*clean, attention_mask=mask)
    torch.testing.assert_close(results[1][0], reference[0])


def test_key_masks_are_remembered_by_value(monkeypatch):
    """A mask's bias and keyless rows are remembered per value: a mask edited in place between calls
    is seen as the new one (a sequence emptied by it outputs zeros), int masks count as their bool
    value, and the memory of them is bounded."""
    from fastmlm.ops.torch_impl import attention as torch_attention
    monkeypatch.setattr(torch_attention, "_KEY_MASKS", {})
    monkeypatch.setattr(torch_attention, "KEY_MASKS_KEPT", 2)
    q, k, v = (torch.randn(2, 5, 2, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    for edit in (None, (1, slice(3, None)), (1, slice(None)), (0, slice(0, 1))):
        if edit is not None:
            mask[edit] = False  # in place: the same tensor object, new values
        for m in (mask, mask.int()):
            out = attention(q, k, v, attention_mask=m)
            torch.testing.assert_close(out, attention_reference(q, k, v, attention_mask=mask)[0])
        assert 1 <= len(torch_attention._KEY_MASKS) <= 2
    assert (out[1] == 0).all()


@pytest.mark.parametrize("case", ["attention-padded", "attention-masked", "attention-packed"])
def test_the_overhead_peers_compute_what_fastmlm_computes(case):
    """Every attention provider of the overhead bench that returns an output (all but the bare kernel)
    returns fastmlm's, in fastmlm's layout: a peer that skipped work would report a false floor."""
    from benchmarks import bench_overhead as bench
    from benchmarks.harness import Skip

    shape = {**bench.TINY, "case": case, "pass": "fwd+bwd", "calls": 1, "rounds": 1}
    outputs = {}
    for provider in bench.providers(shape, "cpu"):
        try:
            outputs[provider] = bench._call(provider, shape, torch.float32, "cpu")[0]()
        except Skip:
            continue
    outputs.pop("kernel", None)  # ATen's own call on its layout: returns nothing to compare
    assert len(outputs) == 3 and "fastmlm" in outputs  # fastmlm, backend and the peer (sdpa or torch)
    for provider, out in outputs.items():
        torch.testing.assert_close(out, outputs["fastmlm"], msg=provider)


def test_a_remembered_c_check_falls_back_when_the_helper_is_gone(monkeypatch):
    """The plan remembers that the C helper reads labels and cu_seqlens; without the helper (an
    install without a C compiler, or here a test) the same remembered signature is checked in Python."""
    hidden, weight, bias, labels = _loss_inputs()
    q, k, v, cu = _packed()
    masked_lm_loss(hidden, weight, bias, labels)
    attention(q, k, v, cu_seqlens=cu, max_seqlen=5)
    monkeypatch.setattr(checks, "native_boundary", None)
    bad = labels.clone()
    bad[0] = weight.shape[0]
    with pytest.raises(RuntimeError, match="labels must be ignore_index=-100 or lie in"):
        masked_lm_loss(hidden, weight, bias, bad)
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):
        attention(q, k, v, cu_seqlens=torch.tensor([0, 6, 8], dtype=torch.int32), max_seqlen=5)
