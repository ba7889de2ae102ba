// The fastmlm kernels built for the CPU emulator (emulator.h): a plain shared library with a
// C interface, loaded through ctypes by fastmlm/ops/cuda_impl/emulate.py so the CPU test
// tier can run the very kernel templates the GPU runs. Build (what emulate.py does), one line:
//   g++ -std=c++17 -O1 -shared -fPIC -DFASTMLM_EMULATE -I csrc -I <cuda>/include
//       csrc/emulate/emulated_kernels.cpp -o <cache>/libfastmlm_emulated.so
// Return values are cudaError_t codes (0 = success). The ctypes side (OP_FUNCTIONS,
// C_SIGNATURES in emulate.py) is checked against these prototypes and the TORCH_LIBRARY
// schemas by tests/test_cuda_emulator_schema.py.
#include "../attention.cuh"
#include "../masked_ce.cu"  // the dtype dispatch of the masked-CE launchers, as the GPU build has it

// Every head-dim bucket of head_dims.h, as the attention_hd<N>.cu files instantiate them one each,
// so the calls below go through the same launchers.h dispatch (bucket, dtype) as the binding.
FASTMLM_FOR_EACH_HEAD_DIM(FASTMLM_INSTANTIATE_ATTENTION)

using fastmlm::AttentionParams;
using fastmlm::DType;
using fastmlm::MaskedCEParams;

extern "C" {

// dtype: a fastmlm::DType as an integer (launchers.h): 0 = fp16, 1 = bf16, 2 = fp32 (masked CE only).
// Dense and block-sparse attention, forward and backward: blocks == null is dense (the layout
// arguments after it are then unused); see BlockSparseParams in launchers.h.
int fastmlm_emu_attention(int backward, int dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                          const bool* key_mask, const int* key_len, const int* cu_seqlens, const void* dout,
                          float* delta, void* dq, void* dk, void* dv, int batch, int heads, int max_seqlen,
                          int head_dim, int64_t total_rows, float scale, const int8_t* blocks, const int* kv_index,
                          const int* kv_count, const int* q_index, const int* q_count, const bool* token_mask,
                          int layout_heads, int mask_heads, int num_blocks, int layout_len, int block_size,
                          int window, int num_global) {
  AttentionParams p;
  p.q = q, p.k = k, p.v = v, p.out = out, p.lse = lse, p.key_mask = key_mask, p.key_len = key_len,
  p.cu_seqlens = cu_seqlens;
  p.dout = dout, p.delta = delta, p.dq = dq, p.dk = dk, p.dv = dv;
  p.batch = batch, p.heads = heads, p.max_seqlen = max_seqlen, p.head_dim = head_dim, p.total_rows = total_rows;
  p.scale = scale;
  fastmlm::BlockSparseParams& s = p.sparse;
  s.blocks = blocks, s.kv_index = kv_index, s.kv_count = kv_count, s.q_index = q_index, s.q_count = q_count;
  s.token_mask = token_mask, s.layout_heads = layout_heads, s.mask_heads = mask_heads, s.num_blocks = num_blocks;
  s.layout_len = layout_len, s.block_size = block_size, s.window = window, s.num_global = num_global;
  return backward ? fastmlm::attention_backward(p, static_cast<DType>(dtype), nullptr)
                  : fastmlm::attention_forward(p, static_cast<DType>(dtype), nullptr);
}

int fastmlm_emu_gather_rows(int dtype, const void* hidden, const int64_t* positions, void* rows, int64_t num_rows,
                            int64_t num_tokens, int64_t hidden_size) {
  MaskedCEParams p;
  p.hidden = hidden, p.positions = positions, p.rows = rows;
  p.num_rows = num_rows, p.num_tokens = num_tokens, p.hidden_size = hidden_size;
  return fastmlm::gather_rows(p, static_cast<DType>(dtype), nullptr);
}

int fastmlm_emu_chunk_stats(int dtype, const void* logits, const void* bias, const int64_t* targets, int64_t v0,
                            float* stats, int64_t* best, float* best_logit, int64_t num_rows, int64_t chunk) {
  MaskedCEParams p;
  p.logits = logits, p.bias = bias, p.targets = targets, p.stats = stats, p.best = best, p.best_logit = best_logit;
  p.v0 = v0, p.num_rows = num_rows, p.chunk = chunk;
  return fastmlm::masked_ce_chunk_stats(p, static_cast<DType>(dtype), nullptr);
}

int fastmlm_emu_finish(const float* stats, const int64_t* best, const int64_t* targets, int64_t vocab,
                       float label_smoothing, float z_loss, float* loss, float* lse, bool* correct, int64_t num_rows) {
  MaskedCEParams p;
  p.stats = const_cast<float*>(stats), p.best = const_cast<int64_t*>(best), p.targets = targets, p.vocab = vocab;
  p.label_smoothing = label_smoothing, p.z_loss = z_loss, p.loss = loss, p.lse_out = lse, p.correct = correct;
  p.num_rows = num_rows;
  return fastmlm::masked_ce_finish(p, nullptr);
}

int fastmlm_emu_chunk_grad(int dtype, const void* logits, const void* bias, const int64_t* targets, const float* lse,
                           const float* grad, int64_t v0, int64_t vocab, float label_smoothing, float z_loss,
                           void* dlogits, int64_t num_rows, int64_t chunk) {
  MaskedCEParams p;
  p.logits = logits, p.bias = bias, p.targets = targets, p.lse = lse, p.grad = grad, p.v0 = v0, p.vocab = vocab;
  p.label_smoothing = label_smoothing, p.z_loss = z_loss, p.dlogits = dlogits, p.num_rows = num_rows, p.chunk = chunk;
  return fastmlm::masked_ce_chunk_grad(p, static_cast<DType>(dtype), nullptr);
}

}  // extern "C"
