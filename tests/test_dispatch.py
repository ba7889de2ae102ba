"""The dispatcher: what auto picks for CUDA inputs (without touching CUDA), the reference size rule,
and loud fallback past a backend that raises.

CUDA inputs are tensors on the 'meta' device with the torch backend's device probe stubbed
(``attention_cuda.device_type`` / ``capability``), so nothing here queries a GPU.
"""
import sys
import types
import warnings

import pytest
import torch

from fastmlm.ops import BackendUnavailable, attention, attention_reference, block_sparse_attention, dispatch
from fastmlm.ops import block_layout as L
from fastmlm.ops.attention import REGISTRY as ATTENTION
from fastmlm.ops.attention import validated_inputs
from fastmlm.ops.block_sparse import REGISTRY as BLOCK_SPARSE
from fastmlm.ops.block_sparse import BlockSparseInputs
from fastmlm.ops.dispatch import BackendFailed, Registry
from fastmlm.ops.torch_impl import attention_cuda, block_sparse_cuda
from helpers import cu_seqlens_of


@pytest.fixture
def meta_is_cuda(monkeypatch):
    """The torch backend sees 'meta' tensors as CUDA ones on an sm_90 GPU with varlen_attn available."""
    monkeypatch.setattr(attention_cuda, "device_type", lambda t: "cuda" if t.device.type == "meta" else t.device.type)
    monkeypatch.setattr(attention_cuda, "capability", lambda device: (9, 0))
    monkeypatch.setattr(attention_cuda, "varlen_api", lambda: None)
    monkeypatch.setattr(dispatch, "device_type", lambda t: "cuda" if t.device.type == "meta" else t.device.type)


def padded(batch=4, seqlen=512, heads=12, head_dim=64, dtype=torch.bfloat16, mask=True):
    q = torch.empty(batch, seqlen, heads, head_dim, device="meta", dtype=dtype)
    m = torch.ones(batch, seqlen, dtype=torch.bool, device="meta") if mask else None
    return validated_inputs("attention", q, q, q, m, None, None, None, "auto")


def packed(tokens=2048, heads=12, head_dim=64, max_seqlen=512, dtype=torch.bfloat16):
    q = torch.empty(tokens, heads, head_dim, device="meta", dtype=dtype)
    cu = torch.zeros(5, dtype=torch.int32, device="meta")
    return validated_inputs("attention", q, q, q, None, cu, max_seqlen, None, "auto")


# --------------------------------------------------------------------------- what auto picks on a GPU
def test_auto_order_on_cuda_is_cuda_triton_torch_reference():
    assert dispatch.priority("cuda") == ("cuda", "triton", "torch", "reference")
    assert dispatch.priority("cpu") == ("torch", "reference")  # the Triton interpreter is never auto's pick


@pytest.mark.parametrize("inputs", [padded, packed, lambda: padded(mask=False), lambda: padded(dtype=torch.float32)],
                         ids=["padded", "packed", "unmasked", "fp32"])
def test_auto_picks_torch_for_cuda_inputs_the_kernels_decline(meta_is_cuda, inputs):
    bundle = inputs()
    assert ATTENTION.chosen("auto", "cuda", bundle) == "torch"
    assert ATTENTION.select("auto", "cuda", bundle) == "auto:torch"  # the custom ops may fall back from there
    assert ATTENTION.why_not("cuda", bundle) == "runs on CUDA tensors only, got meta"


def test_auto_prefers_the_kernels_when_they_accept(meta_is_cuda, monkeypatch):
    bundle = padded()
    for name in ("cuda", "triton"):
        monkeypatch.setattr(ATTENTION.module(name), "why_not", lambda inputs: None)
    assert ATTENTION.chosen("auto", "cuda", bundle) == "cuda"


@pytest.mark.parametrize("make,route", [
    (padded, "varlen"),
    (packed, "varlen"),
    (lambda: padded(dtype=torch.float32), "sdpa"),
    (lambda: packed(dtype=torch.float32), "sdpa"),
    (lambda: padded(head_dim=320), "sdpa"),  # past FlashAttention's 256
    (lambda: padded(head_dim=20), "varlen"),  # padded to 24 inside
], ids=["padded-bf16", "packed-bf16", "padded-fp32", "packed-fp32", "head320", "head20"])
def test_cuda_routes(meta_is_cuda, make, route):
    assert attention_cuda.route(make()) == (route, None)


def test_varlen_sequence_limit(meta_is_cuda):
    # 600 rows of 2048 with a mask: 600 * (1 + 16) sequences > 65535 -> the SDPA route
    assert attention_cuda.varlen_sequences(padded(batch=600, seqlen=2048, heads=1)) == 600 * 17
    assert attention_cuda.route(padded(batch=4000, seqlen=2048, heads=1)) == ("sdpa", None)
    assert attention_cuda.route(padded(batch=4000, seqlen=2048, heads=1, mask=False)) == ("varlen", None)


def test_sdpa_route_can_be_preferred_for_padded_batches(meta_is_cuda):
    with attention_cuda.prefer("sdpa"):
        assert attention_cuda.route(padded())[0] == "sdpa"
        assert attention_cuda.route(packed())[0] == "varlen"  # packed batches have no SDPA entry point
    assert attention_cuda.route(padded())[0] == "varlen"


def test_reasons_are_precise(meta_is_cuda, monkeypatch):
    monkeypatch.setattr(attention_cuda, "capability", lambda device: (7, 5))
    assert "needs an sm_80+ GPU, this one is sm_7x" in attention_cuda.why_not_varlen(packed().q)
    assert attention_cuda.route(packed()) == ("sdpa", None)  # the memory-efficient kernel still runs
    monkeypatch.setattr(attention_cuda, "capability", lambda device: (9, 0))
    assert "head_dim <= 256, got 320" in attention_cuda.why_not_varlen(packed(head_dim=320).q)
    assert "takes float16/bfloat16, not torch.float32" in attention_cuda.why_not_varlen(packed(dtype=torch.float32).q)
    why = ATTENTION.why_not("torch", padded(dtype=torch.float64))
    assert "no fused CUDA attention kernel takes torch.float64" in why and "backend='reference'" in why


def test_varlen_needs_torch_2_10(monkeypatch):
    attention_cuda.varlen_api.cache_clear()
    monkeypatch.setattr(attention_cuda, "torch_release", lambda: (2, 9, 1))
    try:
        assert "has no varlen_attn (torch >= 2.10)" in attention_cuda.varlen_api()
    finally:
        attention_cuda.varlen_api.cache_clear()


def test_varlen_api_of_this_torch_is_judged_without_cuda():
    """On torch >= 2.10 the signature check passes here (CPU build): the GPU tier then runs it."""
    from packaging.version import Version
    why = attention_cuda.varlen_api()
    if Version(torch.__version__).release[:2] >= (2, 10):
        assert why is None, why
    else:
        assert "torch >= 2.10" in why


# --------------------------------------------------------------------------- the reference size rule
def test_auto_never_picks_the_reference_for_large_cuda_inputs(meta_is_cuda):
    big = padded(dtype=torch.float64)  # torch declines fp64 on CUDA; kernels decline meta
    with pytest.raises(BackendUnavailable) as info:
        ATTENTION.select("auto", "cuda", big)
    text = str(info.value)
    for name in ("cuda", "triton", "torch", "reference"):
        assert f"  {name}: " in text
    assert "not picked by auto for CUDA inputs this large" in text and "backend='reference'" in text
    assert ATTENTION.select("reference", "cuda", big) == "reference"  # explicit still runs it


def test_auto_may_pick_the_reference_for_small_cuda_inputs(meta_is_cuda):
    small = padded(batch=1, seqlen=64, heads=2, dtype=torch.float64)  # 8192 scores
    assert ATTENTION.chosen("auto", "cuda", small) == "reference"


def test_score_elements():
    assert dispatch.score_elements(padded()) == 4 * 12 * 512 * 512
    assert dispatch.score_elements(packed()) == 2048 * 12 * 512


# --------------------------------------------------------------------------- block-sparse routes
def _sparse(layout, layout_kind="packed", dtype=torch.bfloat16, seqlen=256):
    if layout_kind == "packed":
        q = torch.empty(3 * seqlen, 4, 64, device="meta", dtype=dtype)
        cu = torch.zeros(4, dtype=torch.int32, device="meta")
        dense = validated_inputs("b", q, q, q, None, cu, seqlen, None, "auto")
    else:
        q = torch.empty(3, seqlen, 4, 64, device="meta", dtype=dtype)
        mask = torch.ones(3, seqlen, dtype=torch.bool, device="meta") if layout_kind == "masked" else None
        dense = validated_inputs("b", q, q, q, mask, None, None, None, "auto")
    return BlockSparseInputs.from_layout(dense, layout.to("meta"))


@pytest.mark.parametrize("layout,kind,route", [
    (lambda: L.sliding_window(256, 32, 64), "packed", "window"),
    (lambda: L.sliding_window(256, 32, 64), "unmasked", "window"),
    (lambda: L.sliding_window(256, 32, 64), "masked", "flex"),  # compacting real tokens would move positions
    (lambda: L.sliding_window(256, 32, 64) | L.global_tokens(256, 1, 64), "packed", "flex"),
    (lambda: L.random_blocks(256, 2, 64, num_heads=4), "packed", "flex"),
    (lambda: L.sliding_window(300, 32, 64), "packed", "window"),  # a layout longer than the batch
])
def test_block_sparse_cuda_routes(meta_is_cuda, layout, kind, route):
    inputs = _sparse(layout(), kind)
    assert block_sparse_cuda.route(inputs) == (route, None)
    assert BLOCK_SPARSE.chosen("auto", "cuda", inputs) == "torch"


def test_a_window_with_an_extra_full_tile_is_not_pure(meta_is_cuda):
    window = L.sliding_window(256, 32, 64)
    blocks = window.blocks.clone()
    blocks[0, 0, 3] = L.FULL
    assert block_sparse_cuda.pure_window(_sparse(L.BlockSparseLayout(blocks, 64, 256, window=32))) is None
    assert block_sparse_cuda.pure_window(_sparse(window)) == 32
    assert block_sparse_cuda.route(_sparse(window, dtype=torch.float32)) == ("flex", None)  # varlen: fp16/bf16
    assert "float16/bfloat16/float32" in block_sparse_cuda.why_not(_sparse(window, dtype=torch.float64))


def test_device_copies_of_a_layout_are_kept_and_remember_their_host_tiles():
    layout = L.sliding_window(64, 4, 16)
    copy = layout.to("meta")
    assert layout.to("meta") is copy  # one copy per device: backends' caches on it keep working
    assert L.host_blocks(copy.blocks) is layout.blocks  # no device-to-host read to judge the layout


def test_coarse_tiles_cover_the_fine_ones():
    layout = L.sliding_window(300, 20, 16) | L.global_tokens(300, 3, 16)
    partial, full = block_sparse_cuda.coarse_tiles(layout.blocks, 16, 300, flex_block=64)
    dense = layout.to_dense()[0]
    for i in range(5):
        for j in range(5):
            tile = dense[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64]
            assert bool(full[0, i, j]) == bool(tile.all()) or not full[0, i, j]  # full only where all keep
            assert bool(partial[0, i, j] | full[0, i, j]) == bool(tile.any())  # visited exactly where any keep


# --------------------------------------------------------------------------- loud fallback
@pytest.fixture
def fake_op(monkeypatch):
    """A registry whose "torch" backend raises at launch (a compile failure), with a working "triton"."""
    calls = []

    def module(name, fails):
        label = name.split("_")[1]  # fake_cuda_backend -> cuda
        mod = types.ModuleType(name)
        mod.why_not = lambda inputs: None

        def forward(inputs):
            calls.append(name)
            if fails(inputs):
                raise RuntimeError(f"{label}: CompilationError in the kernel")
            return inputs.x * 2

        mod.forward, mod.backward = forward, (lambda inputs, g: g * 2)
        monkeypatch.setitem(sys.modules, name, mod)

    state = {"fail": True}
    module("fake_cuda_backend", lambda inputs: state["fail"])
    module("fake_triton_backend", lambda inputs: False)
    oracle = types.SimpleNamespace(forward=lambda inputs: inputs.x * 2, backward=lambda inputs, g: g * 2)
    monkeypatch.setitem(sys.modules, "fake_oracle", types.SimpleNamespace(ns=oracle))
    registry = Registry("fake", {"cuda": "fake_cuda_backend", "triton": "fake_triton_backend"}, oracle="fake_oracle:ns",
                        work=lambda inputs: inputs.x.numel())
    return registry, calls, state


class Bundle(tuple):
    @property
    def x(self):
        return self[0]


def _bundle(x):
    return Bundle((x,))


def test_a_raising_backend_warns_once_and_the_next_one_runs(fake_op, monkeypatch):
    registry, calls, _ = fake_op
    monkeypatch.setattr(dispatch, "device_type", lambda t: "cuda")
    x = torch.ones(3)
    name = registry.select("auto", "cuda", _bundle(x))
    assert name == "auto:cuda"
    with pytest.warns(BackendFailed, match=r"the cuda backend failed on these inputs \(RuntimeError: cuda: "
                                           r"CompilationError.*using the triton backend"):
        out = registry.module(name).forward(_bundle(x))
    assert torch.equal(out, x * 2) and calls == ["fake_cuda_backend", "fake_triton_backend"]
    # The same signature: auto now starts at triton, and nothing warns again.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.select("auto", "cuda", _bundle(torch.zeros(3))) == "auto:triton"
        registry.module(name).forward(_bundle(torch.zeros(3)))  # a backward saved as "auto:cuda" skips it too
    assert calls[-1] == "fake_triton_backend" and calls.count("fake_cuda_backend") == 1
    assert "cuda" in registry.failures(_bundle(x))
    # Another signature (dtype) tries cuda again, and warns for itself.
    with pytest.warns(BackendFailed):
        registry.module(registry.select("auto", "cuda", _bundle(torch.ones(3, dtype=torch.float64)))).forward(
            _bundle(torch.ones(3, dtype=torch.float64)))


def test_an_explicit_backend_still_raises(fake_op):
    registry, _, _ = fake_op
    with pytest.raises(RuntimeError, match="CompilationError"):
        registry.module(registry.select("cuda", "cuda", _bundle(torch.ones(3)))).forward(_bundle(torch.ones(3)))


def test_when_every_fast_backend_fails_on_a_large_cuda_input_the_error_lists_them(fake_op, monkeypatch):
    registry, _, _ = fake_op
    monkeypatch.setattr(dispatch, "device_type", lambda t: "cuda")
    monkeypatch.setitem(sys.modules["fake_triton_backend"].__dict__, "forward",
                        lambda inputs: (_ for _ in ()).throw(RuntimeError("triton: out of shared memory")))
    big = _bundle(torch.ones(2 ** 21))
    with pytest.warns(BackendFailed), pytest.raises(BackendUnavailable) as info:
        registry.module(registry.select("auto", "cuda", big)).forward(big)
    text = str(info.value)
    assert "cuda: failed (RuntimeError: cuda: CompilationError" in text
    assert "triton: failed (RuntimeError: triton: out of shared memory)" in text
    assert "reference: not picked by auto for CUDA inputs this large" in text


def test_a_small_input_falls_back_to_the_reference(fake_op, monkeypatch):
    registry, calls, _ = fake_op
    monkeypatch.setattr(dispatch, "device_type", lambda t: "cuda")
    monkeypatch.setitem(sys.modules["fake_triton_backend"].__dict__, "forward",
                        lambda inputs: (_ for _ in ()).throw(RuntimeError("triton: boom")))
    with pytest.warns(BackendFailed) as record:
        out = registry.module(registry.select("auto", "cuda", _bundle(torch.ones(4)))).forward(_bundle(torch.ones(4)))
    assert [str(w.message).split("; ")[-1] for w in record] == [
        "using the triton backend for inputs like these from now on",
        "using the reference backend for inputs like these from now on"]
    assert torch.equal(out, torch.full((4,), 2.0))


def test_out_of_memory_is_not_hidden_by_a_fallback(fake_op, monkeypatch):
    registry, _, _ = fake_op
    monkeypatch.setitem(sys.modules["fake_cuda_backend"].__dict__, "forward",
                        lambda inputs: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    monkeypatch.setattr(dispatch, "device_type", lambda t: "cuda")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        registry.module("auto:cuda").forward(_bundle(torch.ones(3)))


def test_the_real_op_falls_back_forward_and_backward(monkeypatch):
    """attention under auto on the CPU: the torch backend raising -> a warning, the reference's result and gradients."""
    torch_backend = ATTENTION.module("torch")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(torch_backend, "forward", broken)
    ATTENTION.forget_failures()
    try:
        q, k, v = (torch.randn(2, 9, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
        with pytest.warns(BackendFailed, match="simulated launch failure"):
            out = attention(q, k, v)
        ref = attention_reference(q, k, v)[0]
        torch.testing.assert_close(out, ref)
        for g, r in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
            torch.testing.assert_close(g, r)
        with pytest.raises(RuntimeError, match="simulated launch failure"):
            attention(q, k, v, backend="torch")
    finally:
        ATTENTION.forget_failures()


def test_a_backward_that_fails_falls_back_alone(monkeypatch):
    """Forward on torch, its backward raising: the gradients come from the next backend (here the oracle)."""
    torch_backend = BLOCK_SPARSE.module("torch")
    monkeypatch.setattr(torch_backend, "backward", lambda *a: (_ for _ in ()).throw(RuntimeError("dq kernel failed")))
    BLOCK_SPARSE.forget_failures()
    try:
        layout = L.sliding_window(12, 2, 4)
        q, k, v = (torch.randn(12, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        cu = cu_seqlens_of([7, 5])
        out = block_sparse_attention(q, k, v, layout, cu_seqlens=cu, max_seqlen=7)
        with pytest.warns(BackendFailed, match="dq kernel failed"):
            grads = torch.autograd.grad(out.sum(), (q, k, v))
        ref = block_sparse_attention(q, k, v, layout, cu_seqlens=cu, max_seqlen=7, backend="reference")
        for g, r in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
            torch.testing.assert_close(g, r)
    finally:
        BLOCK_SPARSE.forget_failures()


def test_a_failed_backend_import_is_remembered_until_forget_failures(monkeypatch):
    """A backend that cannot be imported is tried once, not on every call (each retry would
    also break a torch.compile graph); forget_failures() tries it again."""
    registry = Registry("probe", {"triton": "fastmlm_no_such_backend_module"})
    calls = []
    real_import = dispatch.kernels_path.import_module

    def counting_import(path):
        calls.append(path)
        return real_import(path)

    monkeypatch.setattr(dispatch.kernels_path, "import_module", counting_import)
    for _ in range(3):
        assert registry.why_not("triton", None).startswith("cannot be imported (ModuleNotFoundError")
    assert calls == ["fastmlm_no_such_backend_module"]
    registry.forget_failures()
    assert registry.why_not("triton", None).startswith("cannot be imported")
    assert len(calls) == 2


def test_a_backend_says_whether_autograd_may_record_its_forward(fake_op, monkeypatch):
    """Registry.differentiable: False for a backend that does not declare it (the op's autograd rule
    then runs), the backend's own answer otherwise, also through an auto fallback chain."""
    registry, _, _ = fake_op
    x = _bundle(torch.ones(3))
    assert not registry.differentiable("triton", x) and not registry.differentiable("auto:triton", x)
    one_dim = lambda inputs: inputs.x.dim() == 1  # noqa: E731
    monkeypatch.setitem(sys.modules["fake_triton_backend"].__dict__, "differentiable", one_dim)
    assert registry.differentiable("triton", x) and registry.differentiable("auto:triton", x)
    assert not registry.differentiable("auto:triton", _bundle(torch.ones(3, 1)))
    from fastmlm.ops.attention import AttentionInputs
    cpu, meta = (torch.zeros(1, 2, 1, 8, device=device) for device in ("cpu", "meta"))
    assert ATTENTION.differentiable("torch", AttentionInputs(cpu, cpu, cpu, None, None, 2, 0.35))  # ATen's derivative
    assert not ATTENTION.differentiable("torch", AttentionInputs(meta, meta, meta, None, None, 2, 0.35))
