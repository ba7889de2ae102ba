"""fastmlm: fused kernels and a BERT-style encoder for masked-language-model training."""
__version__ = "0.1.0"
