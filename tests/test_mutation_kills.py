"""Tests that kill the survivors of ``make mutate`` (fastmlm/tools/mutations.py).

Each test names the mutation it was written against. Names carry the kernel family
(``triton`` / ``emulated``) so the covering selections of mutations.py pick them up.
"""
import pytest
import torch

from fastmlm.ops import attention, attention_reference
from fastmlm.ops import block_layout as L
from fastmlm.ops.kernels_path import import_module
from fastmlm.testing import assert_backend_matches, cu_seqlens_of, strided_view
from test_cuda_kernels import emulated  # noqa: F401  (the fixture: the CUDA kernels in the CPU emulator)

interpreter = pytest.mark.interpreter


# --------------------------------------------------------------------------- Triton attention driver
@interpreter
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_triton_q_k_v_each_with_its_own_strides(device, layout):
    """Kills attn-kv-strides-of-q. q contiguous, k a slice of a fused qkv projection (rows 3x
    wide), v a slice of a fused kv projection (padded: rows 2x wide) or with tokens and heads
    swapped in memory (packed): three different stride pairs,
    where the shared strided-view tests give all three the same one. The gaps hold NaN, so
    reading one tensor with another's strides fails loudly."""
    if layout == "padded":
        shape, batch = (2, 37, 2, 16), dict(attention_mask=torch.arange(37)[None, :] < torch.tensor([[37], [20]]))
        v_kind = "fused_kv"
    else:
        shape, batch = (37, 2, 16), dict(cu_seqlens=cu_seqlens_of([9, 0, 28]), max_seqlen=28)
        v_kind = "first_two_dims_swapped"
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    ref_batch = {k: v for k, v in batch.items() if k != "max_seqlen"}

    def fast(q, k, v):
        k = strided_view(k, "fused_slice")
        v = torch.stack([v, torch.full_like(v, float("nan"))], dim=-3)[..., 0, :, :] if v_kind == "fused_kv" \
            else strided_view(v, v_kind)
        assert len({q.stride(), k.stride(), v.stride()}) == 3, "three different stride pairs"
        return attention(q, k, v, **batch, backend="triton")

    def reference(q, k, v, upcast):
        return attention_reference(q, k, v, **ref_batch, upcast=upcast)[0]

    valid = None if layout == "packed" else batch["attention_mask"][:, :, None, None]
    assert_backend_matches(fast, reference, [torch.randn(shape, device=device) for _ in range(3)], valid)


# --------------------------------------------------------------------------- Triton block-sparse schedules
def test_triton_schedule_follows_a_layout_edited_in_place():
    """Kills sparse-cache-ignores-version. Schedules are cached per layout tensor; editing the
    tensor in place (its data_ptr unchanged) must give a new schedule, not the cached one."""
    bs = import_module("fastmlm_kernels.block_sparse")
    blocks = L.sliding_window(64, 8, 16).blocks.clone()
    before = bs.sparse_schedule(blocks, 16, 64, 8, 0, None)
    kv_count, q_count = before.kv_count.clone(), before.q_count.clone()
    assert blocks[0, 0, 3] == L.SKIP
    blocks[:, 0, 3] = L.FULL  # query block 0 now also keeps key block 3
    after = bs.sparse_schedule(blocks, 16, 64, 8, 0, None)
    assert after.kv_count[0, 0] == kv_count[0, 0] + 1 and after.q_count[0, 3] == q_count[0, 3] + 1
    assert after.kv_index[0, 0, : after.kv_count[0, 0]].tolist()[-1] == 3


# --------------------------------------------------------------------------- CUDA attention (emulated)
def test_emulated_cuda_row_whose_every_score_is_minus_inf_is_nan(emulated):
    """Kills cuda-empty-row-not-nan. A query whose every score is -inf (an infinite input) gives
    NaN, not the zeros of a row without keys. The shared NaN test runs 20 keys in a 64-key tile,
    where the zero-filled rows past the end already give -inf * 0 = NaN; here the sequence fills
    whole key tiles (64 keys, head dim 32: no zero padding anywhere), so only that rule can."""
    q, k, v = (torch.randn(1, 64, 1, 32, dtype=torch.float16) for _ in range(3))
    k[..., 0] = k[..., 0].abs() + 0.5
    q[0, 7] = 0.0
    q[0, 7, 0, 0] = float("-inf")  # q . k = -inf for every key
    out, lse = attention(q, k, v, return_lse=True, backend="cuda")
    assert out[0, 7].isnan().all() and lse[0, 7].isnan().all(), "every score -inf: NaN out, not 0"
    others = torch.arange(64) != 7
    assert torch.isfinite(out[0, others]).all() and torch.isfinite(lse[0, others]).all()
