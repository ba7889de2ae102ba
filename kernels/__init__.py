"""fastmlm's Triton kernels, installed as ``fastmlm_kernels`` (never as a bare ``kernels`` package).

Each module is the ``triton`` backend of the op with the same name in
``fastmlm.ops``: ``why_not`` / ``forward`` / ``backward`` with that op's signature.
"""
