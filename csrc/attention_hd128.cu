// Instantiates the fused attention kernels (attention.cuh) for head dims up to 128, fp16 and bf16.
#include "attention.cuh"

FASTMLM_INSTANTIATE_ATTENTION(128)
