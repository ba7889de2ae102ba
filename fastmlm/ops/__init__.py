"""The public ops of fastmlm. Each takes ``backend="auto" | "reference" | "torch" | "triton" | "cuda"``."""
from .attention import attention, attention_reference
from .block_sparse import BlockSparseLayout, block_sparse_attention, block_sparse_attention_reference
from .dispatch import BackendUnavailable
from .masked_ce import masked_lm_loss, masked_lm_loss_reference

__all__ = [
    "attention",
    "attention_reference",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "BlockSparseLayout",
    "masked_lm_loss",
    "masked_lm_loss_reference",
    "BackendUnavailable",
]
