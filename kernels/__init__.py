"""fastmlm's Triton kernels, installed as ``fastmlm_kernels`` (never as a bare ``kernels`` package).

Each op module is the ``triton`` backend of the op with the same name in
``fastmlm.ops``: ``why_not(inputs)`` / ``forward(inputs)`` / ``backward(inputs, ...)``
taking that op's bundle. ``_flash.py`` holds the attention JIT code shared by
``attention.py`` and ``block_sparse.py``; ``_*_compile.py`` compile the kernels
for sm_90 on any machine. From fastmlm, these modules import only the leaf modules
``fastmlm.ops.kernels_path`` and ``fastmlm.ops.block_layout`` (no import cycle);
fastmlm/ops/kernels_path.py resolves this package from an install or a checkout.
"""
