// The torch face of the CUDA kernels: registers the ops torch.ops.fastmlm_C.* and checks
// every input (device, dtype, shape, contiguity, alignment) with a readable message before
// handing raw pointers to the launchers in launchers.h. The only translation unit that
// includes torch headers; outputs are allocated by the Python driver
// (fastmlm/ops/cuda_impl/) and passed in as mutable arguments.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "launchers.h"

namespace fastmlm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ----------------------------------------------------------------- checks
void check_on(const Tensor& t, const char* name, const c10::Device& device) {
  TORCH_CHECK(t.is_cuda(), "fastmlm._C: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "fastmlm._C: ", name, " is on ", t.device(), " but the inputs are on ", device);
}

void check_dense(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "fastmlm._C: ", name, " must be contiguous (call .contiguous())");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "fastmlm._C: ", name,
              " must be 16-byte aligned (a view with an odd storage offset? pass a fresh tensor)");
}

void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_on(t, name, ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastmlm._C: ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastmlm._C: ", name, " has shape ", t.sizes(), " but ", ref_name, " has ",
              ref.sizes());
  check_dense(t, name);
}

void check_float32(const Tensor& t, const char* name, at::IntArrayRef shape, const c10::Device& device) {
  check_on(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastmlm._C: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fastmlm._C: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastmlm._C: ", name, " must be contiguous");
}

DType dtype_of(const Tensor& t, bool allow_fp32) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat:
      if (allow_fp32) return DType::kFloat32;
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "fastmlm._C: dtype ", t.scalar_type(), " is not supported here (",
                  allow_fp32 ? "float32, float16, bfloat16" : "float16, bfloat16", ")");
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastmlm._C: ", what, " failed to launch: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_tensor_cores(const Tensor& t) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index());
  TORCH_CHECK(major >= 8, "fastmlm._C: the attention kernels use mma.sync for fp16/bf16 and need sm_80 or newer");
}

// ----------------------------------------------------------------- attention
// Fill the sizes of AttentionParams from q and the layout arguments, checking them.
AttentionParams attention_params(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& key_mask,
                                 const OptTensor& key_len, const OptTensor& cu_seqlens, int64_t max_seqlen,
                                 double scale) {
  const c10::Device device = q.device();
  check_on(q, "q", device);
  dtype_of(q, /*allow_fp32=*/false);
  check_dense(q, "q");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  check_tensor_cores(q);
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, "fastmlm._C: q must be (T, H, D) or (B, S, H, D), got ", q.sizes());
  AttentionParams p;
  p.head_dim = static_cast<int>(q.size(-1));
  p.heads = static_cast<int>(q.size(-2));
  TORCH_CHECK(head_dim_bucket(p.head_dim) != 0, "fastmlm._C: head_dim must be a multiple of 8 and at most ",
              kMaxHeadDim, ", got ", p.head_dim);
  TORCH_CHECK(p.heads <= 65535, "fastmlm._C: at most 65535 heads, got ", p.heads);
  TORCH_CHECK(max_seqlen >= 0 && max_seqlen < (int64_t{1} << 31), "fastmlm._C: max_seqlen out of range: ", max_seqlen);
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.scale = static_cast<float>(scale);
  if (q.dim() == 4) {
    TORCH_CHECK(!cu_seqlens.has_value(), "fastmlm._C: cu_seqlens is for the packed (T, H, D) layout");
    TORCH_CHECK(q.size(1) == max_seqlen, "fastmlm._C: padded q has S = ", q.size(1), " but max_seqlen = ", max_seqlen);
    p.batch = static_cast<int>(q.size(0));
    if (key_mask.has_value()) {
      check_on(*key_mask, "attention_mask", device);
      TORCH_CHECK(key_mask->scalar_type() == at::kBool, "fastmlm._C: attention_mask must be bool");
      TORCH_CHECK(key_mask->sizes() == q.sizes().slice(0, 2), "fastmlm._C: attention_mask must be (B, S) = ",
                  q.sizes().slice(0, 2), ", got ", key_mask->sizes());
      TORCH_CHECK(key_mask->is_contiguous(), "fastmlm._C: attention_mask must be contiguous");
      p.key_mask = key_mask->data_ptr<bool>();
    }
    if (key_len.has_value()) {
      check_on(*key_len, "key_len", device);
      TORCH_CHECK(key_mask.has_value(), "fastmlm._C: key_len comes with attention_mask");
      TORCH_CHECK(key_len->scalar_type() == at::kInt && key_len->dim() == 1 && key_len->size(0) == q.size(0) &&
                      key_len->is_contiguous(),
                  "fastmlm._C: key_len must be a contiguous int32 (B,) tensor, got ", key_len->scalar_type(), " ",
                  key_len->sizes());
      p.key_len = key_len->data_ptr<int>();
    }
  } else {
    TORCH_CHECK(cu_seqlens.has_value(), "fastmlm._C: packed (T, H, D) inputs need cu_seqlens");
    TORCH_CHECK(!key_mask.has_value() && !key_len.has_value(),
                "fastmlm._C: attention_mask and key_len are for the padded layout");
    check_on(*cu_seqlens, "cu_seqlens", device);
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 1,
                "fastmlm._C: cu_seqlens must be a 1-D int32 tensor with at least one entry");
    TORCH_CHECK(cu_seqlens->is_contiguous(), "fastmlm._C: cu_seqlens must be contiguous");
    TORCH_CHECK(q.size(0) < (int64_t{1} << 31), "fastmlm._C: at most 2^31 - 1 tokens in a packed batch");
    p.batch = static_cast<int>(cu_seqlens->numel() - 1);
    p.cu_seqlens = cu_seqlens->data_ptr<int>();
  }
  TORCH_CHECK(p.batch <= 65535, "fastmlm._C: at most 65535 sequences per call, got ", p.batch);
  p.total_rows = q.numel() / p.head_dim;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  return p;
}

// The block-sparse layout of p (already filled for q): the tile states, both visit lists and
// the token rule, as launchers.h (BlockSparseParams) describes them.
void set_block_sparse(AttentionParams& p, const Tensor& q, const Tensor& blocks, const Tensor& kv_index,
                      const Tensor& kv_count, const Tensor& q_index, const Tensor& q_count,
                      const OptTensor& token_mask, int64_t block_size, int64_t window, int64_t num_global) {
  const c10::Device device = q.device();
  check_on(blocks, "blocks", device);
  TORCH_CHECK(blocks.scalar_type() == at::kChar && blocks.dim() == 3 && blocks.size(1) == blocks.size(2) &&
                  blocks.is_contiguous(),
              "fastmlm._C: blocks must be a contiguous int8 (Hl, nb, nb) tensor, got ", blocks.scalar_type(), " ",
              blocks.sizes());
  const int64_t heads = blocks.size(0), nb = blocks.size(1);
  TORCH_CHECK(heads == 1 || heads == p.heads, "fastmlm._C: blocks has ", heads, " heads, q has ", p.heads);
  TORCH_CHECK(block_size > 0 && block_size % 64 == 0, "fastmlm._C: block_size must be a positive multiple of 64 "
              "(the kernels' query tile), got ", block_size);
  TORCH_CHECK(nb * block_size >= p.max_seqlen && nb * block_size < (int64_t{1} << 31), "fastmlm._C: ", nb,
              " blocks of ", block_size, " do not cover max_seqlen = ", p.max_seqlen);
  const auto check_list = [&](const Tensor& t, const char* name, at::IntArrayRef shape) {
    check_on(t, name, device);
    TORCH_CHECK(t.scalar_type() == at::kInt && t.sizes() == shape && t.is_contiguous(), "fastmlm._C: ", name,
                " must be a contiguous int32 tensor of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes());
  };
  check_list(kv_index, "kv_index", blocks.sizes());
  check_list(q_index, "q_index", blocks.sizes());
  check_list(kv_count, "kv_count", blocks.sizes().slice(0, 2));
  check_list(q_count, "q_count", blocks.sizes().slice(0, 2));
  TORCH_CHECK(window >= -1 && window < (int64_t{1} << 31), "fastmlm._C: window must be >= -1, got ", window);
  TORCH_CHECK(num_global >= 0 && num_global < (int64_t{1} << 31), "fastmlm._C: num_global must be >= 0, got ",
              num_global);
  BlockSparseParams& s = p.sparse;
  if (token_mask.has_value()) {
    check_on(*token_mask, "token_mask", device);
    const int64_t mask_heads = token_mask->dim() == 3 ? token_mask->size(0) : 0;
    TORCH_CHECK(token_mask->scalar_type() == at::kBool && (mask_heads == 1 || mask_heads == p.heads) &&
                    token_mask->size(1) == token_mask->size(2) && token_mask->size(1) >= p.max_seqlen &&
                    token_mask->is_contiguous(),
                "fastmlm._C: token_mask must be a contiguous bool (1 or ", p.heads,
                ", L, L) tensor with L >= max_seqlen, got ", token_mask->scalar_type(), " ", token_mask->sizes());
    s.token_mask = token_mask->data_ptr<bool>();
    s.mask_heads = static_cast<int>(mask_heads);
    s.layout_len = static_cast<int>(token_mask->size(1));
  }
  s.blocks = blocks.data_ptr<int8_t>();
  s.kv_index = kv_index.data_ptr<int>();
  s.kv_count = kv_count.data_ptr<int>();
  s.q_index = q_index.data_ptr<int>();
  s.q_count = q_count.data_ptr<int>();
  s.layout_heads = static_cast<int>(heads);
  s.num_blocks = static_cast<int>(nb);
  s.block_size = static_cast<int>(block_size);
  s.window = static_cast<int>(window);
  s.num_global = static_cast<int>(num_global);
}

// Forward (dense or block-sparse, as p says): writes out and lse.
void run_forward(AttentionParams& p, const Tensor& q, const Tensor& out, const Tensor& lse) {
  check_like(out, "out", q, "q");
  check_float32(lse, "lse", q.sizes().slice(0, q.dim() - 1), q.device());
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  c10::cuda::CUDAGuard guard(q.device());
  check_launch(attention_forward(p, dtype_of(q, false), stream_of(q)), "attention forward");
}

// Backward (dense or block-sparse, as p says): delta (scratch), dq, dk, dv.
void run_backward(AttentionParams& p, const Tensor& dout, const Tensor& q, const Tensor& out, const Tensor& lse,
                  const Tensor& delta, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const auto rows = q.sizes().slice(0, q.dim() - 1);
  check_like(dout, "dout", q, "q");
  check_like(out, "out", q, "q");
  check_float32(lse, "lse", rows, q.device());
  check_float32(delta, "delta", rows, q.device());
  check_like(dq, "dq", q, "q");
  check_like(dk, "dk", q, "q");
  check_like(dv, "dv", q, "q");
  p.dout = dout.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  c10::cuda::CUDAGuard guard(q.device());
  check_launch(attention_backward(p, dtype_of(q, false), stream_of(q)), "attention backward");
}

void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& key_mask,
                   const OptTensor& key_len, const OptTensor& cu_seqlens, int64_t max_seqlen, double scale,
                   const Tensor& out, const Tensor& lse) {
  AttentionParams p = attention_params(q, k, v, key_mask, key_len, cu_seqlens, max_seqlen, scale);
  run_forward(p, q, out, lse);
}

void attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                   const Tensor& lse, const OptTensor& key_mask, const OptTensor& key_len,
                   const OptTensor& cu_seqlens, int64_t max_seqlen, double scale, const Tensor& delta,
                   const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  AttentionParams p = attention_params(q, k, v, key_mask, key_len, cu_seqlens, max_seqlen, scale);
  run_backward(p, dout, q, out, lse, delta, dq, dk, dv);
}

void block_sparse_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& key_mask,
                      const OptTensor& key_len, const OptTensor& cu_seqlens, int64_t max_seqlen, double scale,
                      const Tensor& blocks, const Tensor& kv_index, const Tensor& kv_count, const Tensor& q_index,
                      const Tensor& q_count, const OptTensor& token_mask, int64_t block_size, int64_t window,
                      int64_t num_global, const Tensor& out, const Tensor& lse) {
  AttentionParams p = attention_params(q, k, v, key_mask, key_len, cu_seqlens, max_seqlen, scale);
  set_block_sparse(p, q, blocks, kv_index, kv_count, q_index, q_count, token_mask, block_size, window, num_global);
  run_forward(p, q, out, lse);
}

void block_sparse_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                      const Tensor& lse, const OptTensor& key_mask, const OptTensor& key_len,
                      const OptTensor& cu_seqlens, int64_t max_seqlen, double scale, const Tensor& blocks,
                      const Tensor& kv_index, const Tensor& kv_count, const Tensor& q_index, const Tensor& q_count,
                      const OptTensor& token_mask, int64_t block_size, int64_t window, int64_t num_global,
                      const Tensor& delta, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  AttentionParams p = attention_params(q, k, v, key_mask, key_len, cu_seqlens, max_seqlen, scale);
  set_block_sparse(p, q, blocks, kv_index, kv_count, q_index, q_count, token_mask, block_size, window, num_global);
  run_backward(p, dout, q, out, lse, delta, dq, dk, dv);
}

// ----------------------------------------------------------------- masked LM loss
void check_index(const Tensor& t, const char* name, int64_t numel, const c10::Device& device) {
  check_on(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.numel() == numel, "fastmlm._C: ", name,
              " must be a 1-D int64 tensor of ", numel, " entries, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastmlm._C: ", name, " must be contiguous");
}

void gather_rows_op(const Tensor& hidden, const Tensor& positions, const Tensor& rows) {
  check_on(hidden, "hidden", hidden.device());
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "fastmlm._C: hidden must be a contiguous (T, H) tensor");
  check_index(positions, "positions", positions.numel(), hidden.device());
  check_on(rows, "rows", hidden.device());
  TORCH_CHECK(rows.scalar_type() == hidden.scalar_type() && rows.is_contiguous() && rows.dim() == 2 &&
                  rows.size(0) == positions.numel() && rows.size(1) == hidden.size(1),
              "fastmlm._C: rows must be a contiguous (R, H) tensor of hidden's dtype");
  MaskedCEParams p;
  p.hidden = hidden.data_ptr();
  p.positions = positions.data_ptr<int64_t>();
  p.rows = rows.data_ptr();
  p.num_rows = positions.numel();
  p.num_tokens = hidden.size(0);
  p.hidden_size = hidden.size(1);
  c10::cuda::CUDAGuard guard(hidden.device());
  check_launch(gather_rows(p, dtype_of(hidden, true), stream_of(hidden)), "gather_rows");
}

// Common checks of one vocabulary chunk: logits (R, C), bias (C,) or none, targets (R,).
MaskedCEParams chunk_params(const Tensor& logits, const OptTensor& bias, const Tensor& targets, int64_t v0) {
  const c10::Device device = logits.device();
  check_on(logits, "logits", device);
  dtype_of(logits, true);
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "fastmlm._C: logits must be a contiguous (R, C) tensor");
  check_index(targets, "targets", logits.size(0), device);
  MaskedCEParams p;
  if (bias.has_value()) {
    check_on(*bias, "bias", device);
    TORCH_CHECK(bias->scalar_type() == logits.scalar_type() && bias->dim() == 1 && bias->numel() == logits.size(1) &&
                    bias->is_contiguous(),
                "fastmlm._C: bias must be a contiguous (C,) tensor of the logits' dtype");
    p.bias = bias->data_ptr();
  }
  TORCH_CHECK(v0 >= 0, "fastmlm._C: v0 must be >= 0");
  p.logits = logits.data_ptr();
  p.targets = targets.data_ptr<int64_t>();
  p.num_rows = logits.size(0);
  p.chunk = logits.size(1);
  p.v0 = v0;
  return p;
}

void masked_ce_chunk_stats_op(const Tensor& logits, const OptTensor& bias, const Tensor& targets, int64_t v0,
                              const Tensor& stats, const Tensor& best, const Tensor& best_logit) {
  MaskedCEParams p = chunk_params(logits, bias, targets, v0);
  TORCH_CHECK(p.num_rows < (int64_t{1} << 31), "fastmlm._C: at most 2^31 - 1 rows");
  check_float32(stats, "stats", {p.num_rows, 4}, logits.device());
  check_index(best, "best", p.num_rows, logits.device());
  check_float32(best_logit, "best_logit", {p.num_rows}, logits.device());
  p.stats = stats.data_ptr<float>();
  p.best = best.data_ptr<int64_t>();
  p.best_logit = best_logit.data_ptr<float>();
  c10::cuda::CUDAGuard guard(logits.device());
  check_launch(masked_ce_chunk_stats(p, dtype_of(logits, true), stream_of(logits)), "masked_ce_chunk_stats");
}

void masked_ce_finish_op(const Tensor& stats, const Tensor& best, const Tensor& targets, int64_t vocab,
                         double label_smoothing, double z_loss, const Tensor& loss, const Tensor& lse,
                         const Tensor& correct) {
  const int64_t rows = targets.numel();
  const c10::Device device = targets.device();
  check_index(targets, "targets", rows, device);
  check_float32(stats, "stats", {rows, 4}, device);
  check_index(best, "best", rows, device);
  check_float32(loss, "loss", {rows}, device);
  check_float32(lse, "lse", {rows}, device);
  check_on(correct, "correct", device);
  TORCH_CHECK(correct.scalar_type() == at::kBool && correct.numel() == rows && correct.is_contiguous(),
              "fastmlm._C: correct must be a contiguous bool tensor of ", rows, " entries");
  TORCH_CHECK(vocab > 0, "fastmlm._C: vocab must be positive");
  MaskedCEParams p;
  p.stats = stats.data_ptr<float>();
  p.best = best.data_ptr<int64_t>();
  p.targets = targets.data_ptr<int64_t>();
  p.vocab = vocab;
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss = static_cast<float>(z_loss);
  p.loss = loss.data_ptr<float>();
  p.lse_out = lse.data_ptr<float>();
  p.correct = correct.data_ptr<bool>();
  p.num_rows = rows;
  c10::cuda::CUDAGuard guard(device);
  check_launch(masked_ce_finish(p, stream_of(targets)), "masked_ce_finish");
}

void masked_ce_chunk_grad_op(const Tensor& logits, const OptTensor& bias, const Tensor& targets, const Tensor& lse,
                             const Tensor& grad, int64_t v0, int64_t vocab, double label_smoothing, double z_loss,
                             const Tensor& dlogits) {
  MaskedCEParams p = chunk_params(logits, bias, targets, v0);
  check_float32(lse, "lse", {p.num_rows}, logits.device());
  check_float32(grad, "grad", {p.num_rows}, logits.device());
  check_on(dlogits, "dlogits", logits.device());
  TORCH_CHECK(dlogits.scalar_type() == logits.scalar_type() && dlogits.sizes() == logits.sizes() &&
                  dlogits.is_contiguous(),
              "fastmlm._C: dlogits must be a contiguous tensor shaped and typed like logits");
  TORCH_CHECK(vocab > 0, "fastmlm._C: vocab must be positive");
  p.lse = lse.data_ptr<float>();
  p.grad = grad.data_ptr<float>();
  p.vocab = vocab;
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss = static_cast<float>(z_loss);
  p.dlogits = dlogits.data_ptr();
  c10::cuda::CUDAGuard guard(logits.device());
  check_launch(masked_ce_chunk_grad(p, dtype_of(logits, true), stream_of(logits)), "masked_ce_chunk_grad");
}

}  // namespace
}  // namespace fastmlm

TORCH_LIBRARY(fastmlm_C, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? key_len, Tensor? cu_seqlens, "
        "int max_seqlen, float scale, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_mask, "
        "Tensor? key_len, Tensor? cu_seqlens, int max_seqlen, float scale, Tensor(a!) delta, Tensor(b!) dq, "
        "Tensor(c!) dk, Tensor(d!) dv) -> ()");
  m.def("block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? key_len, Tensor? cu_seqlens, "
        "int max_seqlen, float scale, Tensor blocks, Tensor kv_index, Tensor kv_count, Tensor q_index, "
        "Tensor q_count, Tensor? token_mask, int block_size, int window, int num_global, Tensor(a!) out, "
        "Tensor(b!) lse) -> ()");
  m.def("block_sparse_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_mask, "
        "Tensor? key_len, Tensor? cu_seqlens, int max_seqlen, float scale, Tensor blocks, Tensor kv_index, "
        "Tensor kv_count, Tensor q_index, Tensor q_count, Tensor? token_mask, int block_size, int window, "
        "int num_global, Tensor(a!) delta, Tensor(b!) dq, Tensor(c!) dk, Tensor(d!) dv) -> ()");
  m.def("gather_rows(Tensor hidden, Tensor positions, Tensor(a!) rows) -> ()");
  m.def("masked_ce_chunk_stats(Tensor logits, Tensor? bias, Tensor targets, int v0, Tensor(a!) stats, "
        "Tensor(b!) best, Tensor(c!) best_logit) -> ()");
  m.def("masked_ce_finish(Tensor stats, Tensor best, Tensor targets, int vocab, float label_smoothing, "
        "float z_loss, Tensor(a!) loss, Tensor(b!) lse, Tensor(c!) correct) -> ()");
  m.def("masked_ce_chunk_grad(Tensor logits, Tensor? bias, Tensor targets, Tensor lse, Tensor grad, int v0, "
        "int vocab, float label_smoothing, float z_loss, Tensor(a!) dlogits) -> ()");
}

TORCH_LIBRARY_IMPL(fastmlm_C, CUDA, m) {
  m.impl("attention_fwd", &fastmlm::attention_fwd);
  m.impl("attention_bwd", &fastmlm::attention_bwd);
  m.impl("block_sparse_fwd", &fastmlm::block_sparse_fwd);
  m.impl("block_sparse_bwd", &fastmlm::block_sparse_bwd);
  m.impl("gather_rows", &fastmlm::gather_rows_op);
  m.impl("masked_ce_chunk_stats", &fastmlm::masked_ce_chunk_stats_op);
  m.impl("masked_ce_finish", &fastmlm::masked_ce_finish_op);
  m.impl("masked_ce_chunk_grad", &fastmlm::masked_ce_chunk_grad_op);
}

// `import fastmlm._C` loads this library, which runs the registrations above. The module
// carries HEAD_DIMS, the head-dim buckets of head_dims.h, for the Python side to read.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastmlm CUDA kernels, registered as torch.ops.fastmlm_C",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* head_dims = PyTuple_New(fastmlm::kNumHeadDims);
  if (head_dims == nullptr) {
    Py_DECREF(m);
    return nullptr;
  }
  for (int i = 0; i < fastmlm::kNumHeadDims; ++i) PyTuple_SET_ITEM(head_dims, i, PyLong_FromLong(fastmlm::kHeadDims[i]));
  if (PyModule_AddObject(m, "HEAD_DIMS", head_dims) < 0) {  // steals head_dims only on success
    Py_DECREF(head_dims);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
