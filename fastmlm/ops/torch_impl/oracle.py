"""The references in bundle form, so ``auto``'s fallback chain can end at the oracle.

``dispatch.Registry`` runs these inside the custom ops when every fast backend before them
raised and ``auto`` may pick the reference for the inputs (CPU inputs, or CUDA inputs no
larger than ``dispatch.REFERENCE_LIMIT``). Forward is the op's reference; backward
recomputes it under autograd (:mod:`._autograd`). Outputs are contiguous, as every
backend's are.
"""
from __future__ import annotations

from . import _autograd


class attention:  # noqa: N801 - a namespace named after the op
    @staticmethod
    def forward(inputs):
        from ..attention import attention_reference

        q, k, v, mask, cu_seqlens, _, scale = inputs
        out, lse = attention_reference(q, k, v, mask, cu_seqlens, scale)
        return out.contiguous(), lse.contiguous()

    @staticmethod
    def backward(inputs, out, lse, dout):
        from ..attention import attention_reference

        q, k, v, mask, cu_seqlens, _, scale = inputs
        return tuple(g.contiguous() for g in _autograd.vjp(
            lambda q, k, v: attention_reference(q, k, v, mask, cu_seqlens, scale)[0], (q, k, v), dout))


class block_sparse_attention:  # noqa: N801
    @staticmethod
    def _keep(inputs):
        from ..block_layout import token_keep

        return token_keep(inputs.blocks, inputs.block_size, inputs.dense.max_seqlen, inputs.window,
                          inputs.num_global, inputs.token_mask)

    @classmethod
    def forward(cls, inputs):
        from ..attention import attention_reference

        q, k, v, mask, cu_seqlens, _, scale = inputs.dense
        out, lse = attention_reference(q, k, v, mask, cu_seqlens, scale, token_mask=cls._keep(inputs))
        return out.contiguous(), lse.contiguous()

    @classmethod
    def backward(cls, inputs, out, lse, dout):
        from ..attention import attention_reference

        q, k, v, mask, cu_seqlens, _, scale = inputs.dense
        keep = cls._keep(inputs)
        return tuple(g.contiguous() for g in _autograd.vjp(
            lambda q, k, v: attention_reference(q, k, v, mask, cu_seqlens, scale, token_mask=keep)[0], (q, k, v),
            dout))


class masked_lm_loss:  # noqa: N801
    @staticmethod
    def forward(inputs):
        from ..masked_ce import masked_lm_loss_reference

        return masked_lm_loss_reference(*inputs[:8])  # max_masked_fraction, the ninth, bounds fast backends only

    @staticmethod
    def backward(inputs, lse, grad_rows):
        from ..masked_ce import masked_lm_loss_reference

        hidden, weight, bias, labels, positions, ignore_index, label_smoothing, z_loss = inputs[:8]
        tensors = (hidden, weight) if bias is None else (hidden, weight, bias)

        def loss(hidden, weight, bias=None):
            return masked_lm_loss_reference(hidden, weight, bias, labels, positions, ignore_index, label_smoothing,
                                            z_loss)[0]

        grads = _autograd.vjp(loss, tensors, grad_rows)
        d_bias = grads[2] if bias is not None else weight.new_zeros(weight.shape[0])
        return grads[0].contiguous(), grads[1].contiguous(), d_bias.contiguous()
