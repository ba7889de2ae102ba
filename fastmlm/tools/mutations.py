"""The curated mutation list of ``make mutate`` (run by :mod:`fastmlm.tools.mutate`).

Each :class:`Mutation` is one exact textual edit of one kernel or driver file, standing for
a bug a reviewer could let through: an off-by-one tile bound, a missing rescale or guard, a
wrong stride, a dropped mask, a wrong sign or scale, a wrong reduction. ``old`` must occur
exactly once in the file (else the entry is *stale*: the kernel changed, and the entry must
follow it). The tests run against a mutant are the ones that cover its file
(:data:`COVERING`); ``select`` narrows them, for the CI subset (``fast=True``), to the tests
known to kill it, so the subset stays within a few minutes.

A mutant no test can kill because it computes the same thing is kept here with ``equivalent``
saying why, so nobody adds it again as a "new" survivor; it is listed, never run.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Covering:
    """The tests of one file: pytest paths, and a ``-k`` expression applied to all of them ("" = every test)."""

    files: tuple[str, ...]
    keyword: str = ""


# -k matches a test's module name too: "triton" selects every test of test_*_triton.py, and the
# tests named *triton* of the others (the triton parameter of the backend tests, test_mutation_kills.py).
_KILLS = "tests/test_mutation_kills.py"
_FLASH = Covering(("tests/test_attention_triton.py", "tests/test_block_sparse_triton.py", _KILLS), "triton")
_SPARSE = Covering(("tests/test_block_sparse_triton.py", _KILLS), "triton")
_CUDA = Covering(("tests/test_cuda_kernels.py", "tests/test_block_sparse_cuda.py", _KILLS), "emulated")
_MASKED_CE = Covering(("tests/test_masked_ce_triton.py", "tests/test_masked_ce.py"), "triton")

# Which tests cover each mutated file.
COVERING = {
    "kernels/_flash.py": _FLASH,
    "kernels/attention.py": Covering(("tests/test_attention_triton.py", _KILLS), "triton"),
    "kernels/block_sparse.py": _SPARSE,
    "kernels/masked_ce.py": _MASKED_CE,
    "csrc/attention.cuh": _CUDA,
    "csrc/masked_ce.cuh": Covering(("tests/test_cuda_kernels.py", "tests/test_masked_ce.py", _KILLS),
                                   "emulated and (masked_ce or gather)"),
    "fastmlm/ops/cuda_impl/attention.py": _CUDA,
    "fastmlm/ops/padding.py": Covering(("tests/test_attention.py", "tests/test_model.py"), "not triton"),
    "fastmlm/ops/packing.py": Covering(("tests/test_model_inputs.py", "tests/test_model.py")),
    "fastmlm/ops/block_layout.py": _SPARSE,
}


@dataclass(frozen=True)
class Mutation:
    """One planted bug: replace ``old`` by ``new`` in ``path`` (relative to the repository root)."""

    name: str
    path: str
    old: str
    new: str
    bug: str  # the bug it stands for, one line
    select: str = ""  # -k expression of the tests that kill it (the CI subset runs only these)
    fast: bool = False  # part of the CI subset (tests/test_mutate.py, mutate --fast)
    equivalent: str = ""  # why no test can tell it apart; then it is listed, not run

    def covering(self, fast: bool = False) -> tuple[tuple[str, ...], str]:
        """(test paths, -k expression) to run against this mutant; ``fast`` uses ``select`` when set."""
        cover = COVERING[self.path]
        return cover.files, (self.select if fast and self.select else cover.keyword)


M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    # ------------------------------------------------------------------ Triton: the shared FlashAttention body
    M("flash-no-minf-guard", "kernels/_flash.py",
      'm_shift = tl.where(m_new == float("-inf"), 0.0, m_new)', "m_shift = m_new",
      "missing guard: a row that has seen no real key yet computes exp2(-inf - -inf) = NaN",
      select="test_left_padding_longer_than_a_key_tile", fast=True),
    M("flash-no-acc-rescale", "kernels/_flash.py",
      "acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v", "acc = acc + tl.dot(p.to(v.dtype), v",
      "missing rescale of the output accumulator when the running max grows"),
    M("flash-no-l-rescale", "kernels/_flash.py",
      "l_i = l_i * alpha + tl.sum(p, 1)", "l_i = l_i + tl.sum(p, 1)",
      "missing rescale of the softmax denominator when the running max grows"),
    M("flash-fwd-tail-tile-dropped", "kernels/_flash.py",
      "for kb in range(num_unmasked, tl.cdiv(kv_len, BLOCK_N)):\n            acc, m_i, l_i",
      "for kb in range(num_unmasked, kv_len // BLOCK_N):\n            acc, m_i, l_i",
      "off-by-one tile bound: the forward never visits the last, partial key tile"),
    M("flash-fwd-tail-tile-unmasked", "kernels/_flash.py",
      "masks every tile.\n        num_unmasked = tl.where(holes, 0, kv_len // BLOCK_N)",
      "masks every tile.\n        num_unmasked = tl.where(holes, 0, tl.cdiv(kv_len, BLOCK_N))",
      "off-by-one tile bound: the partial last key tile runs without its mask (keys past kv_len count)"),
    M("flash-fwd-holes-ignored", "kernels/_flash.py",
      "masks every tile.\n        num_unmasked = tl.where(holes, 0, kv_len // BLOCK_N)",
      "masks every tile.\n        num_unmasked = kv_len // BLOCK_N",
      "dropped mask: interior key tiles of a mask with holes run unmasked"),
    M("flash-key-mask-dropped", "kernels/_flash.py",
      "real = real & (tl.load(KeyMaskRow + pos_n, mask=real, other=0) != 0)", "real = real",
      "dropped mask: the key-padding mask is ignored on masked tiles (only kv_len counts)"),
    M("flash-lse-natural-log", "kernels/_flash.py",
      "(m_i + tl.math.log2(l_safe)) / 1.4426950408889634", "(m_i + tl.math.log(l_safe)) / 1.4426950408889634",
      "wrong log base in lse (the backward recomputes P from it)"),
    M("flash-empty-row-not-nan", "kernels/_flash.py",
      'l_i = tl.where(empty & (kv_len > 0), float("nan"), l_i)', "l_i = l_i",
      "NaN turned into a number: a row whose every score is -inf outputs 0 instead of NaN"),
    M("flash-dk-unscaled", "kernels/_flash.py",
      "dk = tl.where(valid[:, None], dk * scale, 0.0)", "dk = tl.where(valid[:, None], dk, 0.0)",
      "dK misses the softmax scale"),
    M("flash-dv-padding-keys", "kernels/_flash.py",
      "dv = tl.where(valid[:, None], dv, 0.0)", "dv = dv",
      "padding keys get a nonzero dV (the store does not zero them)"),
    M("flash-dkdv-delta-sign", "kernels/_flash.py",
      "ds_t = p_t * (dp_t - delta[None, :])", "ds_t = p_t * (dp_t + delta[None, :])",
      "wrong sign of the softmax-gradient row term in dK"),
    M("flash-dq-ds-unmasked", "kernels/_flash.py",
      "ds = tl.where(keep, ds, 0.0)  # a NaN V row", "ds = ds  # a NaN V row",
      "dropped mask: a NaN V row at a padding key reaches dQ through dS = 0 * NaN"),
    M("flash-dq-no-lse-guard", "kernels/_flash.py",
      'other=float("inf"))\n    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634\n'
      "    delta = tl.load(Delta + (start + pos_m)",
      'other=float("inf"))\n    lse2 = lse * 1.4426950408889634\n'
      "    delta = tl.load(Delta + (start + pos_m)",
      "missing guard: a row without keys (lse = -inf) gives exp2(-inf + inf) = NaN in dQ",
      equivalent="a row has lse = -inf only when it keeps no pair, and then every pair it meets is on a masked "
                 "tile, where dS is selected to 0 wherever keep is False (the NaN p never reaches dQ); on an "
                 "unmasked tile every pair is kept, so lse is finite there. Survived the full run (2026-12-01)"),
    M("flash-dkdv-tail-rows-unmasked", "kernels/_flash.py",
      "if (state != FULL) | ((qb + 1) * BLOCK_M > seq_len):", "if state != FULL:",
      "dropped mask: a block-sparse dK/dV visit of the last, partial query block reads rows past the sequence"),
    M("flash-sparse-holes-ignored", "kernels/_flash.py",
      "needs_mask = (state != FULL) | ((kb + 1) * BLOCK_N > kv_len) | holes\n            if needs_mask:\n"
      "                acc, m_i, l_i",
      "needs_mask = (state != FULL) | ((kb + 1) * BLOCK_N > kv_len)\n            if needs_mask:\n"
      "                acc, m_i, l_i",
      "dropped mask: block-sparse FULL tiles of a key mask with holes run unmasked in the forward"),
    M("flash-window-off-by-one", "kernels/_flash.py",
      "rule = (tl.where(distance < 0, -distance, distance) <= window)",
      "rule = (tl.where(distance < 0, -distance, distance) < window)",
      "off-by-one in the sliding-window rule of partial tiles (|i - j| < window)"),
    M("flash-global-column-dropped", "kernels/_flash.py",
      "| (pos_q < num_global) | (pos_k < num_global)", "| (pos_q < num_global)",
      "dropped mask term: global tokens are not attended to by the other rows in partial tiles"),
    M("flash-dkdv-lse-pad-other", "kernels/_flash.py",
      'lse = tl.load(Lse_h + pos_m.to(tl.int64) * num_heads, mask=pos_m < seq_len, other=float("inf"))',
      'lse = tl.load(Lse_h + pos_m.to(tl.int64) * num_heads, mask=pos_m < seq_len, other=0.0)',
      "rows past the sequence read lse 0 instead of +inf in the dK/dV walk",
      equivalent="those rows also load q, dO and delta as zeros, so p = 1 multiplies zeros: dK, dV are unchanged"),
    # ------------------------------------------------------------------ Triton: the attention driver
    M("attn-kv-strides-of-q", "kernels/attention.py",
      "*_input_strides(qf, kf, vf), out.stride(0), out.stride(1)",
      "*_input_strides(qf, qf, qf), out.stride(0), out.stride(1)",
      "wrong stride: the forward reads K and V with Q's token and head strides",
      select="test_triton_q_k_v_each_with_its_own_strides", fast=True),
    M("attn-no-unit-stride-copy", "kernels/attention.py",
      "t = t if t.stride(-1) == 1 else t.contiguous()", "t = t",
      "wrong stride: a head dim with stride != 1 is read as if contiguous"),
    M("attn-holes-never-flagged", "kernels/attention.py",
      "holes = mask.sum(dim=1, dtype=torch.int32) != kv_len", "holes = torch.zeros_like(kv_len, dtype=torch.bool)",
      "dropped mask: a key mask with holes is taken for right padding (interior tiles unmasked)"),
    M("attn-cu-seqlens-strided", "kernels/attention.py",
      "cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()", "cu_seqlens = cu_seqlens",
      "wrong stride: a strided cu_seqlens is read as if contiguous"),
    M("attn-fwd-grid-floor", "kernels/attention.py",
      'grid = lambda meta: (triton.cdiv(seqs.max_seqlen, meta["BLOCK_M"]), h, seqs.batch)',
      'grid = lambda meta: (max(1, seqs.max_seqlen // meta["BLOCK_M"]), h, seqs.batch)',
      "off-by-one grid: the last, partial query block of the forward is never computed"),
    M("attn-delta-grid-floor", "kernels/attention.py",
      "_flash._delta_kernel[(triton.cdiv(tokens, block_t), h)]", "_flash._delta_kernel[(max(1, tokens // block_t), h)]",
      "off-by-one grid: delta is never computed for the last, partial block of tokens"),
    # ------------------------------------------------------------------ Triton: block-sparse schedules
    M("sparse-pool-any-full", "kernels/block_sparse.py",
      "full = pooled(blocks == FULL, True).all(4).all(2)", "full = pooled(blocks == FULL, True).any(4).any(2)",
      "wrong reduction: a pooled kernel tile counts as FULL when any (not every) layout block in it is"),
    M("sparse-dkdv-untransposed", "kernels/block_sparse.py",
      "q_index, q_count = visit_list(keep.transpose(1, 2))", "q_index, q_count = visit_list(keep)",
      "the dK/dV kernels walk the forward's visit list instead of its transpose"),
    M("sparse-cache-ignores-version", "kernels/block_sparse.py",
      "key = (blocks.data_ptr(), blocks._version, ", "key = (blocks.data_ptr(), 0, ",
      "stale cache: a layout edited in place keeps its old schedule",
      select="test_triton_schedule_follows_a_layout_edited_in_place", fast=True),
    M("layout-visit-unstable", "fastmlm/ops/block_layout.py",
      "order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices",
      "order = torch.sort((~keep).to(torch.int8), dim=-1, descending=True, stable=True).indices",
      "wrong order: the visit list lists the skipped tiles first"),
    # ------------------------------------------------------------------ Python layout helpers
    M("padding-coords-left", "fastmlm/ops/padding.py",
      "torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)",
      "torch.searchsorted(cu_seqlens[1:].long(), tokens, right=False)",
      "off-by-one: the first token of each packed sequence is given to the previous one"),
    M("padding-mask-inclusive", "fastmlm/ops/padding.py",
      "torch.arange(max_seqlen, device=x.device)[None, :] < seqlens(cu_seqlens)[:, None]",
      "torch.arange(max_seqlen, device=x.device)[None, :] <= seqlens(cu_seqlens)[:, None]",
      "off-by-one: the padded mask marks one padding position per sequence as real"),
    M("packing-positions-wrong", "fastmlm/ops/packing.py",
      "batch = cls(ids, types, token_index % s, cu, longest, token_index, (b, s))",
      "batch = cls(ids, types, torch.arange(total, device=ids.device), cu, longest, token_index, (b, s))",
      "wrong positions: a padded batch's packed tokens get their index in the pack, not in their row"),
    M("packing-unstable-sort", "fastmlm/ops/packing.py",
      "token_index = torch.sort((~mask).to(torch.int8), stable=True).indices[:total]",
      "token_index = torch.sort((~mask).to(torch.int8)).indices[:total]",
      "unstable sort: the real tokens of a padded batch may be packed out of order"),
    # ------------------------------------------------------------------ CUDA attention (csrc/attention.cuh)
    M("cuda-no-minf-guard", "csrc/attention.cuh",
      "shift[r] = new_max == -INFINITY ? 0.f : new_max;", "shift[r] = new_max;",
      "missing guard: a row that has seen no real key yet computes exp2(-inf - -inf) = NaN",
      select="left_padding_longer_than_a_key_tile", fast=True),
    M("cuda-rescale-one-fragment", "csrc/attention.cuh",
      "for (int i = 0; i < 4; ++i) o[nd][i] *= rescale[i / 2];",
      "for (int i = 0; i < 4; ++i) o[nd][i] *= nd == 0 ? 1.f : rescale[i / 2];",
      "missing rescale of the output accumulator for one head-dim fragment"),
    M("cuda-dkdv-padding-keys", "csrc/attention.cuh",
      "= key_real[i / 2] ? exp2f(pt[n][i]", "= true ? exp2f(pt[n][i]",
      "dropped mask: padding keys get dK/dV"),
    M("cuda-key-mask-dropped", "csrc/attention.cuh",
      "return key < seq.keys && (seq.key_mask == nullptr || seq.key_mask[key]);", "return key < seq.keys;",
      "dropped mask: holes in the key mask are treated as real keys"),
    M("cuda-dq-delta-sign", "csrc/attention.cuh",
      "ds[n][i] = prob * (ds[n][i] - delta[i / 2]);", "ds[n][i] = prob * (ds[n][i] + delta[i / 2]);",
      "wrong sign of the softmax-gradient row term in dQ"),
    M("cuda-dq-scale-half-rows", "csrc/attention.cuh",
      "const float factor[2] = {p.scale, p.scale};", "const float factor[2] = {p.scale, 1.f};",
      "dQ misses the softmax scale on half of the rows (g + 8)"),
    M("cuda-row-stats-no-guard", "csrc/attention.cuh",
      "lse2_s[i] = lse == -INFINITY ? INFINITY : lse * kLog2e;", "lse2_s[i] = lse * kLog2e;",
      "missing guard: query rows without keys or past the end give exp2(s + inf) = inf in dK/dV"),
    M("cuda-empty-row-not-nan", "csrc/attention.cuh",
      "if (l[r] == 0.f && seq.keys > 0 && dense) l[r] = NAN;", "",
      "NaN turned into a number: a row whose every score is -inf outputs 0 instead of NaN",
      select="row_whose_every_score_is_minus_inf"),
    # ------------------------------------------------------------------ Triton masked-LM loss (kept few: the file
    # is being reworked; an entry that goes stale is updated with it)
    M("tce-no-sumexp-rescale", "kernels/masked_ce.py",
      "run_sumexp = run_sumexp * tl.exp(run_max - new_max) + ", "run_sumexp = run_sumexp + ",
      "missing rescale of the running sum of exponentials when the running max grows"),
    M("tce-padding-columns-count", "kernels/masked_ce.py",
      'z = tl.where(col_ok[None, :], z, float("-inf"))  # padding columns', "z = z  # padding columns",
      "dropped mask: vocabulary columns past V (logit 0) enter the log-sum-exp"),
    M("tce-argmax-last-tie", "kernels/masked_ce.py",
      "better = tile_max > best", "better = tile_max >= best",
      "wrong tie rule: a later vocabulary tile wins a tie for the argmax (accuracy counts the last index)"),
    M("tce-smoothing-sign", "kernels/masked_ce.py",
      "dz = probs * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / V",
      "dz = probs * (1.0 + 2.0 * z_loss * lse)[:, None] + label_smoothing / V",
      "wrong sign of the label-smoothing term of the logit gradient"),
    M("tce-dhidden-overwrites-chunks", "kernels/masked_ce.py",
      "tl.store(ptrs, tl.load(ptrs, mask=tile_ok, other=0.0) + acc, mask=tile_ok)", "tl.store(ptrs, acc, mask=tile_ok)",
      "wrong reduction: each vocabulary chunk overwrites d_hidden instead of adding to it"),
    # ------------------------------------------------------------------ CUDA masked-LM loss (csrc/masked_ce.cuh)
    M("cce-merge-no-rescale", "csrc/masked_ce.cuh",
      "out.sum_exp = scaled(a.sum_exp, a.max, out.max) + scaled(b.sum_exp, b.max, out.max);",
      "out.sum_exp = a.sum_exp + b.sum_exp;",
      "wrong reduction: thread partial sums of exponentials are merged without rescaling to the common max"),
    M("cce-argmax-last-tie", "csrc/masked_ce.cuh",
      "if (s.best > p.best_logit[r]) {", "if (s.best >= p.best_logit[r]) {",
      "wrong tie rule: a later vocabulary chunk wins a tie for the argmax"),
    M("cce-uncounted-rows-loss", "csrc/masked_ce.cuh",
      "p.loss[r] = counts ? loss : 0.f;", "p.loss[r] = loss;",
      "dropped mask: rows that do not count write a loss"),
    M("cce-smoothing-sign", "csrc/masked_ce.cuh",
      "(1.f + 2.f * p.z_loss * lse) - uniform - (", "(1.f + 2.f * p.z_loss * lse) + uniform - (",
      "wrong sign of the label-smoothing term of the logit gradient"),
    # ------------------------------------------------------------------ CUDA attention driver
    M("cuda-driver-key-len-dropped", "fastmlm/ops/cuda_impl/attention.py",
      "return key_mask, inputs.key_lengths().contiguous(), None", "return key_mask, None, None",
      "the kernels get no key_len: every key tile is visited (results unchanged, only slower)",
      equivalent="key_len only skips tiles of keys the mask already marks as padding; without it every tile "
                 "is visited and masked, which gives the same values (it is a speed feature)"),
)
