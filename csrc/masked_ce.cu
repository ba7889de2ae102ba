// Instantiates the masked-LM cross-entropy kernels (masked_ce.cuh) for fp32, fp16 and bf16.
#include "masked_ce.cuh"

namespace fastmlm {

namespace {
template <template <class> class Launch>
cudaError_t by_dtype(const MaskedCEParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return Launch<float>::run(p, stream);
    case DType::kFloat16: return Launch<__half>::run(p, stream);
    case DType::kBFloat16: return Launch<__nv_bfloat16>::run(p, stream);
  }
  return cudaErrorInvalidValue;
}
template <class T> struct Gather { static cudaError_t run(const MaskedCEParams& p, cudaStream_t s) { return masked_ce::launch_gather<T>(p, s); } };
template <class T> struct Stats { static cudaError_t run(const MaskedCEParams& p, cudaStream_t s) { return masked_ce::launch_chunk_stats<T>(p, s); } };
template <class T> struct Grad { static cudaError_t run(const MaskedCEParams& p, cudaStream_t s) { return masked_ce::launch_chunk_grad<T>(p, s); } };
}  // namespace

cudaError_t gather_rows(const MaskedCEParams& p, DType dtype, cudaStream_t stream) { return by_dtype<Gather>(p, dtype, stream); }
cudaError_t masked_ce_chunk_stats(const MaskedCEParams& p, DType dtype, cudaStream_t stream) { return by_dtype<Stats>(p, dtype, stream); }
cudaError_t masked_ce_chunk_grad(const MaskedCEParams& p, DType dtype, cudaStream_t stream) { return by_dtype<Grad>(p, dtype, stream); }
cudaError_t masked_ce_finish(const MaskedCEParams& p, cudaStream_t stream) { return masked_ce::launch_finish(p, stream); }

}  // namespace fastmlm
